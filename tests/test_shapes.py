"""The shapes dataset (`jaxdiff.data.shapes`), its analyzer (`jaxdiff.eval.shapes`) and CLI."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import numpy as np
import pytest

from jaxdiff.cli import UsageError
from jaxdiff.data import cli as shapes_cli
from jaxdiff.data.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    LAYOUTS,
    PALETTE,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    caption,
    check_scene,
    dataset_scene,
    object_mask,
    parse_caption,
    render,
    sample_scene,
    write_dataset,
)
from jaxdiff.eval.shapes import (
    ATTRIBUTES,
    GROUPS,
    analyze,
    eval_prompts,
    evaluate,
    format_report,
    reference_generate_fn,
    save_worst_grid,
    score,
)

# The analyzer on the generator's own images: every attribute, every group.
REFERENCE_MIN_ACCURACY = 0.99
# On images perturbed as a small diffusion model might (noise of sigma 10/255, a Gaussian blur of
# sigma 0.7 px, a per-image color shift of up to +-20/255 per channel). 1.0 when this was written.
PERTURBED_MIN_ACCURACY = 0.97


# ----------------------------------------------------------------------------- helpers


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    out = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(padded, range(i, i + n), axis=axis) for i, w in enumerate(taps))
    return out


def _perturbed_generate_fn(seed: int):
    rng = np.random.default_rng(seed)

    def generate(prompts):
        images = []
        for prompt in prompts:
            image = _gaussian_blur(render(parse_caption(prompt)), sigma=0.7)
            image = image + rng.uniform(-20, 20, size=3) + rng.normal(0, 10, image.shape)
            images.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
        return np.stack(images)

    return generate


def _assert_accuracy(report, minimum):
    for group in GROUPS:
        for attr in ATTRIBUTES:
            acc = report.accuracy[group][attr]
            assert acc >= minimum, f"{group} {attr}: {acc:.3f} < {minimum}\n{format_report(report)}"


def _tiny_cli():
    parser = argparse.ArgumentParser(prog="jaxdiff")
    shapes_cli.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        args.fn(args)

    return run


# ----------------------------------------------------------------------------- grammar


def test_caption_round_trip_for_every_scene():
    one = [
        Scene(bg, (SceneObject(c, s, z, p),))
        for c, s, z, p, bg in itertools.product(COLORS, SHAPES, SIZES, POSITIONS, COLORS)
        if bg != c
    ]
    two = [
        Scene(bg, (SceneObject(c1, s1, z1, p1), SceneObject(c2, s2, z2, p2)))
        for ((p1, z1), (p2, z2)) in LAYOUTS
        for (c1, s1), (c2, s2) in itertools.product(itertools.product(COLORS, SHAPES), repeat=2)
        if c1 != c2
        for bg in COLORS
        if bg not in (c1, c2)
    ]
    assert len(one) == 8 * 3 * 2 * 5 * 7 and len(two) == 32 * 24 * 21 * 6
    for scene in one + two:
        check_scene(scene)
        assert parse_caption(caption(scene)) == scene


def test_caption_grammar():
    scene = Scene(
        "yellow",
        (
            SceneObject("red", "circle", "small", "left"),
            SceneObject("blue", "square", "large", "right"),
        ),
    )
    assert caption(scene) == (
        "a small red circle on the left and a large blue square on the right on a yellow background"
    )
    center = Scene("black", (SceneObject("white", "triangle", "large", "center"),))
    assert caption(center) == "a large white triangle in the center on a black background"
    for bad in (
        "a red circle on the left on a blue background",  # no size
        "a small red circle on the center on a blue background",
        "a small red circle in the left on a blue background",
        "a small pink circle on the left on a blue background",
        "a small red circle on the left",
        "a small red circle on the left on a blue background, 4k",
    ):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_layouts_follow_the_overlap_rule():
    opposite = {frozenset(("left", "right")), frozenset(("top", "bottom"))}
    expected = {
        ((p1, z1), (p2, z2))
        for p1, p2 in itertools.permutations(POSITIONS, 2)
        for z1, z2 in itertools.product(SIZES, SIZES)
        if frozenset((p1, p2)) in opposite or z1 == z2 == "small"
    }
    assert set(LAYOUTS) == expected and len(LAYOUTS) == 32
    assert not any(("center", "large") in layout for layout in LAYOUTS)
    # At the pixel level too, for every pair of shapes.
    for ((p1, z1), (p2, z2)), s1, s2 in itertools.product(LAYOUTS, SHAPES, SHAPES):
        a = object_mask(SceneObject("red", s1, z1, p1), 64)
        b = object_mask(SceneObject("blue", s2, z2, p2), 64)
        assert not (a & b).any()


def test_sampled_scenes_obey_the_rules():
    rng = np.random.default_rng(0)
    for pairs in ("seen", "held_out", "any"):
        for _ in range(300):
            scene = sample_scene(rng, pairs=pairs)
            check_scene(scene)
            if pairs == "seen":
                assert all(o.pair in SEEN_PAIRS for o in scene.objects)
            if pairs == "held_out":
                assert all(o.pair in HELD_OUT_PAIRS for o in scene.objects)
    with pytest.raises(ValueError, match="same color"):
        check_scene(
            Scene(
                "red",
                (
                    SceneObject("blue", "circle", "small", "left"),
                    SceneObject("blue", "square", "small", "right"),
                ),
            )
        )
    with pytest.raises(ValueError, match="overlap"):
        check_scene(
            Scene(
                "red",
                (
                    SceneObject("blue", "circle", "large", "center"),
                    SceneObject("green", "square", "small", "right"),
                ),
            )
        )


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [64, 128])
def test_render_geometry(size):
    for shape, width, position in itertools.product(SHAPES, SIZES, POSITIONS):
        obj = SceneObject("red", shape, width, position)
        image = render(Scene("blue", (obj,)), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        mask = (image == PALETTE["red"]).all(-1)
        assert mask.sum() + (image == PALETTE["blue"]).all(-1).sum() == size * size
        ys, xs = np.nonzero(mask)
        assert xs.max() + 1 - xs.min() == size // (4 if width == "small" else 2)
        anchor_x = {"left": 0.25, "right": 0.75}.get(position, 0.5) * size
        assert (xs.min() + xs.max() + 1) / 2 == anchor_x
        if shape == "triangle":  # pointing up
            rows = mask.sum(1)[ys.min() : ys.max() + 1]
            assert rows[0] < rows[-1] and np.all(np.diff(rows) >= 0)


def test_render_antialias_and_size_checks():
    scene = Scene("black", (SceneObject("white", "circle", "large", "center"),))
    smooth = render(scene, antialias=True)
    assert len(np.unique(smooth.reshape(-1, 3), axis=0)) > 2
    for size in (16, 60):
        with pytest.raises(ValueError, match="multiple of 8"):
            render(scene, size)


# ----------------------------------------------------------------------------- datasets


def test_training_scenes_never_hold_out_pairs_and_are_deterministic():
    scenes = [dataset_scene(7, i) for i in range(3000)]
    assert not any(o.pair in HELD_OUT_PAIRS for s in scenes for o in s.objects)
    assert {o.pair for s in scenes for o in s.objects} == set(SEEN_PAIRS)
    assert 0.4 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.6
    assert scenes[:50] == [dataset_scene(7, i) for i in range(50)]
    assert scenes[:50] != [dataset_scene(8, i) for i in range(50)]
    everything = [dataset_scene(7, i, exclude_held_out=False) for i in range(3000)]
    assert {o.pair for s in everything for o in s.objects} >= HELD_OUT_PAIRS


def test_write_dataset(tmp_path):
    out = write_dataset(tmp_path / "shapes", 12, seed=3, two_object_fraction=1.0)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [f"{i:05d}.png" for i in range(12)]
        + [f"{i:05d}.txt" for i in range(12)]
        + ["metadata.jsonl"]
    )
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:05d}.png" for i in range(12)]
    from PIL import Image

    for i, row in enumerate(rows):
        assert set(row) == {"file_name", "text"}
        assert (out / f"{i:05d}.txt").read_text().strip() == row["text"]
        scene = parse_caption(row["text"])
        assert scene == dataset_scene(3, i, two_object_fraction=1.0)
        assert len(scene.objects) == 2 and not scene.held_out
        np.testing.assert_array_equal(np.asarray(Image.open(out / row["file_name"])), render(scene))

    # Deterministic, and a longer dataset extends a shorter one.
    again = write_dataset(tmp_path / "again", 20, seed=3, two_object_fraction=1.0)
    for i in range(12):
        for ext in ("png", "txt"):
            name = f"{i:05d}.{ext}"
            assert (again / name).read_bytes() == (out / name).read_bytes()


def test_write_dataset_refuses_to_overwrite_and_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    out.mkdir()
    write_dataset(out, 2, seed=0)  # an existing empty folder is fine
    before = (out / "00000.txt").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(out, 3, seed=1)
    assert sorted(p.name for p in out.iterdir())[-1] == "metadata.jsonl"
    assert (out / "00000.txt").read_text() == before and not (out / "00002.png").exists()

    write_dataset(out, 3, seed=1, overwrite=True)
    assert (out / "00002.png").exists()

    # A failure part way leaves neither a partial folder nor temporary folders behind.
    from jaxdiff.data import shapes

    calls = []

    def failing_render(scene, size=64, **kw):
        calls.append(scene)
        if len(calls) % 3 == 0:
            raise RuntimeError("disk full")
        return render(scene, size, **kw)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "new", 5, seed=0)
    with pytest.raises(RuntimeError):
        write_dataset(out, 5, seed=0, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    assert (out / "00002.png").exists() and not (out / "00003.png").exists()


# ----------------------------------------------------------------------------- analyzer


def test_analyzer_reads_the_generators_images():
    report = evaluate(reference_generate_fn(), n=400, seed=0)
    assert report.counts == {g: 100 for g in GROUPS[:4]} | {"all": 400}
    _assert_accuracy(report, REFERENCE_MIN_ACCURACY)
    assert report.accuracy["all"]["all_correct"] >= REFERENCE_MIN_ACCURACY


def test_analyzer_reads_larger_and_antialiased_images():
    def generate(prompts):
        return np.stack([render(parse_caption(p), 128, antialias=True) for p in prompts])

    _assert_accuracy(evaluate(generate, n=40, seed=1), REFERENCE_MIN_ACCURACY)


def test_analyzer_is_robust_to_noise_blur_and_color_shifts():
    report = evaluate(_perturbed_generate_fn(0), n=200, seed=2)
    _assert_accuracy(report, PERTURBED_MIN_ACCURACY)


def test_analyzer_ignores_small_blobs():
    scene = Scene("white", (SceneObject("red", "square", "large", "center"),))
    image = render(scene)
    image[2:6, 2:6] = PALETTE["blue"]  # 16 px, under the minimum area
    image[58:60, 40:60] = PALETTE["green"]  # a thin streak
    analysis = analyze(image)
    assert [o.color for o in analysis.objects] == ["red"]
    assert score(scene, analysis).all_correct


def _variant(scene: Scene, attr: str) -> Scene:
    """A valid scene differing from `scene` in exactly `attr` (of its first object)."""
    words = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    if attr == "background":
        candidates = [dataclasses.replace(scene, background=c) for c in COLORS]
    else:
        first = scene.objects[0]
        candidates = [
            dataclasses.replace(
                scene, objects=(dataclasses.replace(first, **{attr: w}), *scene.objects[1:])
            )
            for w in words[attr]
        ]
    for candidate in candidates:
        if candidate == scene:
            continue
        try:
            check_scene(candidate)
        except ValueError:
            continue
        return candidate
    raise AssertionError(f"no variant of {scene} in {attr}")


@pytest.mark.parametrize("attr", ATTRIBUTES)
@pytest.mark.parametrize("n_objects", [1, 2])
def test_analyzer_scores_a_wrong_attribute_wrong(attr, n_objects):
    rng = np.random.default_rng(5)
    for _ in range(8):
        scene = sample_scene(rng, n_objects=n_objects, pairs="any")
        if n_objects == 2 and attr in ("position", "size"):
            # Keep the layout valid: the first object small and in a place that can move.
            scene = Scene(
                scene.background,
                (
                    dataclasses.replace(scene.objects[0], size="small", position="left"),
                    dataclasses.replace(scene.objects[1], size="small", position="right"),
                ),
            )
        wrong = _variant(scene, attr)
        result = score(scene, analyze(render(wrong)))
        failed = {
            (a, i) for a, checks in result.checks.items() for i, ok in enumerate(checks) if not ok
        }
        assert failed == {(attr, 0)}, (caption(scene), caption(wrong), result.errors)
        assert not result.all_correct


def test_missing_and_extra_objects():
    two = Scene(
        "black",
        (
            SceneObject("red", "circle", "small", "top"),
            SceneObject("blue", "square", "large", "bottom"),
        ),
    )
    one = Scene("black", two.objects[:1])
    missing = score(two, analyze(render(one)))
    assert missing.checks["background"] == (True,)
    for attr in ATTRIBUTES[1:]:
        assert missing.checks[attr] == (True, False)
    extra = score(one, analyze(render(two)))
    assert extra.correct == extra.total and extra.extra_objects == 1 and not extra.all_correct


# ----------------------------------------------------------------------------- evaluation


def test_eval_prompts_are_balanced_and_deterministic():
    prompts = eval_prompts(40, seed=0)
    assert prompts == eval_prompts(40, seed=0) and prompts[:8] == eval_prompts(8, seed=0)
    assert prompts != eval_prompts(40, seed=1)
    scenes = [parse_caption(p) for p in prompts]
    for i, scene in enumerate(scenes):
        check_scene(scene)
        assert scene.held_out == (i % 4 >= 2) and len(scene.objects) == 1 + i % 2
        if scene.held_out:
            assert all(o.pair in HELD_OUT_PAIRS for o in scene.objects)


def test_evaluate_batches_reports_and_worst_grid(tmp_path):
    calls = []

    def swap_colors(prompts):  # a "model" that paints every object in the next palette color
        calls.append(len(prompts))
        images = []
        for p in prompts:
            scene = parse_caption(p)
            used = {scene.background, *(o.color for o in scene.objects)}
            objects = []
            for o in scene.objects:
                free = [c for c in COLORS if c not in used]
                objects.append(dataclasses.replace(o, color=free[0]))
                used.add(free[0])
            images.append(render(Scene(scene.background, tuple(objects))))
        return np.stack(images)

    report = evaluate(swap_colors, n=10, seed=0, worst_k=3, batch_size=4)
    assert calls == [4, 4, 4]  # the last batch padded to a full one
    assert len(report.scores) == 10 and len(report.worst) == 3
    assert report.accuracy["all"]["color"] == 0.0 and report.accuracy["all"]["shape"] == 1.0
    assert report.accuracy["all"]["all_correct"] == 0.0
    table = format_report(report)
    for word in ("background", "color", "shape", "position", "size", "overall", "all correct"):
        assert word in table
    assert "held-out 2" in table
    from PIL import Image

    grid = Image.open(save_worst_grid(report, tmp_path / "worst.png"))
    assert grid.size[0] > 3 * 128
    perfect = evaluate(reference_generate_fn(), n=4, seed=0)
    assert perfect.worst == () and save_worst_grid(perfect, tmp_path / "none.png").exists()

    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda prompts: np.zeros((1, 64, 64, 3), np.uint8), n=2, seed=0, batch_size=2)


# ----------------------------------------------------------------------------- CLI


def test_cli_make_shapes(tmp_path, capsys):
    run = _tiny_cli()
    out = tmp_path / "data"
    run("make-shapes", out, "--n", 3, "--seed", 1, "--size", 32)
    assert len(list(out.glob("*.png"))) == 3 and "wrote" in capsys.readouterr().out
    with pytest.raises(UsageError, match="not empty"):
        run("make-shapes", out, "--n", 3)
    run("make-shapes", out, "--n", 4, "--force")
    assert len(list(out.glob("*.png"))) == 4
    for bad in (["--n", 0], ["--size", 60], ["--two-object-fraction", 1.5]):
        with pytest.raises(UsageError, match="make-shapes: --"):
            run("make-shapes", tmp_path / "other", *bad)
    assert not (tmp_path / "other").exists()


def test_cli_eval_shapes(tmp_path, capsys):
    run = _tiny_cli()
    run("eval-shapes", "--reference", "--n", 8, "--worst", tmp_path / "worst.png")
    printed = capsys.readouterr().out
    assert "all correct" in printed and (tmp_path / "worst.png").exists()
    assert printed.count("100.0") >= 7 * 5
    with pytest.raises(UsageError, match="at most one"):
        run("eval-shapes", "--reference", "--model", tmp_path)
    with pytest.raises(UsageError, match="at most one of --reference and --vae-reconstruction"):
        run("eval-shapes", "--reference", "--vae-reconstruction")
    with pytest.raises(UsageError, match="not a folder"):
        run("eval-shapes", "--vae-reconstruction", "--model", tmp_path / "missing")
    with pytest.raises(
        UsageError, match="--steps, --sampler set a model's sampling; not with --vae-recon"
    ):
        run("eval-shapes", "--vae-reconstruction", "--steps", 5, "--sampler", "euler")
    with pytest.raises(UsageError, match="--n"):
        run("eval-shapes", "--reference", "--n", 0)
    with pytest.raises(UsageError, match="--steps"):
        run("eval-shapes", "--model", tmp_path, "--steps", 0)
    with pytest.raises(UsageError, match="eval-shapes: --guidance must be a finite number"):
        run("eval-shapes", "--model", tmp_path, "--guidance", "nan")  # was a traceback
    with pytest.raises(UsageError, match="not a folder"):
        run("eval-shapes", "--model", tmp_path / "missing")
    with pytest.raises(UsageError, match="unknown sampler 'nope'"):
        run("eval-shapes", "--model", tmp_path, "--sampler", "nope")
