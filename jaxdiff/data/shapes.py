"""The procedural captioned "shapes" dataset: flat shapes on a plain background, with captions.

A scene is one or two objects on a background. Each object has four attributes:

    color      red (220,30,30)  green (30,160,60)  blue (30,60,220)   yellow (240,220,40)
               purple (140,50,180)  orange (245,140,20)  white (245,245,245)  black (15,15,15)
    shape      circle, square, triangle (pointing up)
    size       small: bounding box S/4 wide; large: S/2 wide (S = image width; 16 / 32 px at 64)
    position   left, right, top, bottom: centered a quarter of the way in from that edge, so the
               anchors are (x, y) = (S/4, S/2), (3S/4, S/2), (S/2, S/4), (S/2, 3S/4); center (S/2, S/2)

The background is one of the same eight colors. Captions follow one grammar:

    caption    := object [" and " object] " on a " COLOR " background"
    object     := "a " SIZE " " COLOR " " SHAPE " " place
    place      := "on the " ("left" | "right" | "top" | "bottom") | "in the center"

e.g. "a small red circle on the left and a large blue square on the right on a yellow background".

Rules every sampled scene obeys:

* No object has the background's color, and two objects have two different colors (so that an
  analyzer can separate them by color alone).
* Two objects never overlap: their bounding boxes may touch but not intersect. At the anchors
  above this leaves exactly these layouts (`LAYOUTS`, 32 ordered pairs):
    - opposite positions (left+right, top+bottom): any two sizes;
    - adjacent positions (e.g. left+top) and center+edge: both objects small.
  A large object at the center therefore never shares an image.
* The (color, shape) pairs in `HELD_OUT_PAIRS` (green triangle, purple circle, orange square,
  white circle) never appear in a training set; they measure compositional generalization.

Rendering is flat fills of pure palette colors with no anti-aliasing by default (exact colors keep
the analysis in `jaxdiff.eval.shapes` robust); `antialias=True` supersamples 4x4 instead. Pixel
(i, j) is inside a shape when its center (j + 0.5, i + 0.5) is, so at sizes divisible by 8 every
bounding box is exactly S/4 or S/2 pixels wide.

Randomness: dataset image `i` of seed `s` depends on (s, i) only, never on how many images are
written, so a larger dataset extends a smaller one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np

from jaxdiff import atomic

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Held out of training: (color, shape).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "circle"), ("orange", "square"), ("white", "circle")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLORS, SHAPES))
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

# Anchors and widths as fractions of the image width.
ANCHORS: dict[str, tuple[float, float]] = {  # (x, y)
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
WIDTHS: dict[str, float] = {"small": 0.25, "large": 0.5}

MIN_IMAGE_SIZE = 32


# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One flat shape: its color, kind of shape, size and position, each a grammar word."""

    color: str
    shape: str
    size: str
    position: str

    def __post_init__(self):
        for field, allowed in (
            ("color", COLORS),
            ("shape", SHAPES),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; one of {allowed}")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background color and one or two objects, in caption order."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        if self.background not in COLORS:
            raise ValueError(f"unknown background {self.background!r}; one of {COLORS}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, not {len(self.objects)}")
        object.__setattr__(self, "objects", tuple(self.objects))

    @property
    def held_out(self) -> bool:
        """True when any object is a held-out (color, shape) pair."""
        return any(o.pair in HELD_OUT_PAIRS for o in self.objects)


def _box(position: str, size: str) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1), half-open, as fractions of the image width."""
    (cx, cy), half = ANCHORS[position], WIDTHS[size] / 2
    return (cx - half, cy - half, cx + half, cy + half)


def boxes_intersect(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether two (position, size) placements overlap (touching edges do not count)."""
    ax0, ay0, ax1, ay1 = _box(*a)
    bx0, by0, bx1, by1 = _box(*b)
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


# Every ordered pair of (position, size) placements two objects may take in one image.
LAYOUTS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = tuple(
    (a, b)
    for a in itertools.product(POSITIONS, SIZES)
    for b in itertools.product(POSITIONS, SIZES)
    if a[0] != b[0] and not boxes_intersect(a, b)
)


def check_scene(scene: Scene) -> None:
    """Raise ValueError unless the scene obeys the dataset's rules (colors and overlap)."""
    colors = [o.color for o in scene.objects]
    if scene.background in colors:
        raise ValueError(f"an object has the background's color {scene.background!r}")
    if len(set(colors)) != len(colors):
        raise ValueError("two objects have the same color")
    if len(scene.objects) == 2:
        a, b = ((o.position, o.size) for o in scene.objects)
        if (a, b) not in LAYOUTS:
            raise ValueError(f"objects at {a} and {b} overlap")


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int | None = None,
    two_object_fraction: float = 0.5,
    pairs: str = "seen",
) -> Scene:
    """A random valid scene.

    n_objects: 1 or 2, or None for two objects with probability `two_object_fraction`.
    pairs: "seen" (no held-out pair), "held_out" (every object a held-out pair) or "any".
    """
    allowed = {"seen": SEEN_PAIRS, "held_out": tuple(sorted(HELD_OUT_PAIRS)), "any": ALL_PAIRS}
    if pairs not in allowed:
        raise ValueError(f"pairs must be one of {tuple(allowed)}, not {pairs!r}")
    if n_objects is None:
        n_objects = 2 if rng.random() < two_object_fraction else 1
    if n_objects == 1:
        placements = [(POSITIONS[rng.integers(5)], SIZES[rng.integers(2)])]
    elif n_objects == 2:
        placements = list(LAYOUTS[rng.integers(len(LAYOUTS))])
    else:
        raise ValueError(f"n_objects must be 1 or 2, not {n_objects}")
    objects = []
    for position, size in placements:
        choices = [p for p in allowed[pairs] if p[0] not in {o.color for o in objects}]
        color, shape = choices[rng.integers(len(choices))]
        objects.append(SceneObject(color, shape, size, position))
    backgrounds = [c for c in COLORS if c not in {o.color for o in objects}]
    return Scene(backgrounds[rng.integers(len(backgrounds))], tuple(objects))


# ----------------------------------------------------------------------------- captions


def caption(scene: Scene) -> str:
    """The scene's caption in the grammar of the module docstring."""

    def place(position):
        return "in the center" if position == "center" else f"on the {position}"

    parts = [f"a {o.size} {o.color} {o.shape} {place(o.position)}" for o in scene.objects]
    return f"{' and '.join(parts)} on a {scene.background} background"


_WORDS = {k: "|".join(v) for k, v in (("c", COLORS), ("s", SHAPES), ("z", SIZES))}
_OBJECT = (
    rf"a ({_WORDS['z']}) ({_WORDS['c']}) ({_WORDS['s']}) "
    r"(?:on the (left|right|top|bottom)|in the (center))"
)
_CAPTION = re.compile(rf"{_OBJECT}(?: and {_OBJECT})? on a ({_WORDS['c']}) background")


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; ValueError when the text is not in the grammar.

    Only the grammar is checked, not the dataset's rules: see `check_scene`.
    """
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    g = m.groups()
    objects = [
        SceneObject(color=c, shape=s, size=z, position=p or center)
        for z, c, s, p, center in (g[0:5], g[5:10])
        if z is not None
    ]
    return Scene(background=g[10], objects=tuple(objects))


# ----------------------------------------------------------------------------- rendering


def check_image_size(size: int) -> None:
    if size < MIN_IMAGE_SIZE or size % 8:
        raise ValueError(f"image size must be a multiple of 8, at least {MIN_IMAGE_SIZE}: {size}")


def object_mask(obj: SceneObject, size: int, supersample: int = 1) -> np.ndarray:
    """Which pixels of a [size*supersample]^2 image the object covers: bool [H, W]."""
    n = size * supersample
    centers = (np.arange(n) + 0.5) / n  # pixel centers as fractions of the width
    x, y = centers[None, :], centers[:, None]
    (cx, cy), half = ANCHORS[obj.position], WIDTHS[obj.size] / 2
    if obj.shape == "square":
        return (np.abs(x - cx) < half) & (np.abs(y - cy) < half)
    if obj.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 < half**2
    # An upright isosceles triangle as tall as it is wide: apex at the top of the box.
    depth = y - (cy - half)
    return (depth >= 0) & (depth < 2 * half) & (np.abs(x - cx) < depth / 2)


def render(scene: Scene, size: int = 64, *, antialias: bool = False) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] RGB image."""
    check_image_size(size)
    ss = 4 if antialias else 1
    image = np.empty((size * ss, size * ss, 3), np.uint8)
    image[:] = PALETTE[scene.background]
    for obj in scene.objects:
        image[object_mask(obj, size, ss)] = PALETTE[obj.color]
    if antialias:
        image = image.reshape(size, ss, size, ss, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return image


# ----------------------------------------------------------------------------- datasets

_DATASET_STREAM = 0  # keeps training scenes and evaluation prompts (jaxdiff.eval) apart


def dataset_scene(
    seed: int, index: int, *, two_object_fraction: float = 0.5, exclude_held_out: bool = True
) -> Scene:
    """Scene `index` of the dataset with this seed (a function of (seed, index) alone)."""
    rng = np.random.default_rng([_DATASET_STREAM, seed, index])
    pairs = "seen" if exclude_held_out else "any"
    return sample_scene(rng, two_object_fraction=two_object_fraction, pairs=pairs)


def write_dataset(
    out_dir,
    n: int,
    seed: int,
    *,
    size: int = 64,
    two_object_fraction: float = 0.5,
    exclude_held_out: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `n` images as `00000.png` + `00000.txt` (its caption) and a `metadata.jsonl` with
    {"file_name", "text"} per line (the Hugging Face imagefolder layout).

    The folder is written next to `out_dir` and renamed into place at the end, so a failure never
    leaves a partial dataset. An existing non-empty `out_dir` is an error (FileExistsError) unless
    `overwrite=True`, which replaces it.
    """
    from PIL import Image

    check_image_size(size)
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], not {two_object_fraction}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --force)")
    digits = max(5, len(str(n - 1)))
    with atomic.new_folder(out) as tmp, open(tmp / "metadata.jsonl", "w") as metadata:
        for i in range(n):
            scene = dataset_scene(
                seed,
                i,
                two_object_fraction=two_object_fraction,
                exclude_held_out=exclude_held_out,
            )
            name, text = f"{i:0{digits}d}", caption(scene)
            Image.fromarray(render(scene, size)).save(tmp / f"{name}.png")
            (tmp / f"{name}.txt").write_text(text + "\n")
            metadata.write(json.dumps({"file_name": f"{name}.png", "text": text}) + "\n")
    return out
