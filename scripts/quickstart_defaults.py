"""Measure candidate quick-start settings: seeded CPU runs of ``python -m medst_fast.pretrain`` on the synthetic set.

Each run is a child process with one thread (OMP_NUM_THREADS=1, so two can run side by side on a busy machine
without changing the seeded result); its CPU seconds (user + system of the child) are measured, not its wall
time. The validation checks are read from the run's train.log (R@1/R@5, the number of studies, chance and
the one-sided binomial p the trainer prints) and one row per run is appended to a CSV; ``--table`` writes
the markdown table of all rows.

    python scripts/quickstart_defaults.py --name q1 --seeds 0,1,2 -- --lr 1e-3 --clip-grad 1
    python scripts/quickstart_defaults.py --table benchmarks/results/quickstart_defaults.md

Trainer flags after ``--`` are added to ``--out <work>/<name>-s<seed> --seed <seed>``; the default run
(no flags) is the quick start as the trainer resolves it.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from medst_fast.plot import validations  # noqa: E402
from medst_fast.train.validate import above_chance_p  # noqa: E402

FIELDS = ["name", "seed", "flags", "steps", "cpu_s", "checks", "r5_above", "final_r1", "final_r5", "studies",
          "chance_r1", "chance_r5", "p_r1", "p_r5", "commit"]

def run_one(work: str, name: str, seed: int, flags, commit: str) -> dict:
    out = os.path.join(work, f"{name}-s{seed}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MEDST_FAST_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "import torch,sys; torch.set_num_threads(1); from medst_fast.pretrain import _cli; "
           "sys.argv=['medst_fast.pretrain']+sys.argv[1:]; sys.exit(_cli())",
           "--out", out, "--overwrite", "--seed", str(seed), "--progress", "off", *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{name} seed {seed}: exit {r.returncode}\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    vals = validations(open(os.path.join(out, "train.log")).read())
    step, r1, r5, n = vals[-1]
    above = sum(above_chance_p(v[2], v[3], 5) < 0.05 for v in vals)
    return {"name": name, "seed": seed, "flags": " ".join(flags), "steps": step, "cpu_s": f"{cpu:.0f}",
            "checks": len(vals), "r5_above": above, "final_r1": f"{r1:.3f}", "final_r5": f"{r5:.3f}", "studies": n,
            "chance_r1": f"{1 / n:.3f}", "chance_r5": f"{min(1.0, 5 / n):.3f}",
            "p_r1": f"{above_chance_p(r1, n, 1):.2g}", "p_r5": f"{above_chance_p(r5, n, 5):.2g}", "commit": commit}


def write_table(csv_path: str, md_path: str) -> None:
    rows = list(csv.DictReader(open(csv_path)))
    lines = ["| name | seed | extra flags | steps | CPU s | R@5 > chance (p<0.05) at | final R@1 (chance, p) | "
             "final R@5 (chance, p) | val studies | commit |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['name']} | {r['seed']} | `{r['flags'] or '(none)'}` | {r['steps']} | {r['cpu_s']} | "
                     f"{r['r5_above']} of {r['checks']} checks | {r['final_r1']} ({r['chance_r1']}, {r['p_r1']}) | "
                     f"{r['final_r5']} ({r['chance_r5']}, {r['p_r5']}) | {r['studies']} | {r['commit']} |")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", default="default")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", default="/tmp/medst_quickstart")
    p.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "quickstart_defaults.csv"))
    p.add_argument("--table", default=None, help="write the markdown table of --csv to this file and stop")
    a = p.parse_args(own)
    if a.table:
        write_table(a.csv, a.table)
        return 0
    os.makedirs(a.work, exist_ok=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.time()
        row = run_one(a.work, a.name, seed, flags, commit)
        print(f"{row} wall {time.time() - t0:.0f}s", flush=True)
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
