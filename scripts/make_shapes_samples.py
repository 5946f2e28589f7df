"""The README's sample grid of the bundled shapes model: prompts under their images.

    python scripts/make_shapes_samples.py docs/shapes-samples.png [--model DIR] [--seed 0]

Each prompt is drawn once with `jaxdiff generate`'s defaults (30 steps, guidance 7.5, the model's
sampler), image i with seed `seed + i`, and shown 2x enlarged (nearest neighbour).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxdiff.cli import ScriptParser  # noqa: E402

PROMPTS = (
    "a small red circle on the left on a blue background",
    "a large yellow square in the center on a black background",
    "a small white triangle on the top on a purple background",
    "a large blue circle on the right on a yellow background",
    "a small green triangle on the bottom on a white background",  # held-out pair
    "a large purple circle in the center on a orange background",  # held-out pair
    "a small orange square on the left and a small blue circle on the right on a black background",
    "a small red triangle on the top and a large white circle on the bottom on a green background",
)


def grid(images: np.ndarray, prompts, columns: int = 4, scale: int = 2):
    from PIL import Image, ImageDraw, ImageFont

    from jaxdiff.eval.shapes import wrap_text

    font = ImageFont.load_default()
    size = images.shape[1] * scale
    pad, line_height, lines = 6, 12, 5
    width = max(size, 150)
    cell_w, cell_h = width + 2 * pad, size + 2 * pad + lines * line_height
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(out)
    for k, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        tile = Image.fromarray(image).resize((size, size), Image.NEAREST)
        out.paste(tile, (x + pad + (width - size) // 2, y + pad))
        for i, t in enumerate(wrap_text(draw, prompt, font, width)[:lines]):
            draw.text((x + pad, y + size + 2 * pad + i * line_height), t, fill="black", font=font)
    return out


def main() -> None:
    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", default=None, help="default: the bundled model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import jaxdiff
    from jaxdiff.pipelines.images import to_uint8

    pipe = jaxdiff.load(args.model)
    images = to_uint8(pipe.generate(list(PROMPTS), seed=args.seed, progress=False).images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(np.asarray(images), PROMPTS).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
