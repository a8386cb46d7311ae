"""``python -m medst_fast.pretrain``: Med-ST pretraining (single process, or torchrun for DDP).

    python -m medst_fast.pretrain                       # small synthetic set, medst_tiny on CPU
    python -m medst_fast.pretrain --amp bf16 --data /data/mimic_index --vocab bioclinicalbert/vocab.txt \\
        --init mgca_vit_base.ckpt --text-init Bio_ClinicalBERT/
    torchrun --standalone --nproc_per_node=8 -m medst_fast.pretrain --data ... --vocab ...
"""
from __future__ import annotations

import sys
from typing import List, Optional

from .train.args import parse_args
from .train.loop import TrainResult, train


def main(argv: Optional[List[str]] = None) -> TrainResult:
    """Parse ``argv`` (default: sys.argv[1:]) and train; returns a TrainResult (run folder, step, exports)."""
    return train(parse_args(argv))


def _cli() -> int:
    from .train.checkpoint import CheckpointError, RunFolderError
    from .train.loop import TrainingDiverged

    try:
        res = main()
    except (TrainingDiverged, CheckpointError, RunFolderError) as e:
        # Expected failures: the message says what happened and what to do; a traceback would bury it.
        print(f"medst_fast.pretrain: error: {e}", file=sys.stderr)
        return 1
    # Killed by SIGTERM/SIGINT after a clean checkpoint: report it the conventional way (128 + signal).
    return 128 + res.interrupted if res.interrupted else 0


if __name__ == "__main__":
    sys.exit(_cli())
