"""The CLIP tokenizer: the converted copy in jaxdiff's cache encodes exactly as transformers."""

import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import CLIPTokenizer

from jaxdiff.tokenizer import (
    ClipTokenizer,
    bundled_tokenizer_dir,
    load_clip_tokenizer,
    tokenize,
)

PROMPTS = [
    "a photo of a cat",
    "",
    "x " * 100,  # truncated: the EOS stays
    "Ünïcödé   CAFÉ\n\tnaïve",
    "日本語のテキスト 🐱🚀",
    "<|endoftext|> inside a prompt",
    "don't won't it's they'll",
    "a,b;c!!! ... ??? (masterpiece:1.2)",
    "a <cat-toy> on a beach",
]


def _folder(kind, tmp_path):
    """The bundled tokenizer; SD 2's padding with "!"; one with an added (textual inversion)
    token."""
    if kind == "bundled":
        return bundled_tokenizer_dir()
    if kind == "pad !":
        tok = CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir()), pad_token="!")
    else:
        tok = CLIPTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
        tok.add_tokens(["<cat-toy>"])
    out = tmp_path / "tok"
    tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["bundled", "pad !", "added token"])
def test_cached_tokenizer_encodes_as_transformers(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDIFF_CACHE_DIR", str(tmp_path / "cache"))
    folder = _folder(kind, tmp_path)
    reference = CLIPTokenizer.from_pretrained(str(folder))
    expected = reference(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids
    first = load_clip_tokenizer(folder)  # converted from transformers' and saved
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1

    def no_transformers(*args, **kwargs):
        raise AssertionError("the second load went through transformers")

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", no_transformers)
    second = load_clip_tokenizer(folder)  # read back from the cache
    for tok in (first, second):
        assert isinstance(tok, ClipTokenizer)
        ids = tokenize(tok, PROMPTS)
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, expected)
    if kind == "pad !":
        assert ids[0, -1] == reference.convert_tokens_to_ids("!") != 49407
    if kind == "added token":
        assert reference.convert_tokens_to_ids("<cat-toy>") in ids[-1]


def test_damaged_cache_entry_is_replaced_and_cache_off_writes_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXDIFF_CACHE_DIR", str(cache))
    load_clip_tokenizer(bundled_tokenizer_dir())
    (entry,) = (cache / "tokenizers").iterdir()
    good = entry.read_text()
    entry.write_text(good[: len(good) // 2])  # cut short, as by a full disk
    tok = load_clip_tokenizer(bundled_tokenizer_dir())
    assert tokenize(tok, ["a photo of a cat"])[0, 1] == 320
    assert entry.read_text() == good

    monkeypatch.setenv("JAXDIFF_CACHE_DIR", "off")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert isinstance(load_clip_tokenizer(bundled_tokenizer_dir()), ClipTokenizer)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cached_load_does_not_import_transformers(tmp_path):
    env = dict(os.environ, JAXDIFF_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    code = (
        "import sys; from jaxdiff.tokenizer import bundled_clip_tokenizer, tokenize;"
        "ids = tokenize(bundled_clip_tokenizer(), ['a cat']);"
        "print(int(ids[0, 2]), 'transformers' in sys.modules)"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs == [["2368", "True"], ["2368", "False"]]
