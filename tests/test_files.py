"""medst_fast.files: the atomic write, stale-temp cleanup, sha256 and the JSON-object reader every writer shares."""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from medst_fast import files


def _entries(folder):
    return sorted(os.listdir(folder))


def test_atomic_writer_replaces_the_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with files.atomic_writer(p, "w") as f:
        f.write("new ünïcode")
        assert p.read_text() == "old"  # nothing visible before the block ends
        assert os.path.basename(f.name).startswith(files.TMP_PREFIX) and f.name.endswith("-out.txt")
    assert p.read_text(encoding="utf-8") == "new ünïcode"
    assert _entries(tmp_path) == ["out.txt"]


def test_atomic_writer_keeps_the_old_file_when_the_body_raises(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_writer(p, "wb") as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt
    assert p.read_bytes() == b"old"
    assert _entries(tmp_path) == ["out.bin"]  # the temp is gone too


def test_atomic_write_bytes_and_str_into_a_new_folder(tmp_path):
    files.atomic_write(tmp_path / "a" / "x.bin", b"\x00\x01")
    files.atomic_write(tmp_path / "a" / "y.txt", "line\n")
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "y.txt").read_bytes() == b"line\n"  # no newline translation
    assert _entries(tmp_path / "a") == ["x.bin", "y.txt"]


@pytest.mark.skipif(files.fcntl is None, reason="no fcntl: temps are not locked on this platform")
def test_atomic_write_removes_what_a_killed_write_of_the_same_file_left(tmp_path):
    left = files.temp_name(tmp_path / "meta.json")
    open(left, "w").close()  # its writer was killed: nobody holds it
    other = files.temp_name(tmp_path / "studies.csv")
    open(other, "w").close()
    files.atomic_write(tmp_path / "meta.json", "{}")
    assert _entries(tmp_path) == sorted(["meta.json", os.path.basename(other)])
    with files.atomic_writer(tmp_path / "studies.csv", clean=False) as f:  # a cache writer's choice
        f.write("x")
    assert os.path.basename(other) in _entries(tmp_path)


def test_atomic_writer_refuses_a_read_or_append_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with files.atomic_writer(tmp_path / "x", "a"):
            pass
    assert _entries(tmp_path) == []


def _hold(path, ready):
    """A child process that holds an flock on ``path`` until killed (a live writer elsewhere)."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "open(sys.argv[2], 'w').close(); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "lock holder did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.skipif(files.fcntl is None, reason="no fcntl: temps are not locked on this platform")
def test_remove_stale_temps_removes_unheld_and_keeps_held(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = folder / f"{files.TMP_PREFIX}111-0123456789ab-ckpt.pt"  # left by a killed writer
    dead.write_bytes(b"half")
    dead_dir = folder / f"{files.TMP_PREFIX}112-0123456789ab-final"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"x")
    held = folder / f"{files.TMP_PREFIX}113-0123456789ab-metrics.csv"
    held.write_bytes(b"being written")
    keep = folder / "ckpt.pt"
    keep.write_bytes(b"a real file")
    proc = _hold(held, tmp_path / "ready")
    try:
        removed = files.remove_stale_temps(str(folder))
    finally:
        proc.kill()
        proc.wait()
    assert sorted(removed) == sorted([str(dead), str(dead_dir)])
    assert _entries(folder) == sorted([held.name, keep.name])
    assert files.remove_stale_temps(str(folder)) == [str(held)]  # its writer died: now it is stale


@pytest.mark.skipif(files.fcntl is None, reason="no fcntl: temps are not locked on this platform")
def test_remove_stale_temps_targets_and_recursive(tmp_path):
    mine = files.temp_name(tmp_path / "emb.npy")
    open(mine, "wb").close()
    other = tmp_path / ".tmp-someone-elses"
    other.write_bytes(b"")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    (deep / ".tmp-1-0123456789ab-x.jpg").write_bytes(b"")
    assert files.remove_stale_temps(str(tmp_path), targets=["emb.npy"]) == [mine]
    assert other.exists() and (deep / ".tmp-1-0123456789ab-x.jpg").exists()
    assert files.remove_stale_temps(str(tmp_path / "a"), recursive=True) == [str(deep / ".tmp-1-0123456789ab-x.jpg")]


def test_a_temp_being_written_is_held_until_it_is_moved_in(tmp_path):
    """The writer's own temp is locked while the body runs: a cleaner in another process leaves it."""
    if files.fcntl is None:
        pytest.skip("no fcntl")
    code = "import sys; from medst_fast import files; print(files.remove_stale_temps(sys.argv[1]))"
    with files.atomic_writer(tmp_path / "x.txt") as f:
        f.write("data")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]" and os.path.exists(f.name)
    assert (tmp_path / "x.txt").read_text() == "data"


def test_held_temp_dir_is_removed_afterwards(tmp_path):
    with files.held_temp_dir(str(tmp_path), "final") as d:
        assert os.path.basename(d).startswith(files.TMP_PREFIX) and d.endswith("-final")
        open(os.path.join(d, "f"), "w").close()
    assert _entries(tmp_path) == []


def test_file_digest_is_sha256(tmp_path):
    data = os.urandom(3 << 20) + b"tail"  # more than one read chunk
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert files.file_digest(p) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("text,msg", [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object, got list"),
                                      (b"\xff\xfe{}", "not valid JSON")])
def test_read_json_object_errors_name_the_file(tmp_path, text, msg):
    p = tmp_path / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as e:
        files.read_json_object(p)
    assert str(e.value).startswith(f"{p}: ") and msg in str(e.value) and "\n" not in str(e.value)


def test_read_json_object_reads_an_object(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"a": 1}))
    assert files.read_json_object(p) == {"a": 1}


def test_weights_folder_files_name_the_preprocess_file():
    """weights.py spells the preprocessing file's name out (it sits below data/); both must agree."""
    from medst_fast import weights
    from medst_fast.data.transforms import PREPROCESS

    assert PREPROCESS in weights.FOLDER_FILES
