"""Preemption: SIGTERM to the trainer's whole process group (SLURM's time limit, scancel, timeout), as a cluster
sends it, with the default loader worker processes; a second SIGTERM and one before the first step exit at once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from medst_fast.data import index as index_mod
from medst_fast.train import stop as stop_mod
from medst_fast import weights as W
from medst_fast.train.data import synthetic_root

BOUND_S = 60  # from SIGTERM to exit: one step, one checkpoint and the workers' shutdown, on a loaded CI machine


def _pretrain(out, cache, *extra):
    # The synthetic set with the default loader (PIL worker processes on CPU) and default workers; small images.
    cmd = [sys.executable, "-m", "medst_fast.pretrain", "--synthetic-patients", "8", "--cache-dir", str(cache),
           "--out", str(out), "--batch-series", "2", "--log-every", "1", "--eval-every", "0", "--no-export",
           "--model-override", "vision.img_size=32", *extra]
    if len(os.sched_getaffinity(0)) < 2:  # the default is 0 workers on one CPU: the test needs a worker process
        cmd += ["--workers", "1"]
    return cmd


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_sigterm_to_the_process_group_checkpoints_exits_143_and_resumes(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = subprocess.Popen(_pretrain(out, cache, "--max-steps", "6", "--save-every", "100"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:  # wait until a step is logged: the loader workers are running by then
            seen.append(line)
            if " INFO step 1/6 " in line:
                break
        else:
            pytest.fail("the trainer exited before its first step:\n" + "".join(seen[-20:]))
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the trainer and its loader workers
        t0 = time.monotonic()
        rest = proc.stderr.read()  # EOF when every process holding the pipe (workers included) is gone
        rc = proc.wait(timeout=BOUND_S)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's group only
            proc.wait()
    log = "".join(seen) + rest
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    assert took < BOUND_S, took
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-3000:]
    assert json.loads((out / "args.json").read_text())["workers"] >= 1  # the test ran with worker processes
    found = W.list_checkpoints(str(out))
    assert len(found) == 1, found
    st = W.load_checkpoint(found[0])  # verifies size and hash
    assert 1 <= st["step"] < 6 and "received SIGTERM: saving a checkpoint" in log
    index = os.path.join(synthetic_root(str(cache), 8, 0), "index")
    assert st["data_fingerprint"] == index_mod.index_fingerprint(index)  # what the resume below checks
    r = subprocess.run(_pretrain(out, cache, "--resume", "auto"), capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {found[0]} at step {st['step']}" in r.stderr
    assert W.load_checkpoint(W.list_checkpoints(str(out))[-1])["step"] == 6


def test_a_preempted_torchrun_run_exits_143(tmp_path, vocab_path):
    """python -m medst_fast.launch (torchrun's arguments), 2 gloo ranks: SIGTERM to the launcher's process group
    reaches the ranks through torchrun; they agree to stop, rank 0 checkpoints, and the launcher exits 143
    (torchrun itself: 1, a traceback)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medst_fast.launch", "--standalone", "--nproc_per_node=2", "-m", "medst_fast.pretrain",
           "--dataset-type", "random", "--random-series", "8", "--vocab", vocab_path, "--out", str(out),
           "--max-steps", "40", "--batch-series", "2", "--workers", "0", "--log-every", "1", "--save-every", "100",
           "--no-export", "--model-override", "vision.img_size=32", "--model-override", "text.max_length=32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if " INFO step 1/" in line:
                break
        else:
            pytest.fail("the run exited before its first step:\n" + "".join(seen[-20:]))
        os.killpg(proc.pid, signal.SIGTERM)
        rest = proc.stderr.read()
        rc = proc.wait(timeout=BOUND_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = "".join(seen) + rest
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    assert "medst_fast.launch: stopped by SIGTERM" in log
    found = W.list_checkpoints(str(out))
    assert len(found) == 1 and 1 <= W.load_checkpoint(found[0])["step"] < 40, log[-3000:]


# -- the signal handler's decisions (no process needed) ------------------------------------------------------------
def _trainer(steps_run, resumed_from=None):
    return stop_mod.StopRequest(lambda: (steps_run, resumed_from, resumed_from))


def test_sigterm_before_the_first_step_exits_at_once(caplog):
    t = _trainer(0)
    with pytest.raises(SystemExit) as e:
        t.on_signal(signal.SIGTERM, None)
    assert e.value.code == 143 and t.signal is None
    assert "before the first step of this process finished" in caplog.text and "no checkpoint" in caplog.text
    t = _trainer(0, resumed_from="/r/checkpoints/ckpt-00000004.pt")
    with pytest.raises(SystemExit):
        t.on_signal(signal.SIGTERM, None)
    assert "the checkpoint /r/checkpoints/ckpt-00000004.pt it resumed from" in caplog.text
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C keeps Python's own way out
        _trainer(0).on_signal(signal.SIGINT, None)


def test_a_second_sigterm_exits_at_once_a_duplicate_does_not(monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(stop_mod.time, "monotonic", lambda: clock[0])
    t = _trainer(3, resumed_from="/r/checkpoints/ckpt-00000002.pt")
    t.on_signal(signal.SIGTERM, None)  # the first: finish the step, checkpoint, exit
    assert t.signal == signal.SIGTERM
    clock[0] += stop_mod.SAME_SIGNAL_S / 2
    t.on_signal(signal.SIGTERM, None)  # the same preemption delivered twice (torchrun forwards it): no change
    clock[0] += stop_mod.SAME_SIGNAL_S
    with pytest.raises(SystemExit) as e:
        t.on_signal(signal.SIGTERM, None)
    assert e.value.code == 143
    assert "received SIGTERM again while stopping: exiting now" in caplog.text
    assert "ckpt-00000002.pt" in caplog.text  # names the last complete checkpoint
