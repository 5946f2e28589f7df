"""Prompt tokenization on the host: transformers' CLIPTokenizer, kept converted in the cache.

jaxdiff ships CLIP's BPE vocabulary (jaxdiff/assets/clip_tokenizer, derived from OpenAI's
`bpe_simple_vocab_16e6.txt.gz` by scripts/make_clip_tokenizer.py), so tokenizing needs no hub.

transformers 5 builds its CLIPTokenizer as a `tokenizers.Tokenizer` (normalizer, BPE, the
BOS/EOS post-processor) and encodes through it. Importing transformers takes 1.3-1.7 s on a small
CPU, more than loading the bundled model's weights, so the first load of a tokenizer folder saves
that `tokenizers.Tokenizer` in jaxdiff's cache folder (`compilation_cache.base_dir()`, under
`tokenizers/`), keyed by the folder's files and the transformers and tokenizers versions; later
loads read it back without importing transformers, and encode exactly as transformers does
(`tests/test_tokenizer.py` compares the ids). Where transformers gives no `tokenizers` backend
(transformers 4's Python CLIPTokenizer), its own object is used as before.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

# The files of a tokenizer folder that can change how it encodes.
_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_FORMAT = 1  # of the cached file; bump when its content changes
# What transformers' tokenizer passes to its backend for `tokenize`'s padding and truncation.
_SETTINGS = ("model_max_length", "pad_token", "pad_id", "padding_side", "truncation_side")


class ClipTokenizer:
    """A CLIP tokenizer as transformers configures it: its `tokenizers` backend with the padding
    and truncation settings that `tokenize` asks transformers for."""

    def __init__(
        self,
        backend,
        *,
        model_max_length,
        pad_token,
        pad_id,
        padding_side,
        truncation_side,
        name_or_path,
    ):
        self.backend = backend
        self.model_max_length = int(model_max_length)
        self.pad_token, self.pad_id = pad_token, int(pad_id)
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.name_or_path = str(name_or_path)  # the folder: an export copies its files

    @classmethod
    def from_transformers(cls, tok):
        return cls(
            tok.backend_tokenizer,
            model_max_length=tok.model_max_length,
            pad_token=str(tok.pad_token),
            pad_id=tok.pad_token_id,
            padding_side=tok.padding_side,
            truncation_side=tok.truncation_side,
            name_or_path=tok.name_or_path,
        )

    def to_json(self) -> str:
        settings = {name: getattr(self, name) for name in _SETTINGS}
        return json.dumps({"format": _FORMAT, **settings, "backend": self.backend.to_str()})

    @classmethod
    def from_json(cls, text: str, name_or_path):
        from tokenizers import Tokenizer

        d = json.loads(text)
        if d.pop("format") != _FORMAT:
            raise ValueError("another format")
        return cls(Tokenizer.from_str(d.pop("backend")), name_or_path=name_or_path, **d)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """int32 ids [B, model_max_length]: BOS, tokens, EOS, truncated and padded."""
        n = self.model_max_length
        backend = self.backend
        backend.enable_truncation(n, direction=self.truncation_side)
        backend.enable_padding(
            length=n, pad_id=self.pad_id, pad_token=self.pad_token, direction=self.padding_side
        )
        encodings = backend.encode_batch(list(prompts), add_special_tokens=True)
        return np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(encodings), n)


def bundled_tokenizer_dir() -> Path:
    return Path(str(resources.files("jaxdiff") / "assets" / "clip_tokenizer"))


def bundled_clip_tokenizer():
    """OpenAI CLIP's tokenizer (vocabulary 49,408, 77 tokens), as SD 1.x and SDXL use it."""
    return load_clip_tokenizer(bundled_tokenizer_dir())


def load_clip_tokenizer(folder):
    """The CLIP tokenizer of a folder (vocab.json, merges.txt, tokenizer_config.json, ...).

    A `ClipTokenizer` (from jaxdiff's cache when it holds this folder's), or transformers'
    tokenizer where transformers gives no `tokenizers` backend. Errors are transformers'."""
    from jaxdiff import compilation_cache

    folder = Path(folder)

    def convert():
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(folder))
        if getattr(tok, "backend_tokenizer", None) is None:
            return tok
        return ClipTokenizer.from_transformers(tok)

    return compilation_cache.memoized(
        "tokenizers",
        lambda: compilation_cache.entry_key(
            f"format {_FORMAT}",
            packages=("transformers", "tokenizers"),
            files=[folder / name for name in _TOKENIZER_FILES],
        ),
        convert,
        dump=lambda tok: tok.to_json() if isinstance(tok, ClipTokenizer) else None,
        load=lambda text: ClipTokenizer.from_json(text, folder),
    )


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """Prompts -> int32 ids [B, model_max_length], padded and truncated as diffusers does."""
    if isinstance(tokenizer, ClipTokenizer):
        return tokenizer.encode(prompts)
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return ids.astype(np.int32)
