"""Seeded ablations of the research switches (docs/method.md §8) on the synthetic MIMIC-CXR, medst_tiny on CPU.

Every variant runs for every seed as its own chain from random weights, so the seed covers the whole
training, stage 1 included (the committed learning proof shared one stage-1 model between its variants):

- stage 1 (``--steps``, ``--lr``): ITA + local from random weights with that seed. The temporal loss is
  left out here for the reason learning_proof.py gives (from scratch it swamps ITA). By default every
  variant of a seed starts from that seed's one paper stage-1 run; ``--switches-in-stage1`` gives the local
  switches their own stage-1 runs (three times the stage-1 cost);
- stage 2 (``--stage2-steps``, ``--stage2-lr``): the variant's loss from its stage-1 weights, same seed;
- ``random``: the initial weights of each seed, never trained.

Each model is evaluated with learning_proof.py's tasks (MS-CXR-T-format temporal classification, zero-shot
on the evaluation tree's studies and on the RSNA-format set with BioViL's and synthetic-phrasing prompts,
the diagnostic probe) plus MS-CXR-T-format temporal sentence similarity, and the spread of its scores
(mean pairwise cosine of the image embeddings, std of the zero-shot scores) so that near-tied scores can be
told apart from measurements.

Statistics over seeds: per variant the mean and 95% t-interval; per variant the per-seed paired difference
to ``default`` with its 95% t-interval, "real at this scale" only when that interval excludes 0.

    python scripts/ablations.py [--seeds 0,1,2] [--steps 400] [--stage2-steps 120] [--code DIR] [--dry-run]

Writes benchmarks/results/ablations.md and .csv. Reuses the runs and evaluations already in --work.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import learning_proof as lp  # noqa: E402

ROOT = lp.ROOT
# Near-tie test of a score-based AUROC: add N(0, TIE_SIGMA) to every score (a float-level change of a cosine)
# and redraw; when the AUROC then moves by a std of TIE_AUROC_STD or more, its ranking rests on score gaps that
# small (random-init embeddings are nearly one point) and the value says nothing beyond "about chance".
TIE_SIGMA = 1e-5
TIE_AUROC_STD = 0.005
TIE_DRAWS = 20

# variant -> (stage-1 flags, stage-2 flags); every flag is a trainer flag on top of the shared ones
VARIANTS = {
    "default": ([], []),
    "no_temporal": ([], ["--lambda-temporal", "0"]),
    "temporal_shuffle": ([], ["--temporal-shuffle"]),
    "local_uniform": (["--local-weighting", "uniform"], ["--local-weighting", "uniform"]),
    "local_batch": (["--local-scope", "batch"], ["--local-scope", "batch"]),
    "series_len_2": ([], ["--series-len", "2"]),
    "series_len_6": ([], ["--series-len", "6"]),
}
# the flag that must be in the trainer's --help for a variant to run (all others need nothing new)
NEEDS_FLAG = {"temporal_shuffle": "--temporal-shuffle", "local_uniform": "--local-weighting",
              "local_batch": "--local-scope", "series_len_2": "--series-len", "series_len_6": "--series-len"}

# (key in the evaluation row, column label, shown x100)
METRICS = [
    ("study_macro", "temporal cls, study feats (macro-acc %)", True),
    ("frontal_macro", "temporal cls, frontal feats (macro-acc %)", True),
    ("zs_mimic_frontal", "zero-shot eval studies, frontal (AUROC)", False),
    ("zs_mimic_study", "zero-shot eval studies, +lateral (AUROC)", False),
    ("zs_biovil_auroc", "zero-shot RSNA-format, BioViL prompts (AUROC)", False),
    ("zs_synth_auroc", "zero-shot RSNA-format, synthetic prompts (AUROC)", False),
    ("sentence_auroc", "temporal sentence similarity (AUROC)", False),
    ("probe_macro", "probe, study feats (macro-acc %)", True),
]
# the score-based AUROCs, whose rows carry the near-tie test (tie_<metric>: AUROC std under score noise)
TIE_METRICS = ("zs_mimic_frontal", "zs_mimic_study", "zs_biovil_auroc", "zs_synth_auroc", "sentence_auroc")


def log(msg):
    print(f"[ablations {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- statistics

def t_interval(values):
    """(mean, low, high): 95% t-interval of the mean, t_{0.975, n-1}; NaN bounds for fewer than 2 values."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_diff(variant_by_seed, default_by_seed):
    """Mean and 95% t-interval of variant - default over the seeds both have, and those seeds."""
    seeds = sorted(set(variant_by_seed) & set(default_by_seed))
    if not seeds:
        raise ValueError("paired_diff: no seed in common")
    mean, lo, hi = t_interval([variant_by_seed[s] - default_by_seed[s] for s in seeds])
    return mean, lo, hi, seeds


