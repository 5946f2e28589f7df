"""jaxdiff.atomic: files and folders appear whole, with the permissions a plain open or mkdir
would give them."""

import os
import stat

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
