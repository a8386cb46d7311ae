"""The Python stages of benchmarks/device_check.sh (the pytest benchmark files are the others).

    python benchmarks/device_check.py env                 versions, GPU, driver, nvcc
    python benchmarks/device_check.py warmup --procs N    compile the Triton variants the timed stages launch
    python benchmarks/device_check.py e2e --out DIR       python -m medst_fast.pretrain, ~30 steps, its log
    python benchmarks/device_check.py compile             torch.compile smoke: finite grads, loss vs eager

Without CUDA every stage runs the same code at tiny shapes (MEDST_BENCH_QUICK=1 is what the dry run sets) and
prints one ``SKIP (needs CUDA): ...`` line for each thing it cannot do here; device_check.sh collects those.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from _common import quick  # noqa: E402

CUDA = torch.cuda.is_available()


def skip(what: str) -> None:
    print(f"SKIP (needs CUDA): {what}", flush=True)


# ------------------------------------------------------------------------------------------------------------ env
def _cmd(*argv: str) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({type(e).__name__})"


def _version(dist: str) -> str:
    """The installed distribution's version, without importing it (transformers alone takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def cmd_env(_a) -> int:
    print("gpu:", _cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                       "--format=csv,noheader") if shutil.which("nvidia-smi") else "no nvidia-smi")
    print("python:", platform.python_version(), "| cpus:", os.cpu_count())
    print("torch:", torch.__version__, "| cuda:", torch.version.cuda, "| cuda available:", CUDA)
    if CUDA:
        print("device:", torch.cuda.get_device_name(), "| capability:", torch.cuda.get_device_capability())
    for m in ("triton", "numpy", "torchvision", "pandas", "timm", "transformers", "pillow", "nvidia-dali-cuda130"):
        print(f"{m}:", _version(m))
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    print("nvcc:", _cmd(nvcc, "--version").splitlines()[-1] if nvcc else "not found")
    import medst_fast
    import medst_fast.kernels as k

    print("medst_fast:", medst_fast.__version__, medst_fast.__file__, "| kernels:", list(k.__path__))
    return 0


# --------------------------------------------------------------------------------------------------------- warm-up
def warmup_tasks() -> list:
    """Names of the warm-up tasks: each launches one group of the kernels a timed stage launches."""
    import bench_ops

    tasks = [f"local_align:{s}" for s in bench_ops.STUDIES]
    tasks += [f"move_ffn:{s}:{v}" for s in bench_ops.STUDIES for v in ("autocast", "pure_bf16")]
    tasks += [f"gemm_configs:{s}" for s in ((40, 160) if CUDA else (1,))]
    tasks += ["train_step"]
    return tasks


def run_warmup_task(task: str) -> None:
    import bench_ops

    kind, *arg = task.split(":")
    if kind == "local_align":
        impls, *_ = bench_ops.local_alignment_case(int(arg[0]))
        next(iter(impls.values()))()  # the fused op (forward + backward)
    elif kind == "move_ffn":
        impls, *_ = bench_ops.move_ffn_case(int(arg[0]), arg[1] == "pure_bf16")
        next(iter(impls.values()))()
    elif kind == "gemm_configs":
        from medst_fast.kernels import _utils
        from medst_fast.kernels import move_ffn as mf

        if not (CUDA or (_utils.interpreting() and _utils.interpreter_ready())):
            skip(f"warm-up {task}: the Triton GEMM configs compile for a GPU")
            return
        D, H = (768, 3072) if CUDA else (32, 64)
        gemms, _ = bench_ops._ffn_gemms(int(arg[0]), D, H, torch.bfloat16)
        sets = {"gemm": mf.GEMM_CONFIGS["mma"], "wgrad": mf.WGRAD_CONFIGS["mma"]}
        for which, *_rest, fn in gemms.values():
            fn()
            for cfg in sets[which]:
                with mf.forced_configs(**{which: cfg}):
                    fn()
    elif kind == "train_step":
        _one_train_step()
    else:
        raise SystemExit(f"device_check.py: unknown warm-up task {task!r}")
    if CUDA:
        torch.cuda.synchronize()


def _one_train_step() -> None:
    """One medst_fast step at the first benchmark size: compiles the kernels at the model's shapes."""
    import bench_train_step as bt
    import medst_fast
    from medst_fast.train.step import PretrainModule, StepRunner, freeze_unused
    from medst_fast.losses import MedSTLoss

    tok = bt._tokenizer(None)
    model = medst_fast.create_model(bt.MODEL, text={"vocab_size": tok.vocab_size}).to(bt.DEV)
    freeze_unused(model)
    params = [p for p in model.parameters() if p.requires_grad]
    runner = StepRunner(PretrainModule(model, MedSTLoss(model.cfg.loss, model.cfg.faithful)),
                        torch.optim.AdamW(params, lr=4e-5, fused=CUDA), bt.DEV, bt.AMP)
    for laterals in ("half", "none"):
        runner.forward_backward([bt._batch(tok, model.cfg.vision.img_size, bt.STUDIES[0], laterals)])
        runner.optimizer_step(4e-5)