def verdict(lo, hi):
    if math.isnan(lo) or math.isnan(hi):
        return "one seed: no interval"
    return "real at this scale" if lo > 0 or hi < 0 else "not distinguishable"


def near_tie(auroc_noise_std_value):
    return auroc_noise_std_value >= TIE_AUROC_STD


def auroc_noise_std(pairs, sigma=TIE_SIGMA, draws=TIE_DRAWS, seed=0):
    """Std over draws of the mean AUROC of (labels, scores) pairs when each score gets N(0, sigma) added."""
    import numpy as np

    from medst_fast.eval.metrics import auroc

    rng = np.random.default_rng(seed)
    vals = [np.mean([auroc(y, np.asarray(s, dtype=np.float64) + rng.normal(0.0, sigma, len(s)))
                     for y, s in pairs]) for _ in range(draws)]
    return float(np.std(vals))


# ---------------------------------------------------------------- the grid

def available_variants(help_text, wanted):
    """The wanted variants whose trainer flag exists (help text of python -m medst_fast.pretrain), and the
    ones left out with why."""
    keep, left = [], {}
    for v in wanted:
        if v not in VARIANTS:
            raise SystemExit(f"ablations: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        flag = NEEDS_FLAG.get(v)
        if flag and flag not in help_text:
            left[v] = f"the trainer has no {flag}"
        else:
            keep.append(v)
    return keep, left


def stage1_key(variant, switches_in_stage1):
    """Name of the stage-1 configuration a variant starts from (equal stage-1 flags share one run)."""
    return variant if switches_in_stage1 and VARIANTS[variant][0] else "paper"


def common_argv(index_dir, vocab, out, seed, steps, lr, a):
    return ["--data", index_dir, "--vocab", vocab, "--model", "medst_tiny", "--max-steps", str(steps),
            "--epochs", "100000", "--out", out, "--seed", str(seed), "--amp", "none", "--device", "cpu",
            "--batch-series", str(a.batch_series), "--lr", str(lr), "--warmup-frac", str(a.warmup_frac),
            "--workers", "0", "--save-every", str(10 * steps), "--log-every", "50", "--progress", "off",
            "--eval-every", "0"]  # validation once, at the end: per-epoch validation costs ~10% at this size


def plan(variants, seeds, work, a):
    """(stage-1 runs, stage-2 runs): name -> trainer argv, ordered by seed, and stage-2 name -> its stage-1
    run. Stage 1 has no temporal loss; stage 2 starts from the stage-1 run of its own seed."""
    index_dir, vocab = os.path.join(work, "index"), os.path.join(work, "vocab.txt")
    s1, s2, base_of = {}, {}, {}
    for seed in seeds:
        for v in variants:
            f1, f2 = VARIANTS[v]
            key = stage1_key(v, a.switches_in_stage1)
            base = f"s1_{key}_s{seed}"
            if base not in s1:
                s1[base] = common_argv(index_dir, vocab, os.path.join(work, f"run_{base}"), seed, a.steps, a.lr,
                                       a) + (f1 if key != "paper" else []) + ["--lambda-temporal", "0"]
            init = os.path.join(work, f"run_{base}", "final", "model.safetensors")
            s2[f"{v}_s{seed}"] = common_argv(index_dir, vocab, os.path.join(work, f"run_{v}_s{seed}"), seed,
                                            a.stage2_steps, a.stage2_lr, a) + f2 + ["--init", init]
            base_of[f"{v}_s{seed}"] = base
    return s1, s2, base_of


def command(argv):
    return "python -m medst_fast.pretrain " + " ".join(shlex.quote(x) for x in argv)


# ---------------------------------------------------------------- evaluation (one model per subprocess)

def score_spread(model, tok, eval_raw, prompts_file):
    """Mean pairwise cosine of the RSNA-format image embeddings, of the MS-CXR-T frontal images and of the
    sentence embeddings, and the std of the RSNA zero-shot scores (positive - negative cosine)."""
    import numpy as np
    import pandas as pd

    from medst_fast.eval import common, msxrt_image, msxrt_sentence, rsna_zeroshot
    from medst_fast.similarity import mean_pairwise_cosine
    from medst_fast.zero_shot import zero_shot_logits

    rsna = os.path.join(eval_raw, "rsna")
    labels = common.find_file(rsna, [rsna_zeroshot.LABELS_CSV], "RSNA stage_2_train_labels.csv")
    df = pd.concat(list(rsna_zeroshot.official_split(labels).values()))  # the order evaluate(split="all") uses
    ids, y = list(df["patientId"]), df["Target"].to_numpy().astype(np.int64)
    image_dir = os.path.join(os.path.dirname(labels), rsna_zeroshot.IMAGE_DIR)
    img = common.embed_images(model, [rsna_zeroshot.image_path(image_dir, p) for p in ids])
    out = {"cos_rsna": mean_pairwise_cosine(img)}
    for key, prompts in (("biovil", None), ("synth", rsna_zeroshot.read_prompts(prompts_file))):
        pos, neg = prompts if prompts else (rsna_zeroshot.POSITIVE_PROMPTS, rsna_zeroshot.NEGATIVE_PROMPTS)
        logits = zero_shot_logits(model, rsna_zeroshot.classifier(model, tok, pos, neg), img, logit_scale=1.0)
        score = (logits[:, 0] - logits[:, 1]).numpy().astype(np.float64)
        out[f"score_std_{key}"] = float(score.std())
        out[f"tie_zs_{key}_auroc"] = auroc_noise_std([(y, score)])
    csv_path = msxrt_image.find_csv(os.path.join(eval_raw, "msxrt"))
    df = msxrt_image.read_csv(csv_path)
    frontal_ids = sorted(set(df.dicom_id) | set(df.previous_dicom_id))
    emb, _ = msxrt_image.image_features(model, msxrt_image.ImageResolver([os.path.join(eval_raw, "msxrt"),
                                                                          eval_raw]), frontal_ids, "frontal")
    out["cos_msxrt_frontal"] = mean_pairwise_cosine(np.stack([emb[d] for d in frontal_ids]))
    s1, s2, ys = msxrt_sentence.read_pairs(msxrt_sentence.find_csv(os.path.join(eval_raw, "msxrt")))
    sent = common.embed_texts(model, tok, msxrt_sentence.clean(list(s1) + list(s2)))
    out["cos_sentences"] = mean_pairwise_cosine(sent)
    sim = msxrt_sentence.similarities(model, tok, s1, s2)
    out["sentence_auroc"] = msxrt_sentence.score(sim, ys).get("RadGraph", "auroc")
    out["tie_sentence_auroc"] = auroc_noise_std([(ys, sim)])
    return out


def eval_one(work, name, out_json):
    """Evaluates run_<name>/final (or, for random_s<seed>, the initial weights of that seed) into out_json."""
    import torch

    from medst_fast import MedST, from_pretrained
    from medst_fast.eval.common import load_tokenizer

    torch.set_num_threads(1)
    t0 = time.time()
    vocab, eval_raw = os.path.join(work, "vocab.txt"), os.path.join(work, "eval_raw")
    prompts = os.path.join(work, "synthetic_prompts.json")
    if name.startswith("random_s"):
        seed = int(name[len("random_s"):])
        cfg = from_pretrained(os.path.join(work, f"run_s1_paper_s{seed}", "final")).cfg
        torch.manual_seed(seed)  # the trainer seeds right before it builds the model: its initial weights
        model = MedST(cfg)
    else:
        model = from_pretrained(os.path.join(work, f"run_{name}", "final"))
    model.eval()
    tok = load_tokenizer(vocab, model)
    scores = {}
    ev = lp.evaluate(model, tok, eval_raw, prompts, (42, 100, 666), (5,), scores=scores)
    row = lp.summary_row(ev, 5)
    row["tie_zs_mimic_frontal"] = auroc_noise_std([(y, f) for y, f, _ in scores.values()])
    row["tie_zs_mimic_study"] = auroc_noise_std([(y, st) for y, _, st in scores.values()])
    row.update(score_spread(model, tok, eval_raw, prompts))
    row["eval_s"] = time.time() - t0
    tmp = out_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, out_json)


