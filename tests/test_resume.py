"""Resuming: a run SIGKILLed mid-epoch and resumed ends with bitwise the weights of the uninterrupted run.

That needs the data order to be a function of (seed, epoch), exactly the consumed batches skipped, per-item
augmentation independent of the worker that loads it, and every RNG/optimizer/scaler state restored.
"""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from medst_fast.data.sampling import SeededItems, SeriesBatchSampler
from medst_fast.train import checkpoint as ck
from medst_fast import weights as W


# -- sampler and per-item seeding --------------------------------------------------------------------------
def test_trainer_data_reexports_the_sampling_module():
    from medst_fast.data import sampling
    from medst_fast.train import data

    for name in ("SeriesBatchSampler", "SeededItems", "item_seed", "make_loader", "BAD_BATCH"):
        assert getattr(data, name) is getattr(sampling, name), name


def test_sampler_shards_whole_series_and_resumes():
    n, bs, world = 23, 3, 2
    samplers = [SeriesBatchSampler(n, bs, r, world, seed=5) for r in range(world)]
    for epoch in range(3):
        batches = []
        for s in samplers:
            s.set_epoch(epoch)
            batches.append(list(s))
        assert all(len(b) == len(samplers[0]) == n // (bs * world) for b in batches)  # equal steps per rank
        flat = [i for b in batches for batch in b for (e, i) in batch]
        assert len(flat) == len(set(flat)) == len(samplers[0]) * bs * world  # disjoint across ranks
        assert all(e == epoch for b in batches for batch in b for (e, _) in batch)
        for s, full in zip(samplers, batches):
            s.set_epoch(epoch, start_batch=2)
            assert list(s) == full[2:]  # resuming skips exactly the consumed batches
            s.set_epoch(epoch)
            assert list(s) == full  # a function of (seed, epoch) only
    samplers[0].set_epoch(0)
    e0 = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != e0  # reshuffled every epoch
    with pytest.raises(ValueError, match="cannot fill one batch"):
        SeriesBatchSampler(5, 3, 0, 2)


class _Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return (i, random.random(), float(np.random.rand()), float(torch.rand(())))


def test_seeded_items_are_deterministic_and_leave_global_rng():
    ds = SeededItems(_Noisy(), seed=1)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    a = [ds[(2, i)] for i in range(5)]
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    torch.manual_seed(9)
    b = [ds[(2, i)] for i in reversed(range(5))][::-1]
    assert a == b  # independent of order and of the global RNG (so of the worker that loads it)
    assert ds[(3, 0)] != a[0]  # a new epoch draws new augmentations
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    [ds[(2, i)] for i in range(5)]
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()  # the dropout RNG is untouched by loading


# -- SIGKILL + resume -------------------------------------------------------------------------------------------
def _cmd(out, vocab, index=None):
    # 12 series (13 in the index), 2 per micro-batch, 2 micro-batches per step: 3 optimizer steps per epoch; 8
    # steps cross two epoch boundaries; the kill comes after step 2 (mid-epoch). One loader worker (a worker
    # process, or the nvJPEG loader's reader thread) exercises the per-item seeding off the main thread.
    # Small images and reports keep it fast.
    data = (["--dataset-type", "random", "--random-series", "12"] if index is None else
            ["--data", index, "--loader", "nvjpeg"])
    return [sys.executable, "-m", "medst_fast.pretrain", *data,
            "--vocab", vocab, "--out", str(out), "--batch-series", "2", "--accum-steps", "2", "--max-steps", "8",
            "--save-every", "2", "--keep", "10", "--workers", "1", "--log-every", "1", "--no-export",
            "--clip-grad", "1.0", "--model-override", "vision.img_size=48", "--model-override", "text.max_length=40"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")


def _final_weights(out):
    return W.load_checkpoint(W.ckpt_path(str(out), 8))


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """An 8-patient synthetic MIMIC-CXR index: 13 training series of real JPEG files."""
    from medst_fast.data import prepare, synth

    root = tmp_path_factory.mktemp("syn")
    synth.generate(str(root / "tree"), patients=8, seed=3, extras=False, zip_reports=False, image_size=(80, 64))
    prepare.prepare_mimic(str(root / "tree"), str(root / "tree"), str(root / "idx"), cache_size=None, workers=0,
                          progress=False)
    return str(root / "idx")


@pytest.mark.parametrize("data", ["random", "index_nvjpeg"])
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path, vocab_path, data, request):
    index = request.getfixturevalue("small_index") if data == "index_nvjpeg" else None
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    r = subprocess.run(_cmd(ref_out, vocab_path, index), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if index is not None:
        assert "loader: nvjpeg (requested" in r.stderr

    p = subprocess.Popen(_cmd(out, vocab_path, index), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = W.ckpt_path(str(out), 2)  # step 2 of 3 in epoch 1: mid-epoch
    deadline = time.time() + 240
    while not os.path.exists(first) and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert os.path.exists(first), "no checkpoint written before the run ended"
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    done = W.list_checkpoints(str(out))
    assert done and W.ckpt_path(str(out), 8) not in done, "the run finished before it could be killed"
    assert W.load_checkpoint(first)["step_in_epoch"] == 2

    r = subprocess.run(_cmd(out, vocab_path, index) + ["--resume", "auto"], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr

    a, b = _final_weights(ref_out), _final_weights(out)
    assert (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"]) == (2, 2)  # 8 = 3 + 3 + 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    # the metrics of the resumed run continue the killed one without duplicated steps
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(x.split(",")[0]) for x in rows] == list(range(1, 9))
    ref_rows = (ref_out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [x.split(",")[2] for x in rows] == [x.split(",")[2] for x in ref_rows]  # same loss every step


# -- the index a run trained on is part of the run ------------------------------------------------------------------
def _copy_index(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_index_fingerprint_sees_changed_reports_not_a_moved_image_root(tmp_path, small_index):
    import json

    from medst_fast.data.index import SeriesIndex

    base = ck.index_fingerprint(small_index)
    assert ck.index_fingerprint(_copy_index(small_index, tmp_path / "same")) == base
    moved = _copy_index(small_index, tmp_path / "moved")  # the images copied elsewhere, the index pointed at them
    meta = json.loads(open(os.path.join(moved, "meta.json")).read())
    meta["image_root"] = "/scratch/images"
    open(os.path.join(moved, "meta.json"), "w").write(json.dumps(meta))
    assert ck.index_fingerprint(moved) == base
    changed = tmp_path / "changed"  # every report rewritten, the same series: the count check cannot see it
    idx = SeriesIndex.load(small_index)
    for s in idx.studies:
        s.text = "no acute cardiopulmonary process."
    idx.save(str(changed))
    assert len(SeriesIndex.load(str(changed)).series["train"]) == len(idx.series["train"])
    assert ck.index_fingerprint(str(changed)) != base


def test_resume_check_refuses_another_index_unless_allowed(caplog):
    p = "/r/checkpoints/ckpt-00000002.pt"
    ck.check_data_fingerprint(p, "a" * 64, "a" * 64, "/data/idx", allow_changed=False)  # the same index
    ck.check_data_fingerprint(p, None, "b" * 64, "/data/idx", allow_changed=False)  # an older checkpoint: no field
    with pytest.raises(W.CheckpointError, match=r"ckpt-00000002.pt: resuming would change the run: the index "
                                                 r"/data/idx differs .*--allow-changed-args"):
        ck.check_data_fingerprint(p, "a" * 64, "b" * 64, "/data/idx", allow_changed=False)
    ck.check_data_fingerprint(p, "a" * 64, "b" * 64, "/data/idx", allow_changed=True)
    assert "--allow-changed-args: resuming" in caplog.text and "aaaaaaaaaaaa -> bbbbbbbbbbbb" in caplog.text
