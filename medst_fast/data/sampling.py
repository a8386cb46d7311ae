"""Which series go into which batch, and the RNG each series is loaded under (every loader back-end).

Resuming must skip exactly the consumed batches and reproduce every later one, so:
- the sampler's order is a function of (seed, epoch) only and it can start at any batch;
- each item is produced under RNG states seeded from (seed, epoch, series index), so random crops do
  not depend on the worker (or back-end) that loads the item or on what it loaded before;
- the DataLoader gets its own generator, so creating an iterator never draws from the global RNG that
  drives dropout.

This lives in ``data/`` (the trainer's ``medst_fast.train.data`` re-exports it) so the loaders need nothing
from the trainer.
"""
from __future__ import annotations

import random
import signal
from typing import Any, Callable, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# Key of the stand-in a loader yields for a batch it cannot deliver (nothing readable, or nothing to
# collate): its value says what was wrong. The trainer skips and counts such a step.
BAD_BATCH = "bad_batch"


class SeriesBatchSampler(Sampler[List[Tuple[int, int]]]):
    """DistributedSampler-like batches of whole series for one rank, resumable mid-epoch.

    Every epoch shuffles all series with a generator seeded by (seed, epoch), drops the tail so every rank
    gets the same number of full batches (DDP needs equal step counts), deals series round-robin to ranks
    and cuts this rank's share into batches. A series never straddles ranks: the temporal loss needs all
    its studies together. Yields lists of (epoch, series index) so the dataset can seed per item.
    """

    def __init__(self, n_series: int, batch_series: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if n_series < batch_series * world_size:
            raise ValueError(f"{n_series} series cannot fill one batch of {batch_series} series on each of "
                             f"{world_size} rank(s); lower --batch-series or use more data")
        self.n, self.bs, self.rank, self.world, self.seed, self.shuffle = n_series, batch_series, rank, world_size, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:  # batches per epoch on this rank (including skipped ones)
        return self.n // (self.bs * self.world)

    def epoch_order(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[: len(self) * self.bs * self.world]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        mine = self.epoch_order(self.epoch)[self.rank::self.world]
        for b in range(self.start, len(self)):
            yield [(self.epoch, i) for i in mine[b * self.bs:(b + 1) * self.bs]]


def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint32)[0])


class SeededItems(Dataset):
    """Wraps a dataset so that item (epoch, i) is drawn under RNG states seeded from (seed, epoch, i).

    The python, numpy and torch global RNG states are saved and restored around the call, so loading in
    the main process (workers=0) leaves the RNG that drives dropout untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        s = item_seed(self.seed, epoch, i)
        py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            return self.dataset[i]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(th)


def _ignore_sigint(_worker_id):
    """Leave SIGINT and SIGTERM to the main process. Ctrl-C, SLURM's time limit, scancel and timeout signal the
    whole process group; a worker that died of it would make the DataLoader raise in the main process before it
    could finish its step and write the checkpoint. The main process stops the workers itself when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def iterate_and_stop_workers(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; when the caller stops early (a generator closed mid-epoch, e.g. a run stopped by a
    signal) the worker processes are told to finish at once instead of when the iterator is garbage collected.

    The workers ignore SIGTERM (``_ignore_sigint``), so they must be stopped this way: left to interpreter exit,
    multiprocessing would SIGTERM them and then wait for them forever. A worker that does not finish within the
    DataLoader's own join timeout is killed."""
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # absent without worker processes
        if shutdown is not None:
            shutdown()
            for w in getattr(it, "_workers", []):
                if w.is_alive():
                    w.kill()
        del it


def make_loader(dataset: Dataset, sampler: SeriesBatchSampler, collate: Callable, workers: int, seed: int,
                pin_memory: bool) -> DataLoader:
    """A DataLoader over ``SeededItems(dataset, seed)`` with ``sampler``'s batches, in ``workers`` processes."""
    g = torch.Generator().manual_seed(seed)  # never touch the global RNG when an iterator is created
    return DataLoader(SeededItems(dataset, seed), batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, generator=g, persistent_workers=False, worker_init_fn=_ignore_sigint,
                      prefetch_factor=4 if workers > 0 else None)