def evaluate_run(work, name, cwd):
    out = os.path.join(work, f"eval_{name}.json")
    if not os.path.isfile(out):
        # PYTHONPATH: the script's own folder would otherwise put the installed medst_fast first
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=cwd)
        with open(os.path.join(work, f"eval_{name}.log"), "w") as f:
            r = subprocess.run([sys.executable, os.path.join(HERE, "ablations.py"), "--work", work,
                                "--eval-one", name], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        if r.returncode != 0:
            raise SystemExit(f"{name}: evaluation failed (exit {r.returncode}); see {work}/eval_{name}.log")
    with open(out) as f:
        return json.load(f)


# ---------------------------------------------------------------- the report

def fmt(x, pct):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def seed_values(rows, variant, key):
    """seed -> value of one metric for one variant (rows: run name -> evaluation row)."""
    out = {}
    for n, r in rows.items():
        v, _, s = n.rpartition("_s")
        if v == variant:
            out[int(s)] = r[key]
    return out


def tie_note(rows, variant, key):
    if key not in TIE_METRICS:
        return ""
    sd = [r[f"tie_{key}"] for n, r in rows.items() if n.rpartition("_s")[0] == variant]
    hit = [x for x in sd if near_tie(x)]
    if hit:
        return f"near-tie scores in {len(hit)} of {len(sd)} seeds (AUROC std under score noise up to {max(sd):.3f})"
    return ""


def summarise(rows, variants):
    """Long-format records: per variant and metric the mean, interval, per-seed values, paired difference vs
    default and verdict."""
    recs = []
    for v in ["random"] + variants:
        for key, label, pct in METRICS:
            vals = seed_values(rows, v, key)
            if not vals:
                continue
            mean, lo, hi = t_interval([vals[s] for s in sorted(vals)])
            rec = {"variant": v, "metric": key, "label": label, "pct": pct, "n_seeds": len(vals), "mean": mean,
                   "ci_low": lo, "ci_high": hi, "per_seed": vals, "note": tie_note(rows, v, key)}
            if v != "default" and seed_values(rows, "default", key):
                d, dlo, dhi, _ = paired_diff(vals, seed_values(rows, "default", key))
                rec.update(diff=d, diff_low=dlo, diff_high=dhi, verdict=verdict(dlo, dhi))
            recs.append(rec)
    return recs


def to_csv_text(recs):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "metric", "n_seeds", "mean", "ci95_low", "ci95_high", "per_seed", "diff_vs_default",
                "diff_ci95_low", "diff_ci95_high", "verdict", "note"])
    for r in recs:
        w.writerow([r["variant"], r["metric"], r["n_seeds"], r["mean"], r["ci_low"], r["ci_high"],
                    ";".join(f"{s}:{x:.6g}" for s, x in sorted(r["per_seed"].items())), r.get("diff", ""),
                    r.get("diff_low", ""), r.get("diff_high", ""), r.get("verdict", ""), r["note"]])
    return buf.getvalue()


