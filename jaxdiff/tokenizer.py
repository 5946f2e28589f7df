"""Prompt tokenization on the host, through transformers' CLIPTokenizer.

jaxdiff ships CLIP's BPE vocabulary (jaxdiff/assets/clip_tokenizer, derived from OpenAI's
`bpe_simple_vocab_16e6.txt.gz` by scripts/make_clip_tokenizer.py), so tokenizing needs no hub.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np


def bundled_tokenizer_dir() -> Path:
    return Path(str(resources.files("jaxdiff") / "assets" / "clip_tokenizer"))


def bundled_clip_tokenizer():
    """OpenAI CLIP's tokenizer (vocabulary 49,408, 77 tokens), as SD 1.x and SDXL use it."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir()))


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """Prompts -> int32 ids [B, model_max_length], padded and truncated as diffusers does."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return ids.astype(np.int32)
