"""medst_fast.data.sampling: the data order is a function of (seed, epoch), a resume skips exactly the consumed
batches, and per-item augmentation does not depend on the worker that loads it (what a bitwise resume needs;
the resume itself: tests/test_train_resume.py)."""
import random

import numpy as np
import pytest
import torch

from medst_fast.data.sampling import SeededItems, SeriesBatchSampler


# -- sampler and per-item seeding --------------------------------------------------------------------------
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