def grid_span(work, names):
    """Minutes from the first run's first train.log line to the last evaluation file written, over every call
    that built this --work (a rerun reuses what is there)."""
    import datetime

    starts, ends = [], []
    for n in names:
        log_path, ev = os.path.join(work, f"run_{n}", "train.log"), os.path.join(work, f"eval_{n}.json")
        if os.path.isfile(log_path):
            with open(log_path) as f:
                first = f.readline()[:19]
            starts.append(datetime.datetime.strptime(first, "%Y-%m-%d %H:%M:%S").timestamp())
        if os.path.isfile(ev):
            ends.append(os.path.getmtime(ev))
    return (max(ends) - min(starts)) / 60 if starts and ends else None


def log_wall(work, name):
    """Seconds between the first and last timestamp of run_<name>/train.log (a run reused from an earlier
    call; Python start-up is not in it), or None."""
    import datetime

    path = os.path.join(work, f"run_{name}", "train.log")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        stamps = [line[:19] for line in f if line[:4].isdigit() and line[4] == "-"]
    if len(stamps) < 2:
        return None
    t = [datetime.datetime.strptime(x, "%Y-%m-%d %H:%M:%S") for x in (stamps[0], stamps[-1])]
    return (t[1] - t[0]).total_seconds()


def write_report(a, recs, rows, variants, left_out, s1, s2, secs, total_s, code_note, argv):
    import torch

    pct = {k: p for k, _, p in METRICS}
    seeds = a.seeds
    L = ["# Seeded ablations of the research switches (synthetic MIMIC-CXR, medst_tiny, CPU)", "",
         "Command:", "", "```", "python scripts/ablations.py " + " ".join(shlex.quote(x) for x in argv), "```", "",
         f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
         f"{torch.__version__}, Python {platform.python_version()}; training runs one thread each, {a.parallel} at "
         f"a time, `nice -n 5`, load average at the end {os.getloadavg()[1]:.1f} (5-min; a value above "
         f"the core count means other jobs shared the machine). Wall time of this call {total_s / 60:.1f} min"
         + (f"; of the whole grid, first training step to last evaluation over all calls, "
            f"{grid_span(a.work, list(s1) + list(rows)):.1f} min" if any(v is None for v in secs.values()) else "")
         + f". {code_note}", "",
         f"Design: seeds {','.join(map(str, seeds))}; every seed is its own chain from random weights: "
         f"stage 1 = {a.steps} steps at lr {a.lr}, ITA + local (no temporal loss, as in learning_proof.py)"
         + (", with the variant's local switches; " if a.switches_in_stage1 else
            ", the paper's loss, one run per seed shared by every variant of that seed; ")
         + f"stage 2 = {a.stage2_steps} steps at lr {a.stage2_lr} with the variant's loss (switch on), from the "
         "same seed's stage-1 weights. "
         + ("" if a.switches_in_stage1 else "So every difference to default is the effect of the switch over "
            "stage 2, while the seed varies stage 1 as well. ")
         + 
         f"{a.batch_series} series a step. Data: one training tree ({a.patients} synthetic patients, data seed 0) "
         f"and one evaluation tree ({a.eval_patients} other patients, seed 1000, {a.rsna} RSNA-format DICOMs) for "
         "all runs, so the intervals cover training randomness, not data sampling. random = the initial weights "
         "of each seed.", "",
         "Statistics: mean over seeds and 95% t-interval (t_{0.975,n-1}; with 3 seeds the half-width is 2.48 "
         "standard deviations of the values); the difference to default is paired by seed. Verdict \"real at "
         "this scale\" only when the paired interval excludes 0. Near-tie (score-based AUROCs only): each score gets "
         f"N(0, {TIE_SIGMA:g}) added, {TIE_DRAWS} draws; when the AUROC's std over the draws is >= {TIE_AUROC_STD}, "
         "its ranking rests on score gaps of float-rounding size, and the entry is marked: such a value carries no "
         "information beyond \"about chance\", and a difference to it is not an effect of training.", ""]
    if left_out:
        L += ["Left out: " + "; ".join(f"{v} ({why})" for v, why in left_out.items()), ""]
    L += ["## Means over seeds [95% interval]", "",
          "| variant | seeds | " + " | ".join(lbl for _, lbl, _ in METRICS) + " |",
          "|---|---|" + "---|" * len(METRICS)]
    by = {(r["variant"], r["metric"]): r for r in recs}
    for v in ["random"] + variants:
        cells = []
        for k, _, p in METRICS:
            r = by.get((v, k))
            cells.append("-" if r is None else f"{fmt(r['mean'], p)} [{fmt(r['ci_low'], p)}, {fmt(r['ci_high'], p)}]"
                         + (" (tie)" if r["note"] else ""))
        n = max((by[(v, k)]["n_seeds"] for k, _, _ in METRICS if (v, k) in by), default=0)
        L.append(f"| {v} | {n} | " + " | ".join(cells) + " |")
    L += ["", "`(tie)`: near-tie scores (see the spread table).", "",
          "## Paired difference to default (variant - default, by seed) [95% interval]", "",
          "| variant | metric | default | variant | difference [95% interval] | verdict | note |",
          "|---|---|---|---|---|---|---|"]
    for r in recs:
        if "diff" not in r:
            continue
        p = r["pct"]
        d = by[("default", r["metric"])]
        L.append(f"| {r['variant']} | {r['label']} | {fmt(d['mean'], p)} | {fmt(r['mean'], p)} | "
                 f"{'+' if r['diff'] >= 0 else ''}{fmt(r['diff'], p)} [{fmt(r['diff_low'], p)}, "
                 f"{fmt(r['diff_high'], p)}] | {r['verdict']} | {r['note']} |")
    switch = [r for r in recs if "diff" in r and r["variant"] != "random"]
    real = [r for r in switch if r["verdict"] == "real at this scale"]
    L += ["", f"{len(real)} of the {len(switch)} switch-vs-default intervals exclude 0; with no effect at all, about "
          f"{0.05 * len(switch):.1f} of them would by chance (5% each), so a lone \"real\" entry is a candidate to "
          "recheck with more seeds rather than an established effect."]
    L += ["", "## Score spread (mean over seeds)", "",
          "Mean pairwise cosine of the RSNA-format image embeddings, of the MS-CXR-T-format frontal images and of "
          "the sentence embeddings; std over the RSNA-format images of the zero-shot score (positive - negative "
          "cosine) with BioViL's and the synthetic prompts; and the near-tie test (AUROC std under score noise) of "
          "each score-based AUROC.", "",
          "| variant | cos RSNA images | cos MS-CXR-T frontals | cos sentences | score std BioViL | score std synthetic | "
          + " | ".join(f"tie {k}" for k in TIE_METRICS) + " |",
          "|---|---|---|---|---|---|" + "---|" * len(TIE_METRICS)]
    for v in ["random"] + variants:
        rs = [r for n, r in rows.items() if n.rpartition("_s")[0] == v]
        if rs:
            keys = ("cos_rsna", "cos_msxrt_frontal", "cos_sentences", "score_std_biovil", "score_std_synth")
            m = {k: sum(r[k] for r in rs) / len(rs) for k in keys + tuple(f"tie_{k}" for k in TIE_METRICS)}
            L.append(f"| {v} | {m['cos_rsna']:.4f} | {m['cos_msxrt_frontal']:.4f} | {m['cos_sentences']:.4f} | "
                     f"{m['score_std_biovil']:.2g} | {m['score_std_synth']:.2g} | "
                     + " | ".join(f"{m[f'tie_{k}']:.4f}" for k in TIE_METRICS) + " |")
    L += ["", "## Per seed", ""]
    for v in ["random"] + variants:
        for s in seeds:
            r = rows.get(f"{v}_s{s}")
            if r:
                L.append(f"- {v} seed {s}: " + ", ".join(f"{k} {fmt(r[k], pct[k])}" for k, _, _ in METRICS))
    L += ["", "## Runs: commands and wall time", "",
          "Evaluation of each model: `python scripts/ablations.py --work WORK --eval-one NAME` (one thread; "
          "NAME = a run below or random_s<seed>).", ""]
    train_total = 0.0
    for n, argv_n in list(s1.items()) + list(s2.items()):
        t, how = secs.get(n), ""
        if not t:
            t, how = log_wall(a.work, n), " (reused; from its train.log)"
        train_total += t or 0.0
        ev = rows.get(n, {}).get("eval_s")
        losses = lp.last_losses(a.work, n)
        L.append(f"- {n}: train {f'{t:.0f} s' if t else '?'}{how}" + (f", eval {ev:.0f} s" if ev else "")
                 + ("; last logged losses " + ", ".join(f"{k} {x:.3f}" for k, x in losses.items()) if losses else "")
                 + f": `{command(argv_n)}`")
    L += ["", f"Training time summed over runs: {train_total / 60:.1f} min (run-minutes, {a.parallel} in parallel); "
          f"evaluation summed: {sum(r.get('eval_s', 0) for r in rows.values()) / 60:.1f} min."]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    with open(a.out + ".csv", "w") as f:
        f.write(to_csv_text(recs))
    print("\n".join(L))


