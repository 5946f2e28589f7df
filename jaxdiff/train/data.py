"""Training data: a folder of images with captions, in a deterministic, resumable order.

A folder holds images (.png, .jpg, .jpeg, .webp, .bmp) and their captions, either each in a
text file of the same name (`cat.png` + `cat.txt`) or all in a `metadata.jsonl` (the Hugging
Face imagefolder convention: one `{"file_name": "cat.png", "text": "a cat"}` per line;
`caption` is accepted for `text`). Subfolders are searched too. An image without a caption gets
the empty caption.

Order: example k of the stream (k = 0, 1, 2, ... across epochs) is image
`permutation(seed, epoch)[k % N]` with epoch = k // N, flipped when a bit drawn from
(seed, epoch, k % N) says so. The stream is a pure function of the position, so the position
alone (saved in the checkpoint) resumes it exactly, and each host loads just its rows of every
global batch.

Corrupt or unreadable images are skipped with a warning that names them: at indexing
(`PIL.Image.verify`), and again at decoding, where a failing image is replaced by the next good
one of the same epoch's order (deterministically, so a resumed run sees the same).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from jaxdiff.threads import parallel_map

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """A dataset folder that cannot be used; the message is one line."""


class CorruptImageWarning(UserWarning):
    """An image was skipped because it could not be read."""


def _read_metadata(folder: Path) -> dict[str, str]:
    captions = {}
    for meta in sorted(folder.rglob("metadata.jsonl")):
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{meta}:{n}: expected a JSON object with 'file_name'") from None
            text = row.get("text", row.get("caption", ""))
            captions[str((meta.parent / name).resolve())] = str(text)
    return captions


def _verify(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


@dataclasses.dataclass(frozen=True)
class ImageCaptionFolder:
    """The images of a folder (sorted by path) and their captions."""

    root: Path
    paths: tuple[Path, ...]
    captions: tuple[str, ...]

    @classmethod
    def scan(cls, root) -> ImageCaptionFolder:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"no such data folder: {root}")
        metadata = _read_metadata(root)
        paths, captions, corrupt = [], [], []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if not _verify(path):
                corrupt.append(path)
                continue
            key = str(path.resolve())
            if key in metadata:
                caption = metadata[key]
            elif path.with_suffix(".txt").is_file():
                caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
            else:
                caption = ""
            paths.append(path)
            captions.append(caption)
        if corrupt:
            names = ", ".join(str(p.relative_to(root)) for p in corrupt)
            warnings.warn(
                f"skipped {len(corrupt)} corrupt image(s) in {root}: {names}",
                CorruptImageWarning,
                stacklevel=2,
            )
        if not paths:
            raise DataError(f"no readable images in {root}")
        return cls(root, tuple(paths), tuple(captions))

    def __len__(self) -> int:
        return len(self.paths)

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of image `index`, from its header (cached)."""
        return _image_size(self.paths[index])


@functools.lru_cache(maxsize=65536)
def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def crop_box(width: int, height: int, resolution: int) -> tuple[tuple[int, int], int, int]:
    """How `load_image` cuts a `width` x `height` image: ((resized width, height), left, top)
    of the center crop, after resizing the shorter side to `resolution`."""
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return size, (size[0] - resolution) // 2, (size[1] - resolution) // 2


def load_image(path: Path, resolution: int) -> np.ndarray:
    """[resolution, resolution, 3] float32 in [-1, 1]: shorter side resized, center-cropped."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        size, left, top = crop_box(*img.size, resolution)
        img = img.resize(size, Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + resolution, top + resolution))
        pixels = np.asarray(img, dtype=np.float32)
    return pixels / 127.5 - 1.0


def sdxl_time_ids(width: int, height: int, resolution: int, flip: bool) -> np.ndarray:
    """SDXL's micro-conditioning of one training image, [6] float32: its original size (h, w),
    the top-left corner (top, left) of the crop in the resized image (of the mirrored image when
    `flip`: the crop is flipped after cutting), and the target size (resolution, resolution);
    as diffusers' train_text_to_image_sdxl.py computes them (Podell et al. 2023, 2.2)."""
    size, left, top = crop_box(width, height, resolution)
    if flip:
        left = size[0] - resolution - left
    return np.asarray([height, width, top, left, resolution, resolution], np.float32)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@functools.lru_cache(maxsize=4)
def _flip_bits(n: int, seed: int, epoch: int) -> np.ndarray:
    # A separate stream from the permutation's, so turning flips on changes nothing else.
    return np.random.default_rng([seed, epoch, 1]).random(n) < 0.5


@dataclasses.dataclass
class Stream:
    """The deterministic stream of examples; `position` counts examples handed out globally."""

    dataset: ImageCaptionFolder
    resolution: int
    seed: int
    random_flip: bool = True
    position: int = 0

    def example(self, k: int) -> tuple[int, bool]:
        """(index into the dataset, flipped) of stream position k."""
        n = len(self.dataset)
        epoch, i = divmod(k, n)
        return int(_epoch_order(n, self.seed, epoch)[i]), bool(
            self.random_flip and _flip_bits(n, self.seed, epoch)[i]
        )

    def _pixels(self, k: int) -> tuple[int, bool, np.ndarray]:
        """(the dataset index decoded, flipped, its pixels) for stream position k: the next good
        image of this epoch's order where k's own image fails to decode."""
        n = len(self.dataset)
        epoch, i = divmod(k, n)
        order = _epoch_order(n, self.seed, epoch)
        _, flip = self.example(k)
        for step in range(n):
            index = int(order[(i + step) % n])
            try:
                pixels = load_image(self.dataset.paths[index], self.resolution)
                break
            except Exception as e:
                # Raised on a worker thread (`batch`): the warning names this line.
                warnings.warn(
                    f"skipped corrupt image {self.dataset.paths[index]}: {e}",
                    CorruptImageWarning,
                    stacklevel=1,
                )
        else:
            raise DataError(f"no readable images in {self.dataset.root}")
        return index, flip, pixels[:, ::-1] if flip else pixels

    def batch(self, global_batch: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """The next global batch (or just `rows` of it, this host's share); advances position.

        Returns "images" [b, H, W, 3] float32 in [-1, 1], "captions" (b strings), "index" [b].
        """
        rows = rows or slice(0, global_batch)
        ks = range(self.position + rows.start, self.position + rows.stop)
        self.position += global_batch
        # Decoded on every core: PIL releases the GIL while it decodes and resizes. A row whose
        # image failed holds the image decoded in its place, with that image's caption and index.
        index, flip, pixels = zip(*parallel_map(self._pixels, ks), strict=True)
        return {
            "images": np.stack(pixels),
            "captions": [self.dataset.captions[i] for i in index],
            "index": np.asarray(index, np.int64),
            "flip": np.asarray(flip, bool),
        }


# ----------------------------------------------------------------------------- a toy dataset


_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}


def write_toy_dataset(folder, count: int = 32, size: int = 32, seed: int = 0) -> Path:
    """Images of a colored square or disk on a gray background, captioned ("a red disk").

    For tests and the tiny configs: learnable in a few hundred steps on the CPU. Half the
    captions go into `metadata.jsonl`, half into `.txt` files, to exercise both conventions.
    """
    from PIL import ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(count):
        color = list(_COLORS)[rng.integers(len(_COLORS))]
        shape = ("square", "disk")[rng.integers(2)]
        img = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        r = int(rng.integers(size // 5, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=_COLORS[color])
        name = f"{n:04d}.png"
        img.save(folder / name)
        caption = f"a {color} {shape}"
        if n % 2:
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
        else:
            rows.append({"file_name": name, "text": caption})
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder
