"""Measuring text-to-image models on the "shapes" grammar (`jaxdiff.data.shapes`).

`evaluate` renders a balanced set of prompts (`eval_prompts`) with a model, reads each image back
with a deterministic pixel analyzer (`analyze`) and scores it against its prompt (`score`).

The analyzer (thresholds in `AnalyzerConfig`; areas as fractions of the image, lengths of its
width W). It is built for what a small diffusion model draws: colors a little off, noise, blurred
edges, small spurious blobs.

1. Palette: every pixel takes the nearest of the eight palette colors (Euclidean RGB), or none
   when it is farther than `max_color_distance` = 72 from all of them. (The closest two palette
   colors, orange and yellow, are 83 apart.)
2. Background: the most frequent palette color of the border pixels (of all pixels if no border
   pixel has one).
3. Colors present: those whose mask, opened by a 3x3 square, keeps `min_area` = 0.0075 of the
   image (31 px at 64 px; the smallest shape, a small triangle, has 128). Opening removes specks,
   noise and the 1-2 px rings that a blurred edge leaves where its half-way mixture resembles a
   third palette color (red on yellow blurs through orange).
4. Segmentation: a pixel near the background or a present color keeps it. Any other pixel (an
   edge blend, an off-palette smear) is explained as a blend bg + t (c - bg) of the background and
   the present color c whose segment is nearest: it is c when t >= 0.5, background otherwise, and
   none when farther than `max_color_distance` from every segment. So an edge falls where the
   blurred edge is half way.
5. Objects: 4-connected components of one non-background color whose opened core keeps
   `min_area`; an object is its component's pixels within 2 px of that core (which restores a
   triangle's apex, lost to the opening, and leaves out a ring of the same color attached at one
   point).
6. Box: the bounding box after trimming edge rows and columns holding fewer than 2 pixels or
   `trim` = 10% of the fullest one (stray pixels).
7. Shape, from the box: sides more unequal than `max_aspect` = 1.5 : 1 is "unknown"; the taper
   (mean row width of the top third / of the bottom third; 0.3 for a triangle, 1 for the others)
   below `triangle_taper` = 0.6 (or above 1/0.6, a triangle pointing down) is a triangle; the fill
   of the four corner sixteenths of the box at least `square_corners` = 0.55 is a square (1.0,
   against 0.35 for a circle), else a circle. Taper and corners measure where triangles, circles
   and squares differ; the whole-box fill ratio (1, pi/4, 1/2) moves more with blur and with the
   apex, and is reported (`Detection.fill`) but not used.
8. Size: large when the box's longer side is at least `large_width` = 0.375 W (drawn: 0.5 W
   large, 0.25 W small).
9. Position: the anchor nearest the box center. (The box center, not the centroid: a triangle's
   centroid sits a sixth of its height below the anchor it is drawn at.)

Scoring one image against its prompt:

* Detected objects are matched to the prompt's objects by color first (the largest unmatched
  detection of that color), then, for the prompt objects still unmatched, by position (the
  unmatched detection whose center is nearest the object's anchor). A prompt object with no
  detection left is missing: all four of its attributes count wrong.
* Checks: background once per image; color, shape, position and size once per prompt object.
  An attribute's accuracy pools its checks; "overall" is the mean over all checks; "all correct"
  is the fraction of images whose checks all pass and that have no extra detected object.
* Groups: a prompt is "held-out" when any of its objects is a held-out (color, shape) pair (the
  prompts of `eval_prompts` are either all seen or all held-out), and "one"/"two" by its number of
  objects. Reports show each group and all images together.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxdiff import atomic
from jaxdiff.data.shapes import (
    ANCHORS,
    COLORS,
    PALETTE,
    POSITIONS,
    Scene,
    caption,
    parse_caption,
    render,
    sample_scene,
)

ATTRIBUTES: tuple[str, ...] = ("background", "color", "shape", "position", "size")
ROWS: tuple[str, ...] = (*ATTRIBUTES, "overall", "all_correct")
GROUPS: tuple[str, ...] = ("seen/one", "seen/two", "held_out/one", "held_out/two", "all")

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], np.float32)  # [8, 3]
_ANCHOR_XY = np.array([ANCHORS[p] for p in POSITIONS], np.float32)  # [5, 2]


# ----------------------------------------------------------------------------- analyzer


@dataclasses.dataclass(frozen=True)
class AnalyzerConfig:
    """The analyzer's thresholds; see the module docstring for what each one decides."""

    max_color_distance: float = 72.0  # RGB distance, 0..255 units
    min_area: float = 0.0075  # of the image area, measured on the opened core
    max_aspect: float = 1.5  # box sides, long / short
    triangle_taper: float = 0.6  # mean row width, top third / bottom third
    square_corners: float = 0.55  # fill of the box's four corner sixteenths
    trim: float = 0.1  # of the fullest row / column
    large_width: float = 0.375  # of the image width


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object found in an image, with the same attribute words as `SceneObject`."""

    color: str
    shape: str  # "circle", "square", "triangle" or "unknown"
    size: str
    position: str
    area: int  # pixels
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open, pixels
    center: tuple[float, float]  # box center (x, y) as fractions of the width / height
    fill: float  # area / box area
    taper: float  # mean row width, top third of the box / bottom third (triangle ~0.3, else ~1)
    corners: float  # fill of the box's four corner sixteenths (square ~1, circle ~0.35)


@dataclasses.dataclass(frozen=True)
class Analysis:
    background: str | None  # None when no pixel is near a palette color
    objects: tuple[Detection, ...]  # largest first


def _to_uint8(image) -> np.ndarray:
    return np.clip(np.round(_as_rgb255(image)), 0, 255).astype(np.uint8)


def _as_rgb255(image) -> np.ndarray:
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32) * 255.0  # float images are in [0, 1]
    return image.astype(np.float32)


def classify_colors(image: np.ndarray, max_distance: float) -> np.ndarray:
    """Index into COLORS of the nearest palette color per pixel, -1 if none is near: [H, W]."""
    pixels = _as_rgb255(image)
    dist2 = ((pixels[:, :, None, :] - _PALETTE_RGB) ** 2).sum(-1)  # [H, W, 8]
    labels = dist2.argmin(-1)
    labels[dist2.min(-1) > max_distance**2] = -1
    return labels


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion; the image border counts as continuing the edge pixels."""
    p = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy : dy + h, dx : dx + w]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    return ~_erode(~mask)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal labels >= 0: component ids [H, W], -1 elsewhere.

    Min-label propagation, vectorized: each round a pixel takes the smallest id among its
    same-label neighbors; pointer jumping (id -> id of the pixel it names) shortens the rounds.
    """
    h, w = labels.shape
    valid = labels >= 0
    none = h * w
    ids = np.where(valid, np.arange(h * w).reshape(h, w), none)
    same_down = valid[1:] & (labels[1:] == labels[:-1])  # [H-1, W] pixel and the one below
    same_right = valid[:, 1:] & (labels[:, 1:] == labels[:, :-1])  # [H, W-1]
    while True:
        new = ids.copy()
        np.minimum(new[1:], np.where(same_down, ids[:-1], none), out=new[1:])
        np.minimum(new[:-1], np.where(same_down, ids[1:], none), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_right, ids[:, :-1], none), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_right, ids[:, 1:], none), out=new[:, :-1])
        flat = np.append(new.ravel(), none)
        new = np.where(valid, flat[flat[new]], none)  # pointer jumping
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(valid, ids, -1)


def segment_blends(image: np.ndarray, background: int, colors: Sequence[int], max_distance: float):
    """Each pixel as a blend of the background and one object color: [H, W] color index, or -1.

    For every candidate color c a pixel p is projected on the segment from the background color
    to c, p ~ bg + t (c - bg) with t in [0, 1]; the color whose segment is nearest explains it,
    and the pixel is c when t >= 0.5, the background otherwise, -1 when even the nearest segment
    is farther than `max_distance`. Edges then fall where a blurred or anti-aliased edge is half
    way, whatever palette color the half-way mixture happens to resemble.
    """
    pixels = _as_rgb255(image)
    bg = _PALETTE_RGB[background]  # [3]
    ends = _PALETTE_RGB[list(colors)] - bg  # [K, 3]
    rel = pixels - bg  # [H, W, 3]
    t = np.clip(rel @ ends.T / (ends**2).sum(-1), 0.0, 1.0)  # [H, W, K]
    residual2 = ((rel[:, :, None, :] - t[..., None] * ends) ** 2).sum(-1)  # [H, W, K]
    best = residual2.argmin(-1)  # [H, W]
    t_best = np.take_along_axis(t, best[..., None], -1)[..., 0]
    out = np.where(t_best >= 0.5, np.asarray(colors)[best], background)
    return np.where(residual2.min(-1) > max_distance**2, -1, out)


def _nearest_position(center) -> str:
    d = ((_ANCHOR_XY - np.asarray(center, np.float32)) ** 2).sum(-1)
    return POSITIONS[int(d.argmin())]


def _extent(profile: np.ndarray, min_count: float) -> tuple[int, int]:
    """First and one-past-last index where a row or column profile reaches min_count."""
    (idx,) = np.nonzero(profile >= min_count)
    return int(idx[0]), int(idx[-1]) + 1


def measure(mask: np.ndarray, color: str, config: AnalyzerConfig = AnalyzerConfig()) -> Detection:
    """Shape, size and position of one object's pixels (bool [H, W])."""
    h, w = mask.shape
    rows, cols = mask.sum(1), mask.sum(0)  # [H], [W]
    # Rows and columns at the box's edge holding a stray pixel or two do not widen it.
    y0, y1 = _extent(rows, min(max(2.0, config.trim * rows.max()), rows.max()))
    x0, x1 = _extent(cols, min(max(2.0, config.trim * cols.max()), cols.max()))
    box = mask[y0:y1, x0:x1]  # [bh, bw]
    bh, bw = box.shape
    widths = box.sum(1)  # [bh]
    third = max(1, bh // 3)
    taper = float(widths[:third].mean() / max(widths[-third:].mean(), 1.0))
    qy, qx = max(1, bh // 4), max(1, bw // 4)
    corners = float(
        np.mean(
            [
                box[:qy, :qx].mean(),
                box[:qy, -qx:].mean(),
                box[-qy:, :qx].mean(),
                box[-qy:, -qx:].mean(),
            ]
        )
    )
    if max(bw, bh) / min(bw, bh) > config.max_aspect:
        shape = "unknown"
    elif taper < config.triangle_taper or taper > 1 / config.triangle_taper:
        shape = "triangle"
    elif corners >= config.square_corners:
        shape = "square"
    else:
        shape = "circle"
    center = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h)
    return Detection(
        color=color,
        shape=shape,
        size="large" if max(bw / w, bh / h) >= config.large_width else "small",
        position=_nearest_position(center),
        area=int(mask.sum()),
        box=(x0, y0, x1, y1),
        center=center,
        fill=float(box.mean()),
        taper=taper,
        corners=corners,
    )


def analyze(image: np.ndarray, config: AnalyzerConfig = AnalyzerConfig()) -> Analysis:
    """Background and objects of an RGB image (uint8 [H, W, 3], or float in [0, 1])."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    h, w, _ = image.shape
    labels = classify_colors(image, config.max_color_distance)  # [H, W]

    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    counts = np.bincount(border[border >= 0], minlength=len(COLORS))
    if counts.sum() == 0:
        counts = np.bincount(labels[labels >= 0], minlength=len(COLORS))
    if counts.sum() == 0:
        return Analysis(background=None, objects=())
    bg = int(counts.argmax())

    # Which colors are present: those whose mask, opened by a 3x3 square, keeps min_area pixels.
    min_area = config.min_area * h * w
    cores = {c: _dilate(_erode(labels == c)) for c in range(len(COLORS)) if c != bg}
    present = [c for c, core in cores.items() if core.sum() >= min_area]
    if not present:
        return Analysis(background=COLORS[bg], objects=())
    # A pixel near the background or a present color keeps it; any other (a blend at an edge,
    # off-palette) is explained as a blend of the background and one present color.
    near = np.isin(labels, [bg, *present])
    blends = segment_blends(image, bg, present, config.max_color_distance)
    segments = np.where(near, labels, blends)  # [H, W]
    components = connected_components(np.where(segments == bg, -1, segments))

    objects = []
    core = np.zeros((h, w), bool)
    for c in present:
        core |= _dilate(_erode(segments == c))
    ids, core_areas = np.unique(components[core & (components >= 0)], return_counts=True)
    for cid, core_area in zip(ids, core_areas, strict=True):
        if core_area < min_area:
            continue  # specks and the thin rings blurred edges leave
        # Measured on the pixels within 2 px of its core: that restores a triangle's apex, and
        # keeps out a ring of the same color that an edge elsewhere left attached to it.
        pixels = components == cid
        pixels &= _dilate(_dilate(pixels & core))
        objects.append(measure(pixels, COLORS[int(segments[pixels][0])], config))
    objects.sort(key=lambda d: (-d.area, d.box))
    return Analysis(background=COLORS[bg], objects=tuple(objects))


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class Score:
    """The checks of one image against its prompt."""

    checks: dict[str, tuple[bool, ...]]  # attribute -> one entry per check
    matches: tuple[int | None, ...]  # per prompt object: index into analysis.objects, or None
    extra_objects: int  # detected objects matched to no prompt object
    errors: tuple[str, ...]  # what went wrong, in words

    @property
    def correct(self) -> int:
        return sum(sum(v) for v in self.checks.values())

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.checks.values())

    @property
    def all_correct(self) -> bool:
        return self.correct == self.total and self.extra_objects == 0


def match_objects(scene: Scene, analysis: Analysis) -> tuple[int | None, ...]:
    """Which detection stands for each prompt object: by color first, then by position."""
    unused = list(range(len(analysis.objects)))  # largest first
    matches: list[int | None] = [None] * len(scene.objects)
    for i, obj in enumerate(scene.objects):
        same_color = [j for j in unused if analysis.objects[j].color == obj.color]
        if same_color:
            matches[i] = same_color[0]
            unused.remove(same_color[0])
    for i, obj in enumerate(scene.objects):
        if matches[i] is None and unused:
            anchor = np.asarray(ANCHORS[obj.position])
            j = min(unused, key=lambda j: np.sum((anchor - analysis.objects[j].center) ** 2))
            matches[i] = j
            unused.remove(j)
    return tuple(matches)


def score(scene: Scene, analysis: Analysis) -> Score:
    """Check an analysis against the scene its prompt describes."""
    matches = match_objects(scene, analysis)
    checks = {"background": (analysis.background == scene.background,)}
    errors = []
    if not checks["background"][0]:
        errors.append(f"background: wanted {scene.background}, got {analysis.background}")
    for attr in ATTRIBUTES[1:]:
        checks[attr] = ()
    for i, (obj, j) in enumerate(zip(scene.objects, matches, strict=True)):
        found = analysis.objects[j] if j is not None else None
        if found is None:
            errors.append(f"object {i + 1} ({obj.color} {obj.shape}): missing")
        for attr in ATTRIBUTES[1:]:
            want = getattr(obj, attr)
            ok = found is not None and getattr(found, attr) == want
            checks[attr] += (ok,)
            if found is not None and not ok:
                errors.append(f"object {i + 1} {attr}: wanted {want}, got {getattr(found, attr)}")
    extra = len(analysis.objects) - sum(j is not None for j in matches)
    if extra:
        errors.append(f"{extra} extra object(s)")
    return Score(checks=checks, matches=matches, extra_objects=extra, errors=tuple(errors))


def group_of(scene: Scene) -> str:
    pairs = "held_out" if scene.held_out else "seen"
    return f"{pairs}/{'one' if len(scene.objects) == 1 else 'two'}"


# ----------------------------------------------------------------------------- evaluation

_EVAL_STREAM = 1  # keeps evaluation prompts apart from training scenes (stream 0)
_EVAL_GROUPS = (("seen", 1), ("seen", 2), ("held_out", 1), ("held_out", 2))


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts cycling through seen/held-out x one/two objects, so any prefix is balanced.

    Prompt `i` depends on (seed, i) alone. Held-out prompts use held-out pairs for every object.
    """
    prompts = []
    for i in range(n):
        pairs, n_objects = _EVAL_GROUPS[i % len(_EVAL_GROUPS)]
        rng = np.random.default_rng([_EVAL_STREAM, seed, i])
        prompts.append(caption(sample_scene(rng, n_objects=n_objects, pairs=pairs)))
    return prompts


@dataclasses.dataclass(frozen=True)
class Case:
    """One evaluated image."""

    index: int
    prompt: str
    scene: Scene
    image: np.ndarray  # [H, W, 3] uint8, as generated
    analysis: Analysis
    score: Score


@dataclasses.dataclass(frozen=True)
class Report:
    n: int
    seed: int
    accuracy: dict[str, dict[str, float]]  # group -> row -> fraction (nan for an empty group)
    counts: dict[str, int]  # group -> images
    scores: tuple[Score, ...]  # per prompt, in prompt order
    worst: tuple[Case, ...]  # failed images, fewest correct checks first


def _accuracy(scores: Sequence[Score]) -> dict[str, float]:
    if not scores:
        return dict.fromkeys(ROWS, math.nan)
    row = {}
    for attr in ATTRIBUTES:
        checks = [c for s in scores for c in s.checks[attr]]
        row[attr] = sum(checks) / len(checks)
    row["overall"] = sum(s.correct for s in scores) / sum(s.total for s in scores)
    row["all_correct"] = sum(s.all_correct for s in scores) / len(scores)
    return row


def evaluate(
    generate_fn: Callable[[list[str]], np.ndarray],
    n: int = 200,
    seed: int = 0,
    worst_k: int = 16,
    *,
    batch_size: int = 32,
    config: AnalyzerConfig = AnalyzerConfig(),
) -> Report:
    """Generate `eval_prompts(n, seed)` with `generate_fn` and score every image.

    `generate_fn(prompts) -> uint8 [N, H, W, 3]` is called on batches of exactly `batch_size`
    prompts (the last one padded by repeating its last prompt, so a jitted pipeline is traced
    once); the padding images are dropped.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be at least 1, not {n} and {batch_size}")
    prompts = eval_prompts(n, seed)
    scores: list[Score] = []
    groups: dict[str, list[Score]] = {g: [] for g in GROUPS}
    failed: list[tuple[tuple[float, int], Case]] = []
    for start in range(0, n, batch_size):
        batch = prompts[start : start + batch_size]
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        images = np.asarray(generate_fn(padded))
        if images.ndim != 4 or images.shape[0] != len(padded) or images.shape[-1] != 3:
            raise ValueError(
                f"generate_fn returned shape {images.shape} for {len(padded)} prompts; "
                "expected [N, H, W, 3]"
            )
        for k, (prompt, image) in enumerate(zip(batch, images, strict=False)):
            scene = parse_caption(prompt)
            analysis = analyze(image, config)
            s = score(scene, analysis)
            scores.append(s)
            groups[group_of(scene)].append(s)
            groups["all"].append(s)
            if not s.all_correct and worst_k > 0:
                case = Case(start + k, prompt, scene, _to_uint8(image), analysis, s)
                failed.append(((s.correct / s.total, start + k), case))
        failed = sorted(failed, key=lambda item: item[0])[:worst_k]
    return Report(
        n=n,
        seed=seed,
        accuracy={g: _accuracy(v) for g, v in groups.items()},
        counts={g: len(v) for g, v in groups.items()},
        scores=tuple(scores),
        worst=tuple(case for _, case in failed),
    )


def reference_generate_fn(size: int = 64) -> Callable[[list[str]], np.ndarray]:
    """A `generate_fn` that renders each prompt exactly: checks the analyzer, not a model."""
    return lambda prompts: np.stack([render(parse_caption(p), size) for p in prompts])


def vae_reconstruction_generate_fn(path=None) -> Callable[[list[str]], np.ndarray]:
    """A `generate_fn` that renders each prompt exactly and passes it through a model's VAE
    (encoded to the posterior mean, decoded): what the autoencoder alone keeps of a picture, an
    upper bound for the whole model. `path`: a model folder (None: the bundled model)."""
    import jax

    from jaxdiff.convert.diffusers import load_component, read_pipeline_configs
    from jaxdiff.models.build import module_for
    from jaxdiff.pipelines.bundled import bundled_model_dir
    from jaxdiff.pipelines.images import to_uint8

    path = Path(path) if path is not None else bundled_model_dir()
    vae_config, params = load_component(path / "vae")  # only the VAE's weights are read
    vae = module_for(vae_config)
    size = read_pipeline_configs(path)["unet"].sample_size * vae_config.downsampling_factor

    @jax.jit
    def round_trip(params, images):
        z = vae.apply({"params": params}, images, method=vae.encode).mean
        return (vae.apply({"params": params}, z, method=vae.decode) + 1.0) / 2.0

    def generate(prompts):
        images = np.stack([render(parse_caption(p), size) for p in prompts])
        out = round_trip(params, images.astype(np.float32) / 127.5 - 1.0)
        return to_uint8(np.asarray(out))

    return generate


# ----------------------------------------------------------------------------- output

_COLUMN_NAMES = {
    "seen/one": "seen 1",
    "seen/two": "seen 2",
    "held_out/one": "held-out 1",
    "held_out/two": "held-out 2",
    "all": "all",
}


def format_report(report: Report) -> str:
    """A plain-text table: accuracy in percent per attribute (rows) and prompt group (columns)."""
    width = max(len(c) for c in _COLUMN_NAMES.values()) + 2
    lines = [
        f"shapes evaluation: {report.n} prompts, seed {report.seed} "
        "(columns: seen / held-out pairs x 1 / 2 objects)",
        f"{'':<12}" + "".join(f"{_COLUMN_NAMES[g]:>{width}}" for g in GROUPS),
        f"{'images':<12}" + "".join(f"{report.counts[g]:>{width}}" for g in GROUPS),
    ]
    for row in ROWS:
        cells = []
        for g in GROUPS:
            v = report.accuracy[g][row]
            cells.append(f"{'-' if math.isnan(v) else f'{100 * v:.1f}':>{width}}")
        lines.append(f"{row.replace('_', ' '):<12}" + "".join(cells))
    return "\n".join(lines)


def wrap_text(draw, text: str, font, width: int) -> list[str]:
    """`text` broken at spaces into lines of at most `width` pixels in `font`."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def save_worst_grid(report: Report, path, *, columns: int = 4, cell: int = 128) -> Path:
    """Write the worst cases as a PNG grid: per case the exact rendering of its prompt, the
    generated image, the prompt and what the analyzer found wrong."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, text_lines, line_height = 6, 6, 12
    cell_w, cell_h = 2 * cell + 3 * pad, cell + 2 * pad + text_lines * line_height
    cases = report.worst
    rows = max(1, math.ceil(len(cases) / columns))
    grid = Image.new("RGB", (min(columns, max(1, len(cases))) * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if not cases:
        draw.text((pad, pad), f"no failures among {report.n} images", fill="black", font=font)
    for k, case in enumerate(cases):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        expected = render(case.scene, max(64, case.image.shape[0] // 8 * 8))
        for i, img in enumerate((expected, case.image)):
            tile = Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (x + pad + i * (cell + pad), y + pad))
        text = [f"#{case.index}: {case.prompt}", *case.score.errors]
        lines = [ln for t in text for ln in wrap_text(draw, t, font, cell_w - 2 * pad)]
        for i, line in enumerate(lines[:text_lines]):
            draw.text(
                (x + pad, y + cell + 2 * pad + i * line_height), line, fill="black", font=font
            )
    path = Path(path)
    atomic.write_file(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path
