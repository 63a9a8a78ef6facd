"""Writing files and directories so that a reader never sees them half-written.

Everything kvforge leaves on disk for later (converted models, checkpoints, exports, compressed
starting points, caches) is written under a temporary name beside its destination, flushed to disk,
and only then renamed into place: a crash leaves either the old state or the new one, plus a
temporary folder that the next writer removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

TMP_INFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (the directory entry, not just the file data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file written (and closed) by someone else, e.g. a library's save function."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file below `root`, then the directories that hold them."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


@contextlib.contextmanager
def file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (e.g. with torch.save); on success it replaces `path` in
    one rename. On an exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file at `path` with `text` atomically."""
    with file(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read in 1 MiB chunks (manifests of checkpoints and exports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _writer_runs(tmp: Path) -> bool:
    """Whether the process a temporary is named after (`...tmp-<pid>`, `...tmp-old-<pid>`) runs on this host."""
    pid = tmp.name.rsplit(TMP_INFIX, 1)[-1].removeprefix("old-")
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Temporary folders a crashed `directory(out_dir)` left behind: those whose writer no longer runs. Another
    live writer's are its own (two processes may build the same folder at once, e.g. two runs on two GPUs drawing
    the same teacher samples; the last rename wins, and neither may delete what the other is writing)."""
    out_dir = Path(out_dir)
    return sorted(p for p in out_dir.parent.glob(f".{out_dir.name}{TMP_INFIX}*") if not _writer_runs(p))


@contextlib.contextmanager
def directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `out_dir` in one rename.

    On an exception the temporary folder is removed and `out_dir` is left as it was. Folders left by
    a crash (the process killed mid-write) are removed by the next call for the same `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(out_dir):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}{TMP_INFIX}{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if out_dir.exists():
            # Two renames cannot be one atomic step: between them no `out_dir` exists, which a reader
            # sees as "not there yet" (never as half-written), and the old copy is only deleted after.
            aside = out_dir.with_name(f".{out_dir.name}{TMP_INFIX}old-{os.getpid()}")
            os.rename(out_dir, aside)
            os.rename(tmp, out_dir)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
