"""``python -m medst_fast.launch``: torchrun with the exit status of a preempted run.

    python -m medst_fast.launch --standalone --nproc_per_node=8 -m medst_fast.pretrain --data ... --vocab ...

The arguments are torchrun's. The only difference: when the launcher itself gets SIGTERM or SIGINT (SLURM's time
limit, scancel, timeout), torchrun passes it on to the ranks, which finish their step, write a checkpoint and
exit, and then torchrun ends with a traceback and status 1, the status of a failure. This exits with 128 +
the signal (143 for SIGTERM) instead, so a scheduler can tell a preempted run from a failed one and requeue it
(resume with ``--resume auto``). Any other outcome is torchrun's own.
"""
from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        sig = int(e.sigval)
        print(f"medst_fast.launch: stopped by {e.sigval.name}; the ranks were passed the signal (a rank that had "
              f"finished a step wrote a checkpoint: continue with --resume auto)", file=sys.stderr)
        return 128 + sig
    return 0


if __name__ == "__main__":
    sys.exit(main())