# ---------------------------------------------------------------- main

def trainer_help(cwd):
    r = subprocess.run([sys.executable, "-m", "medst_fast.pretrain", "--help"], capture_output=True, text=True,
                       cwd=cwd)
    if r.returncode != 0:
        raise SystemExit(f"python -m medst_fast.pretrain --help failed: {r.stderr[-2000:]}")
    return r.stdout


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ablations"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--eval-patients", type=int, default=120)
    ap.add_argument("--rsna", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400, help="stage-1 steps (from random weights)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--stage2-steps", type=int, default=120)
    ap.add_argument("--stage2-lr", type=float, default=2e-4)
    ap.add_argument("--batch-series", type=int, default=10)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--code", default=ROOT, help="folder whose medst_fast the runs import (a frozen copy keeps "
                                                  "every run on the same code while the checkout changes)")
    ap.add_argument("--switches-in-stage1", action="store_true",
                    help="the local switches also train stage 1 (their own stage-1 runs)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ablations"))
    ap.add_argument("--dry-run", action="store_true", help="print the grid's training commands and exit")
    ap.add_argument("--eval-one", metavar="NAME", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.seeds = [int(x) for x in a.seeds.split(",")]
    return a


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.eval_one:
        return eval_one(a.work, a.eval_one, os.path.join(a.work, f"eval_{a.eval_one}.json"))
    variants, left_out = available_variants(trainer_help(a.code), a.variants.split(","))
    left_out.update({v: "not in --variants" for v in VARIANTS if v not in variants and v not in left_out})
    if "default" not in variants:
        raise SystemExit("ablations: the default variant is the reference of every difference; keep it")
    s1, s2, base_of = plan(variants, a.seeds, a.work, a)
    if a.dry_run:
        for n, x in list(s1.items()) + list(s2.items()):
            print(f"{n}: {command(x)}")
        for v, why in left_out.items():
            print(f"# left out {v}: {why}")
        return None
    t_start = time.time()
    os.makedirs(a.work, exist_ok=True)
    lp.build_data(a.work, a.patients, a.eval_patients, 0, a.rsna)
    secs = {}

    def stage1(n):
        secs[n] = lp.run_training(n, s1[n], a.work, cwd=a.code)

    with cf.ThreadPoolExecutor(a.parallel) as ex:
        # stage-1 jobs are queued first, so a stage-2 job only starts (and waits on its stage-1 run) once
        # that run is running or done: no worker waits on a job still in the queue
        done1 = {n: ex.submit(stage1, n) for n in s1}

        def train_and_eval(n):
            done1[base_of.get(n, f"s1_paper_s{n.rpartition('_s')[2]}")].result()
            if n in s2:
                secs[n] = lp.run_training(n, s2[n], a.work, cwd=a.code)
            row = evaluate_run(a.work, n, a.code)
            log(f"{n}: evaluated ({row['eval_s']:.0f} s)")
            return n, row

        jobs = [n for s in a.seeds for n in [f"{v}_s{s}" for v in variants] + [f"random_s{s}"]]
        rows = dict(ex.map(train_and_eval, jobs))
    recs = summarise(rows, variants)
    code_note = f"Code: medst_fast imported from {a.code}" + (
        f" (git archive of commit {open(os.path.join(a.code, 'HEAD')).read().strip()}, so that every run used the "
        "same code while the shared checkout changed)." if os.path.isfile(os.path.join(a.code, "HEAD")) else ".")
    write_report(a, recs, rows, variants, left_out, s1, s2, secs, time.time() - t_start, code_note, argv)
    return recs


if __name__ == "__main__":
    main()
