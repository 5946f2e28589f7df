"""Derive the CLIP BPE tokenizer files that jaxdiff ships from OpenAI's vocabulary.

The source is `bpe_simple_vocab_16e6.txt.gz` from the `open_clip_torch` wheel on PyPI (MIT
licensed, from OpenAI's CLIP). This writes the transformers `CLIPTokenizer` folder
(vocab.json, merges.txt, tokenizer_config.json) into jaxdiff/assets/clip_tokenizer/, built the
way CLIP's own SimpleTokenizer builds its vocabulary.

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
"""

import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "jaxdiff" / "assets" / "clip_tokenizer"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def main(wheel: str) -> None:
    raw = zipfile.ZipFile(wheel).read(MEMBER)
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # CLIP uses the first 48,894 merges
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    )
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (OUT / "SOURCE.txt").write_text(
        f"Derived by scripts/make_clip_tokenizer.py from {MEMBER} in {Path(wheel).name}\n"
        f"sha256 of the .gz: {hashlib.sha256(raw).hexdigest()}\n"
        "The vocabulary is OpenAI CLIP's (MIT License, Copyright (c) 2021 OpenAI).\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
