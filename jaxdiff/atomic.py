"""Writing files and folders so that a reader never sees them half-written.

Everything is written next to its destination under a temporary name and renamed into place at
the end; on an error the temporary copy is removed and whatever was at the destination before is
left as it was. What is written gets the permissions a plain `open` or `mkdir` would give it
(0666 or 0777 less the process's umask), not the owner-only ones of `tempfile`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class DestinationError(ValueError):
    """A destination that cannot be written, found before any work is done: one line naming the
    path and the reason."""


def check_destination(path, *, folder: bool = False) -> None:
    """Raises `DestinationError` where `path` (a file, or with `folder` a folder) could not be
    written by `write_file` or `new_folder`, or filled by a command that writes inside it: an
    existing destination of the other kind, a parent that is a file, or a nearest existing
    folder that this process may not write in. Call it before the work whose result goes there,
    so a bad path costs nothing; the writers' own errors stay possible (a full disk)."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise DestinationError(f"{path}: is a folder, not a file")
    if folder and path.exists() and not path.is_dir():
        raise DestinationError(f"{path}: is a file, not a folder")
    # The nearest existing ancestor: the writers create the missing folders below it.
    nearest = path.absolute() if folder and path.is_dir() else path.absolute().parent
    while not nearest.exists() and not nearest.is_symlink() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise DestinationError(f"{path}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise DestinationError(f"{path}: cannot write in {nearest} (permission denied)")


def _temporary(path: Path, make: Callable[[Path], None]) -> Path:
    """A new, unused name beside `path`, created by `make` (which fails if the name exists)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
        try:
            make(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _new_file(tmp: Path) -> None:
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


@contextlib.contextmanager
def new_folder(out) -> Iterator[Path]:
    """Yields an empty temporary folder beside `out`; on success it becomes `out` (replacing an
    existing one, which is moved aside first and then deleted)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(out, os.mkdir)
    try:
        yield tmp
        if out.exists():
            old = _temporary(out, os.mkdir)
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_file(path, write: Callable[[str], None]) -> None:
    """Calls `write(temporary_path)`, then renames the result to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, _new_file)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            os.unlink(tmp)
