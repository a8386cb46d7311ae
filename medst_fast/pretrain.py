"""``python -m medst_fast.pretrain``: Med-ST pretraining (single process, or torchrun for DDP).

    python -m medst_fast.pretrain                       # small synthetic set, medst_tiny on CPU
    python -m medst_fast.pretrain --amp bf16 --data /data/mimic_index --vocab bioclinicalbert/vocab.txt \\
        --init mgca_vit_base.ckpt --text-init Bio_ClinicalBERT/
    torchrun --standalone --nproc_per_node=8 -m medst_fast.pretrain --data ... --vocab ...
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, List, Optional

from .factory import check_extra

if TYPE_CHECKING:
    from .train.loop import TrainResult


def main(argv: Optional[List[str]] = None) -> "TrainResult":
    """Parse ``argv`` (default: sys.argv[1:]) and train; returns a TrainResult (run folder, step, exports).

    A core install (without the ``[train]`` extra) gets one ImportError naming ``pip install
    'medst_fast[train]'`` before anything else runs, instead of a ModuleNotFoundError from deep in a loader.
    """
    check_extra("train", purpose="python -m medst_fast.pretrain")
    from .train.args import parse_args
    from .train.loop import train

    return train(parse_args(argv))


def _fail(e: Exception) -> int:
    print(f"medst_fast.pretrain: error: {e}", file=sys.stderr)
    return 1


def _cli() -> int:
    try:
        # The trainer's modules are imported here, not at the top, so that a missing package of the [train]
        # extra is this one line (naming the extra) rather than a traceback.
        check_extra("train", purpose="python -m medst_fast.pretrain")
        from .train.args import UsageError
        from .train.checkpoint import CheckpointError, RunFolderError
        from .train.loop import OutOfMemory, TrainingDiverged
    except ImportError as e:
        return _fail(e)
    try:
        res = main()
    except UsageError as e:  # a flag or an input file it names: nothing was started or written
        print(f"medst_fast.pretrain: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError, RunFolderError, OutOfMemory, ImportError) as e:
        # Expected failures: the message says what happened and what to do (a missing package: the pip extra
        # that brings it); a traceback would bury it.
        return _fail(e)
    # Killed by SIGTERM/SIGINT after a clean checkpoint: report it the conventional way (128 + signal).
    return 128 + res.interrupted if res.interrupted else 0


if __name__ == "__main__":
    sys.exit(_cli())