def cmd_warmup(a) -> int:
    if a.tasks:  # one worker process: its share of the tasks, one after the other
        for task in a.tasks.split(","):
            t0 = time.perf_counter()
            run_warmup_task(task)
            print(f"warm-up {task}: {time.perf_counter() - t0:.1f} s", flush=True)
        return 0
    if not CUDA:
        skip("Triton compilation (on the CPU the ops take their PyTorch references; the tasks still run)")
    tasks = warmup_tasks()
    n = max(1, min(a.procs, len(tasks)))
    groups = [",".join(tasks[i::n]) for i in range(n)]  # round robin: the big GEMM sweeps land apart
    t0 = time.perf_counter()
    procs = [(g, subprocess.Popen([sys.executable, __file__, "warmup", "--tasks", g])) for g in groups]
    failed = [g for g, p in procs if p.wait() != 0]
    print(f"warm-up: {len(tasks)} tasks in {n} processes, {time.perf_counter() - t0:.1f} s"
          + (f"; FAILED: {'; '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------ end to end
def cmd_e2e(a) -> int:
    """python -m medst_fast.pretrain as a user runs it, on the built-in synthetic set; its log is kept."""
    os.makedirs(a.out, exist_ok=True)
    if CUDA:
        argv = ["--amp", "bf16", "--model", "medst_vit_b16", "--loader", "nvjpeg", "--max-steps", str(a.steps),
                "--log-every", "5"]
    else:
        skip("pretrain --amp bf16 --model medst_vit_b16 --loader nvjpeg (dry run: medst_tiny, fp32, PIL, 2 steps)")
        argv = ["--amp", "none", "--model", "medst_tiny", "--loader", "pil", "--max-steps", "2", "--log-every", "1",
                "--workers", "0", "--batch-series", "2", "--synthetic-patients", "8", "--model-override", "vision.img_size=32",
                "--model-override", "text.max_length=32"]
    argv += ["--dataset-type", "synthetic", "--cache-dir", os.path.join(a.out, "cache"), "--out",
             os.path.join(a.out, "run"), "--progress", "off", "--no-export", "--eval-every", "0"]
    cmd = [sys.executable, "-m", "medst_fast.pretrain", *argv]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT, timeout=a.timeout)
    print(f"pretrain exit {r.returncode} after {time.perf_counter() - t0:.1f} s", flush=True)
    metrics = os.path.join(a.out, "run", "metrics.csv")
    if os.path.isfile(metrics):
        rows = open(metrics).read().strip().splitlines()
        print("metrics.csv (header + last rows):", rows[0], *rows[-3:], sep="\n  ")
    return r.returncode


# ------------------------------------------------------------------------------------------------- compile smoke
def cmd_compile(a) -> int:
    """torch.compile of the trainer's module (fullgraph, dynamic, as --compile) against eager: a few steps,
    every gradient finite, each compiled loss within the bf16 rule (its error against an fp32 eager forward at
    most 2x the eager bf16 error, plus 1e-3 for rounding noise on an exact match)."""
    import copy

    import bench_train_step as bt
    import medst_fast
    from medst_fast.losses import MedSTLoss
    from medst_fast.train.step import PretrainModule, freeze_unused

    backend = "inductor" if CUDA else "eager"
    if not CUDA:
        skip("inductor compilation (dry run: torch.compile with backend='eager' traces the same graph)")
    tok = bt._tokenizer(None)
    torch.manual_seed(0)
    model = medst_fast.create_model(bt.MODEL, text={"vocab_size": tok.vocab_size}).to(bt.DEV)
    freeze_unused(model)
    model.eval()  # no dropout: the three forwards must see the same function
    eager = PretrainModule(model, MedSTLoss(model.cfg.loss, model.cfg.faithful))
    compiled = torch.compile(PretrainModule(copy.deepcopy(model), MedSTLoss(model.cfg.loss, model.cfg.faithful)),
                             fullgraph=True, dynamic=True, backend=backend)
    amp = torch.bfloat16 if CUDA else None
    bad = 0
    for step, laterals in enumerate(("half", "none", "all")[: a.steps]):
        batch = model.prepare_batch(bt._batch(tok, model.cfg.vision.img_size, 8 if CUDA else 4, laterals))
        with torch.no_grad():
            ref = eager(batch)[0].double()
        losses = {}
        for name, mod in (("eager", eager), ("compiled", compiled)):
            mod.zero_grad(set_to_none=True)
            with torch.autocast(bt.DEV.type, dtype=amp or torch.float32, enabled=amp is not None):
                total, _ = mod(batch)
            total.backward()
            losses[name] = total.detach().double()
        grads = [p.grad for p in compiled.parameters() if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else False
        err_e, err_c = (losses["eager"] - ref).abs().item(), (losses["compiled"] - ref).abs().item()
        ok = finite and err_c <= 2 * err_e + 1e-3
        bad += not ok
        print(f"compile step {step} ({laterals} laterals): fp32 {ref.item():.6f}, eager {losses['eager'].item():.6f}, "
              f"compiled {losses['compiled'].item():.6f}; |err| eager {err_e:.2e} compiled {err_c:.2e}; "
              f"{len(grads)} grads finite={finite} -> {'ok' if ok else 'FAIL'}", flush=True)
    print(f"compile smoke ({backend}): {'ok' if not bad else f'{bad} step(s) FAILED'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env").set_defaults(fn=cmd_env)
    w = sub.add_parser("warmup")
    w.add_argument("--procs", type=int, default=8)
    w.add_argument("--tasks", default=None, help="comma-separated tasks for one worker process (internal)")
    w.set_defaults(fn=cmd_warmup)
    e = sub.add_parser("e2e")
    e.add_argument("--out", required=True)
    e.add_argument("--steps", type=int, default=30)
    e.add_argument("--timeout", type=float, default=3000)
    e.set_defaults(fn=cmd_e2e)
    c = sub.add_parser("compile")
    c.add_argument("--steps", type=int, default=3 if CUDA else 1)
    c.set_defaults(fn=cmd_compile)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
