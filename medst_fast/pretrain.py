"""``python -m medst_fast.pretrain``: Med-ST pretraining (single process, or torchrun for DDP).

    python -m medst_fast.pretrain                       # small synthetic set, medst_tiny on CPU
    python -m medst_fast.pretrain --amp bf16 --data /data/mimic_index --vocab bioclinicalbert/vocab.txt \\
        --init mgca_vit_base.ckpt --text-init Bio_ClinicalBERT/
    torchrun --standalone --nproc_per_node=8 -m medst_fast.pretrain --data ... --vocab ...
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, List, MutableMapping, Optional

from .factory import check_extra

if TYPE_CHECKING:
    from .train.loop import TrainResult

# Packed batches hold a different number of tokens every step, so activations come in ever new sizes; with
# fixed-size segments the caching allocator fragments over a long run (reserved memory grows until an OOM
# that nothing "uses"). Expandable segments grow one mapping instead. Read by torch at its first CUDA
# allocation; torch >= 2.9 also reads the two other names, and any of the three means the user chose.
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_VARS = (ALLOC_CONF, "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
EXPANDABLE = "expandable_segments:True"


def allocator_setting(environ: MutableMapping[str, str], uses_cuda: bool) -> Optional[str]:
    """The value to give PYTORCH_CUDA_ALLOC_CONF, or None: a CPU run, or the user set an allocator variable
    (even to an empty value)."""
    if not uses_cuda or any(name in environ for name in ALLOC_VARS):
        return None
    return EXPANDABLE


def configure_allocator(device: Optional[str], environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Set the allocator variable for a CUDA run (``--device`` None or cuda, and a GPU) the user left unset;
    say so on the first rank. Must run before the first CUDA allocation. Returns the value set, or None."""
    import torch

    value = allocator_setting(environ, device != "cpu" and torch.cuda.is_available())
    if value is not None:
        environ[ALLOC_CONF] = value
        if environ.get("RANK", "0") == "0":
            print(f"medst_fast.pretrain: {ALLOC_CONF}={value} (packed batches change size every step; set "
                  f"{ALLOC_CONF} yourself to choose otherwise)", file=sys.stderr)
    return value


def main(argv: Optional[List[str]] = None) -> "TrainResult":
    """Parse ``argv`` (default: sys.argv[1:]) and train; returns a TrainResult (run folder, step, exports).

    A core install (without the ``[train]`` extra) gets one ImportError naming ``pip install
    'medst_fast[train]'`` before anything else runs, instead of a ModuleNotFoundError from deep in a loader.
    """
    check_extra("train", purpose="python -m medst_fast.pretrain")
    from .train.args import parse_args
    from .train.loop import train

    args = parse_args(argv)
    configure_allocator(args.device)  # nothing has touched CUDA memory yet
    return train(args)


def _fail(e: Exception) -> int:
    print(f"medst_fast.pretrain: error: {e}", file=sys.stderr)
    return 1


def _cli() -> int:
    try:
        # The trainer's modules are imported here, not at the top, so that a missing package of the [train]
        # extra is this one line (naming the extra) rather than a traceback.
        check_extra("train", purpose="python -m medst_fast.pretrain")
        from .train.args import UsageError
        from .train.run_dir import RunFolderError
        from .train.faults import OutOfMemory, TrainingDiverged
        from .weights import CheckpointError
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
