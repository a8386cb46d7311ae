"""The pretraining stack behind ``python -m medst_fast.pretrain`` (argparse, loop, checkpoints, DDP)."""
