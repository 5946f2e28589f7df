"""jaxdiff.atomic: files and folders appear whole, with the permissions a plain open or mkdir
would give them."""

import os
import stat
from pathlib import Path

import pytest

from jaxdiff import atomic


@pytest.fixture
def umask():
    """Sets the process umask for one test; restores the previous one after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
    "mask, file_mode, dir_mode",
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
    ids=["umask-022", "umask-077"],
)
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    path = tmp_path / "image.png"
    atomic.write_file(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new" and _mode(path) == file_mode
    with atomic.new_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert _mode(tmp_path / "model") == dir_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "model"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def failing(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_file(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]

    atomic.write_file(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic.new_folder(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.new_folder(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("conversion failed")
    assert [p.name for p in out.iterdir()] == ["a"]
    with atomic.new_folder(out) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_destination_is_checked_before_anything_is_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    (tmp_path / "folder").mkdir()
    for path, folder, reason in [
        (blocker / "x.png", False, f"{blocker} is a file, not a folder"),
        (blocker / "deeper" / "model", True, f"{blocker} is a file, not a folder"),
        (tmp_path / "folder", False, "is a folder, not a file"),
        (blocker, True, "is a file, not a folder"),
    ]:
        with pytest.raises(atomic.DestinationError) as e:
            atomic.check_destination(path, folder=folder)
        assert str(e.value) == f"{path}: {reason}"
    # Missing folders are the writers' to create; an existing one may be written in or replaced.
    atomic.check_destination(tmp_path / "new" / "deeper" / "x.png")
    atomic.check_destination(tmp_path / "folder", folder=True)
    atomic.check_destination(blocker)  # a file replaced whole
    assert blocker.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file",
        "folder",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(atomic.DestinationError, match="cannot write in"):
        atomic.check_destination(locked / "new" / "x.png")


def _blocked_commands(tmp):
    """Each command that writes, given an output below a file (`tmp`/a-file)."""
    out = f"{tmp}/a-file/out"
    repo = Path(__file__).parents[1]
    return {
        "generate": ["generate", "p", "--out", f"{out}.png"],
        "img2img": ["img2img", "p", "--image", f"{tmp}/a.png", "--strength", ".5", "--out", out],
        "init": ["init", "tiny", out],
        "convert": ["convert", str(tmp), out],
        "export": ["export", str(tmp), out],
        "train": [
            "train",
            str(repo / "configs" / "tiny.py"),
            "--workdir",
            out,
            "--set",
            f"data_dir={tmp}",
        ],
        "make-shapes": ["make-shapes", out],
        "eval-shapes": ["eval-shapes", "--reference", "--worst", f"{out}.png"],
        "bench": ["bench", "--rows", "conv", "--json", f"{out}.json"],
    }


@pytest.mark.parametrize("command", list(_blocked_commands("T")))
def test_every_command_refuses_an_output_it_cannot_write_before_its_work(
    tmp_path, capsys, monkeypatch, command
):
    """One line naming the output and why, exit status 2, and nothing written or run: before
    these checks the commands ran (generation, conversion, a whole benchmark) and then failed
    with a traceback."""
    from PIL import Image

    import jaxdiff.cli

    (tmp_path / "a-file").write_text("kept")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    monkeypatch.setattr(jaxdiff.cli, "_pipeline", lambda *a: pytest.fail("a model was loaded"))
    assert jaxdiff.cli.main(_blocked_commands(tmp_path)[command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/a-file is a file, not a folder" in err, err
    assert (tmp_path / "a-file").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a.png"]


def test_an_image_command_refuses_a_folder_as_its_output(tmp_path, capsys):
    """`--out results/` or an existing folder was written as `results.png` beside it."""
    import jaxdiff.cli

    for out, example in ((str(tmp_path), tmp_path), (f"{tmp_path}/new/", tmp_path / "new")):
        assert jaxdiff.cli.main(["generate", "p", "--out", out]) == 2
        err = capsys.readouterr().err
        message = f"--out {out}: is a folder; give a file name, such as {example / 'out.png'}"
        assert err == f"jaxdiff: error: {message}\n", err
    assert list(tmp_path.iterdir()) == [] and not tmp_path.with_suffix(".png").exists()
