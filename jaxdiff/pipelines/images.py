"""Images in and out of the pipelines: reading inputs and masks, grids, PNG parameters, .npy.

Everything here runs on the host with numpy and Pillow. Pipeline images are float32 NHWC in
[0, 1]; the models see [-1, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from jaxdiff import atomic


class ImageInputError(ValueError):
    """An input image or mask that cannot be used; the message names the file."""


def read_image(path, *, mode: str = "RGB") -> np.ndarray:
    """An image file -> float32 [H, W, C] in [0, 1] (C = 3 for RGB, 1 for a grayscale mask)."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return _from_pil(im, mode)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{path}: not a readable image ({e})") from None


def _from_pil(im, mode: str) -> np.ndarray:
    if mode == "L" and im.mode in ("RGBA", "LA"):
        im = im.getchannel("A") if _alpha_is_mask(im) else im.convert("L")
    array = np.asarray(im.convert(mode), np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def as_image(value, *, mode: str = "RGB", what: str = "image") -> np.ndarray:
    """An image as the pipelines take it: a path, a PIL image, a uint8 array (0-255), a bool
    array (a mask) or a float array in [0, 1] -> float32 [H, W, C] in [0, 1] (C = 3 for RGB, 1
    for a mask, `mode` "L"). A float array outside [0, 1] (0-255, or [-1, 1]) is refused: it
    was used as it stood, a wrong image without a word."""
    if isinstance(value, (str, Path)):
        return read_image(value, mode=mode)
    if isinstance(value, Image.Image):
        return _from_pil(value, mode)
    array = np.asarray(value)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not 0.0 <= low <= high <= 1.0:  # nan fails too
            raise ImageInputError(
                f"{what} values must be in [0, 1], got [{low:g}, {high:g}] (give a float array "
                "in [0, 1], a uint8 array or a PIL image)"
            )
    else:
        raise ImageInputError(
            f"{what} has dtype {array.dtype}: give a float array in [0, 1], a uint8 array or a "
            "PIL image"
        )
    return array[..., None] if array.ndim == 2 else array


def _alpha_is_mask(im) -> bool:
    alpha = np.asarray(im.getchannel("A"))
    return bool(alpha.min() < 255)


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """diffusers' mask convention: white (>= 0.5) is repainted, black is kept."""
    return (mask >= 0.5).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """[N, H, W, C] -> one image with the N images in rows of `cols` (about square by default)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, c), images.dtype)
    for i in range(n):
        r, k = divmod(i, cols)
        out[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return out


def parameters_text(params: dict) -> str:
    """Generation parameters in A1111's "parameters" text-chunk layout."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    order = ("steps", "sampler", "sigmas", "guidance", "seed", "size", "model", "strength")
    names = {
        "steps": "Steps",
        "sampler": "Sampler",
        "sigmas": "Schedule type",
        "guidance": "CFG scale",
        "seed": "Seed",
        "size": "Size",
        "model": "Model",
        "strength": "Denoising strength",
    }
    items = [f"{names[k]}: {params[k]}" for k in order if params.get(k) is not None]
    lines.append(", ".join(items))
    return "\n".join(lines)


def save_png(path, image: np.ndarray, params: dict | None = None) -> None:
    """float32 [H, W, 3] in [0, 1] -> PNG, with the parameters in a `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text("parameters", parameters_text(params))
    atomic.write_file(
        Path(path),
        lambda tmp: Image.fromarray(to_uint8(image)).save(tmp, format="PNG", pnginfo=info),
    )


def save_npy(path, images: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, images.astype(np.float32))

    atomic.write_file(Path(path), write)


def output_paths(out: Path, n: int, suffix: str) -> list[Path]:
    """OUT.png for one image; OUT-0.png, OUT-1.png, ... for a batch."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == suffix else out
    if n == 1:
        return [stem.with_name(stem.name + suffix)]
    return [stem.with_name(f"{stem.name}-{i}{suffix}") for i in range(n)]
