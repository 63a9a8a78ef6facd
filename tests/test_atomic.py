import os
import subprocess
import sys

import pytest

from kvforge import atomic


def test_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with atomic.directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not out.exists()  # nothing visible while it is being written
    assert (out / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError):
        with atomic.directory(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (out / "a.txt").read_text() == "one"  # the old copy survives a failed write
    assert atomic.stale_temporaries(out) == []

    with atomic.directory(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_leftovers_of_a_killed_writer_are_removed_by_the_next(tmp_path):
    out = tmp_path / "model"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".model{atomic.TMP_INFIX}{int(ended.stdout)}"  # a writer that no longer runs
    killed.mkdir()
    (killed / "partial.bin").write_bytes(b"\0" * 10)
    assert atomic.stale_temporaries(out) == [killed]
    with atomic.directory(out) as tmp:
        (tmp / "ok").write_text("x")
    assert not killed.exists() and (out / "ok").is_file()


def test_a_concurrent_writers_temporary_is_left_alone(tmp_path):
    """Two processes building the same folder (two runs sampling the same teacher samples on two GPUs): neither
    deletes the other's temporary, and the last complete one wins."""
    out = tmp_path / "model"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        try:
            other = tmp_path / f".model{atomic.TMP_INFIX}{writer.pid}"
            other.mkdir()
            (other / "half.bin").write_bytes(b"\0" * 10)
            assert atomic.stale_temporaries(out) == []
            with atomic.directory(out) as tmp:
                (tmp / "mine").write_text("x")
            assert (other / "half.bin").is_file() and (out / "mine").is_file()
        finally:
            writer.kill()


def test_write_text(tmp_path):
    path = tmp_path / "sub" / "state.json"
    atomic.write_text(path, "{}")
    atomic.write_text(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    assert os.listdir(path.parent) == ["state.json"]


def test_sha256_file(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20) + b"tail")
    assert atomic.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_replaces_only_when_complete(tmp_path):
    path = tmp_path / "sub" / "stats.pt"
    with atomic.file(path) as tmp:
        tmp.write_bytes(b"one")
    with pytest.raises(RuntimeError):
        with atomic.file(path) as tmp:
            tmp.write_bytes(b"ha")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.pt"]  # the temporary file is gone
