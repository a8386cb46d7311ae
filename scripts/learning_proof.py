"""Evidence that pretraining learns (trained vs random weights), on the synthetic MIMIC-CXR with planted signal,
CPU only.

Pretrains medst_tiny with the real trainer (``python -m medst_fast.pretrain``) on a synthetic training tree and
evaluates on a *separate* synthetic tree (other seed, other patients). Med-ST itself starts from MGCA, an
image-text aligned model, and adds the temporal loss; the proof follows the same two stages:

- stage 1 (``--steps``, ``--lr``), from random weights, ITA + local loss only:
  ``base`` (frontal + lateral) and ``base_frontal`` (the same config with ``vision.lateral_expert=false``,
  so the trainer drops the laterals);
- stage 2 (``--stage2-steps``, ``--stage2-lr``), each from its stage-1 weights, run for the same steps:
  ``full`` (ITA + local + temporal, frontal + lateral), ``no_temporal`` (``--lambda-temporal 0``),
  ``no_lateral`` (ITA + local + temporal from ``base_frontal``), and two diagnostics that keep one half of
  the temporal loss, ``fmc_only`` (``--lambda-rmr 0``) and ``rmr_only`` (``--lambda-fmc 0``); full and
  no_temporal run over several seeds (``--stage2-seeds``), since their difference is small;
- ``random``: the initial weights, never trained.

The temporal loss is not used from random weights: its cycle-back regression divides by the variance of a
softmax that sharpens early, and from scratch it swamps the image-text loss (measured: ITA above chance
after 1,200 steps). That matches the official recipe, which never runs it from scratch.

Evaluation, per variant:
- MS-CXR-T-format temporal image classification (linear SVC on [current || previous] embeddings, 5-fold CV,
  seeds 42/100/666), with the official frontal-only features and with study features (the study's lateral
  added, how a MoVE model sees a study; a frontal-only model gets its frontal features);
- zero-shot RSNA-format pneumonia with BioViL's prompts and with prompts written in the synthetic reports'
  language (BioViL's positive prompts are mostly words the synthetic corpus never contains, so the
  synthetic WordPiece vocabulary spells them out letter by letter);
- a diagnostic probe (standardised features, balanced logistic regression), not an official protocol.

    python scripts/learning_proof.py [--steps 3000] [--stage2-steps 600] [--stage2-seeds 0,1,2]

Training runs are subprocesses with one thread each, two at a time (a model this small runs ~4x faster per
core single-threaded). Writes benchmarks/results/learning_proof.md (and .csv) with the command, the numbers
and the expectations checked from the numbers, never forced.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FINDINGS = ("consolidation", "edema", "pleural_effusion", "pneumonia", "pneumothorax")
# Prompts in the synthetic reports' own phrasing (medst_fast.data.synth writes "There is a moderate pneumonia
# in the right lower lobe." and "No pneumonia."); the RSNA-format positives carry pneumonia + consolidation.
SYNTH_PROMPTS = {
    "positive": ["There is a moderate pneumonia in the right lower lobe.",
                 "There is a large pneumonia in the left lower lobe.",
                 "There is a moderate consolidation in the right lower lobe.",
                 "There is a large consolidation in the left lower lobe."],
    "negative": ["No pneumonia.", "No consolidation.", "No acute cardiopulmonary process."],
}

# Per-finding prompts for zero-shot on the evaluation tree's own studies (its CheXpert-format labels).
FINDING_PROMPTS = {
    "Consolidation": (["There is a moderate consolidation in the right lower lobe.",
                       "There is a large consolidation in the left lower lobe."], ["No consolidation."]),
    "Edema": (["There is a moderate pulmonary edema.", "There is a severe pulmonary edema."], ["No pulmonary edema."]),
    "Pleural Effusion": (["There is a moderate right pleural effusion.", "There is a large left pleural effusion."],
                         ["No pleural effusion."]),
    "Pneumonia": (["There is a moderate pneumonia in the right lower lobe.",
                   "There is a severe pneumonia in the left lower lobe."], ["No pneumonia."]),
    "Pneumothorax": (["There is a moderate right pneumothorax.", "There is a large left pneumothorax."],
                     ["No pneumothorax."]),
}


def log(msg):
    print(f"[learning_proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_data(work, patients, eval_patients, seed, rsna):
    from medst_fast.data import prepare, synth
    from medst_fast.data.index import SeriesIndex
    from medst_fast.train.data import build_wordpiece_vocab

    train_raw, index_dir = os.path.join(work, "train_raw"), os.path.join(work, "index")
    eval_raw = os.path.join(work, "eval_raw")
    if not os.path.isfile(os.path.join(index_dir, "meta.json")):
        log(f"synthetic training tree: {patients} patients (seed {seed})")
        synth.generate(train_raw, patients=patients, seed=seed, extras=False, zip_reports=False)
        prepare.prepare_mimic(train_raw, train_raw, index_dir, cache_size=128, workers=2, mode="study",
                              progress=False)
    vocab = os.path.join(work, "vocab.txt")
    if not os.path.isfile(vocab):
        idx = SeriesIndex.load(index_dir)
        build_wordpiece_vocab([s.text for s in idx.studies if s.split == "train"], work)
    if not os.path.isdir(os.path.join(eval_raw, "msxrt")):
        log(f"synthetic evaluation tree: {eval_patients} patients (seed {seed + 1000}), RSNA {rsna} images")
        synth.generate(eval_raw, patients=eval_patients, seed=seed + 1000, extras=True, zip_reports=False,
                       rsna=rsna, covidx=3)
    prompts = os.path.join(work, "synthetic_prompts.json")
    with open(prompts, "w") as f:
        json.dump(SYNTH_PROMPTS, f, indent=1)
    return index_dir, vocab, eval_raw, prompts


# name -> (stage, model overrides, extra trainer flags, init from)
PLAN = {
    "base": (1, [], ["--lambda-temporal", "0"], None),
    "base_frontal": (1, ["vision.lateral_expert=false"], ["--lambda-temporal", "0"], None),
    "full": (2, [], [], "base"),
    "no_temporal": (2, [], ["--lambda-temporal", "0"], "base"),
    "no_lateral": (2, ["vision.lateral_expert=false"], [], "base_frontal"),
    # the two halves of the temporal loss, to locate what it does (diagnostic)
    "fmc_only": (2, [], ["--lambda-rmr", "0"], "base"),
    "rmr_only": (2, [], ["--lambda-fmc", "0"], "base"),
}
MULTI_SEED = ("full", "no_temporal")  # the temporal comparison is small: run it over --stage2-seeds


def run_name(variant, seed, first_seed):
    return variant if seed == first_seed else f"{variant}_s{seed}"


def train_argv(variant, seed, index_dir, vocab, work, a):
    stage, overrides, flags, init = PLAN[variant]
    steps, lr = (a.steps, a.lr) if stage == 1 else (a.stage2_steps, a.stage2_lr)
    argv = ["--data", index_dir, "--vocab", vocab, "--model", "medst_tiny", "--max-steps", str(steps),
            "--epochs", "100000", "--out", os.path.join(work, f"run_{run_name(variant, seed, a.seed)}"),
            "--seed", str(seed), "--amp", "none", "--device", "cpu", "--batch-series", str(a.batch_series),
            "--lr", str(lr), "--warmup-frac", str(a.warmup_frac), "--workers", "0", "--save-every", str(10 * steps),
            "--log-every", "250", "--progress", "off"]
    for o in overrides:
        argv += ["--model-override", o]
    argv += flags
    if init:
        argv += ["--init", os.path.join(work, f"run_{init}", "final", "model.safetensors")]
    return argv


def run_training(name, argv, work, cwd=ROOT):
    """Trains one run as a subprocess (one thread); cwd: where ``medst_fast`` is imported from."""
    final = os.path.join(work, f"run_{name}", "final")
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        log(f"{name}: reusing {final}")
        return None
    log(f"{name}: pretraining")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    logf = os.path.join(work, f"{name}.log")
    with open(logf, "w") as f:
        r = subprocess.run([sys.executable, "-m", "medst_fast.pretrain"] + argv, stdout=f, stderr=subprocess.STDOUT,
                           env=env, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit(f"{name}: pretraining failed (exit {r.returncode}); see {logf}")
    secs = time.time() - t0
    log(f"{name}: done in {secs:.0f}s")
    return secs


def last_losses(work, variant):
    import csv

    path = os.path.join(work, f"run_{variant}", "metrics.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: float(rows[-1][k]) for k in ("ita", "local", "temporal")} if rows else {}


def evaluate(model, tok, eval_raw, prompts_file, seeds, folds, scores=None):
    """``scores``: an optional dict that findings_zeroshot fills with the scores behind its AUROCs."""
    from medst_fast.eval import msxrt_image, rsna_zeroshot

    csv = msxrt_image.find_csv(os.path.join(eval_raw, "msxrt"))
    roots = [os.path.join(eval_raw, "msxrt"), eval_raw]
    out = {"frontal": msxrt_image.evaluate(model, csv, roots, seeds=seeds, folds=folds, batch_size=64)}
    out["study"] = (msxrt_image.evaluate(model, csv, roots, seeds=seeds, folds=folds, batch_size=64, views="study")
                    if model.cfg.vision.lateral_expert else out["frontal"])
    rsna = os.path.join(eval_raw, "rsna")
    out["zs_biovil"] = rsna_zeroshot.evaluate(model, tok, rsna, split="all", batch_size=64)
    out["zs_synth"] = rsna_zeroshot.evaluate(model, tok, rsna, split="all", batch_size=64,
                                             prompts=rsna_zeroshot.read_prompts(prompts_file))
    out["probe"] = temporal_probe(model, csv, roots)
    out["zs_findings"] = findings_zeroshot(model, tok, eval_raw, scores)
    return out


def summary_row(ev, k):
    """The table's scalars from ``evaluate``'s output (k: the CV fold count the column names carry)."""
    row = {"frontal_acc": ev["frontal"].get("average", f"accuracy_cv{k}"),
           "frontal_macro": ev["frontal"].get("average", f"macro_accuracy_cv{k}"),
           "study_acc": ev["study"].get("average", f"accuracy_cv{k}"),
           "study_macro": ev["study"].get("average", f"macro_accuracy_cv{k}")}
    row.update({f"{f}_study_macro": ev["study"].get(f, f"macro_accuracy_cv{k}") for f in FINDINGS})
    row.update({"zs_biovil_auroc": ev["zs_biovil"].get("all", "auroc"),
                "zs_synth_auroc": ev["zs_synth"].get("all", "auroc"),
                "zs_synth_acc": ev["zs_synth"].get("all", "accuracy"), "probe_macro": ev["probe"]})
    zf = ev["zs_findings"]
    row.update({"zs_mimic_frontal": sum(a for a, _ in zf.values()) / len(zf),
                "zs_mimic_study": sum(b for _, b in zf.values()) / len(zf),
                "zs_pneumonia_study": zf["Pneumonia"][1]})
    return row


def findings_zeroshot(model, tok, eval_raw, scores=None):
    """Zero-shot AUROC per finding on the evaluation tree's studies (positive 1.0 vs negative 0.0 in its
    mimic-cxr-2.0.0-chexpert.csv.gz), frontal-only and with the study's lateral. Same image domain as
    training, unlike the RSNA-format set (square 256-px canvases, 12-bit pixels stretched by their maximum)."""
    import numpy as np
    import pandas as pd

    from medst_fast.eval import common, rsna_zeroshot
    from medst_fast.eval.metrics import auroc

    md = pd.read_csv(os.path.join(eval_raw, "mimic-cxr-2.0.0-metadata.csv.gz"), dtype=str)
    chex = pd.read_csv(os.path.join(eval_raw, "mimic-cxr-2.0.0-chexpert.csv.gz"), dtype={"study_id": str})
    path = lambda r: os.path.join(eval_raw, "files", f"p{r.subject_id[:2]}", f"p{r.subject_id}",  # noqa: E731
                                  f"s{r.study_id}", f"{r.dicom_id}.jpg")
    frontal, lateral = {}, {}
    for r in md.itertuples():
        if r.ViewPosition in ("PA", "AP"):
            frontal.setdefault(r.study_id, path(r))
        elif r.ViewPosition in ("LATERAL", "LL"):
            lateral.setdefault(r.study_id, path(r))
    studies = [s for s in chex.study_id if s in frontal]
    e_f = common.embed_images(model, [frontal[s] for s in studies]).numpy()
    e_s = (common.embed_studies(model, [(frontal[s], lateral.get(s)) for s in studies]).numpy()
           if model.cfg.vision.lateral_expert else e_f)
    lab = chex.set_index("study_id").loc[studies]
    out = {}
    for col, (pos, neg) in FINDING_PROMPTS.items():
        t = (rsna_zeroshot.class_embedding(model, tok, pos) - rsna_zeroshot.class_embedding(model, tok, neg)).numpy()
        keep = lab[col].isin([0.0, 1.0]).to_numpy()
        y = lab[col].to_numpy()[keep].astype(int)
        out[col] = (auroc(y, e_f[keep] @ t), auroc(y, e_s[keep] @ t))
        if scores is not None:  # (labels, frontal scores, study scores): for callers that check ties
            scores[col] = (y, e_f[keep] @ t, e_s[keep] @ t)
    return out


def temporal_probe(model, csv, roots):
    """Diagnostic, not the official protocol: standardised [current || previous] study embeddings,
    class-balanced logistic regression, 5-fold stratified CV, macro-accuracy averaged over the findings."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medst_fast.eval import msxrt_image

    df = msxrt_image.read_csv(csv)
    ids = sorted(set(df.dicom_id) | set(df.previous_dicom_id))
    views = "study" if model.cfg.vision.lateral_expert else "frontal"
    emb, _ = msxrt_image.image_features(model, msxrt_image.ImageResolver(roots), ids, views)
    scores = []
    for f in FINDINGS:
        col = df[f + "_progression"]
        d = df[col.notna()]
        X = np.stack([np.concatenate([emb[a], emb[b]]) for a, b in zip(d.dicom_id, d.previous_dicom_id)])
        y = d[f + "_progression"].to_numpy()
        clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
        pred = cross_val_predict(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=42))
        scores.append(balanced_accuracy_score(y, pred))
    return float(np.mean(scores))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "medst_learning_proof"))
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--eval-patients", type=int, default=120)
    ap.add_argument("--rsna", type=int, default=200)
    ap.add_argument("--steps", type=int, default=3000, help="stage-1 steps (from random weights)")
    ap.add_argument("--lr", type=float, default=1e-3, help="higher than the paper's 4e-5: tiny model from scratch")
    ap.add_argument("--stage2-steps", type=int, default=600)
    ap.add_argument("--stage2-lr", type=float, default=2e-4)
    ap.add_argument("--stage2-seeds", default="0,1,2", help="seeds of the full / no_temporal stage-2 runs")
    ap.add_argument("--batch-series", type=int, default=10)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="data, stage-1 and single-seed runs")
    ap.add_argument("--folds", default="5")
    ap.add_argument("--parallel", type=int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "learning_proof"))
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    t_start = time.time()
    index_dir, vocab, eval_raw, prompts = build_data(a.work, a.patients, a.eval_patients, a.seed, a.rsna)
    stage2_seeds = [int(x) for x in a.stage2_seeds.split(",")]
    if a.seed not in stage2_seeds:
        stage2_seeds = [a.seed] + stage2_seeds

    runs = {}  # run name -> (variant, seed)
    cmds, secs = {}, {}
    for stage in (1, 2):
        todo = {}
        for v, p in PLAN.items():
            if p[0] != stage:
                continue
            for seed in (stage2_seeds if v in MULTI_SEED else [a.seed]):
                todo[run_name(v, seed, a.seed)] = (v, seed)
        argvs = {n: train_argv(v, seed, index_dir, vocab, a.work, a) for n, (v, seed) in todo.items()}
        with cf.ThreadPoolExecutor(a.parallel) as ex:
            for n, t in zip(todo, ex.map(lambda n: run_training(n, argvs[n], a.work), todo)):
                secs[n] = t
        runs.update(todo)
        cmds.update({n: "python -m medst_fast.pretrain " + " ".join(shlex.quote(x) for x in argvs[n]) for n in todo})

    from medst_fast import MedST, from_pretrained
    from medst_fast.eval.common import load_tokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seeds, folds = (42, 100, 666), tuple(int(x) for x in a.folds.split(","))
    k = folds[0]
    per_run, results = {}, []
    for n in ["random"] + list(runs):
        if n == "random":
            # the trainer seeds with --seed right before building the model: these are its initial weights
            torch.manual_seed(a.seed)
            model = MedST(from_pretrained(os.path.join(a.work, "run_base", "final")).cfg)
        else:
            model = from_pretrained(os.path.join(a.work, f"run_{n}", "final"))
        model.eval()
        tok = load_tokenizer(vocab, model)
        ev = evaluate(model, tok, eval_raw, prompts, seeds, folds)
        for key in ("frontal", "study", "zs_biovil", "zs_synth"):
            if key == "study" and ev["study"] is ev["frontal"]:
                continue
            for r in ev[key].rows:
                r["task"] = f"{r['task']}[{n},{key}]"
            results.append(ev[key])
        row = summary_row(ev, k)
        per_run[n] = row
        log(f"{n}: " + ", ".join(f"{c} {x:.4f}" for c, x in row.items()))
    # one row per variant: the mean over its seeds
    table, members = {}, {"random": ["random"]}
    for n, (v, _) in runs.items():
        members.setdefault(v, []).append(n)
    for v, ns in members.items():
        table[v] = {c: sum(per_run[n][c] for n in ns) / len(ns) for c in per_run[ns[0]]}
    losses = {n: last_losses(a.work, n) for n in runs}
    write(a, table, members, per_run, results, secs, cmds, losses, time.time() - t_start, k, argv)


def write(a, table, members, per_run, results, secs, cmds, losses, total_s, k, argv):
    from medst_fast.eval import to_csv

    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    cols = ["frontal_acc", "frontal_macro", "study_acc", "study_macro"] + [f"{f}_study_macro" for f in FINDINGS] + \
           ["zs_mimic_frontal", "zs_mimic_study", "zs_pneumonia_study", "zs_biovil_auroc", "zs_synth_auroc",
            "zs_synth_acc", "probe_macro"]
    short = {f"{f}_study_macro": f[:5] for f in FINDINGS}
    lines = ["# Proof that pretraining learns (synthetic MIMIC-CXR, medst_tiny, CPU)", "",
             "Command:", "", "```",
             "python scripts/learning_proof.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])), "```", "",
             f"Total wall time {total_s / 60:.1f} min"
             + (" (some training runs were reused from an earlier call: see the commands below)"
                if any(v is None for v in secs.values()) else "")
             + f" on {os.cpu_count()} CPU cores (torch {torch.__version__}), "
             f"training runs one thread each, {a.parallel} at a time. Training tree: {a.patients} synthetic patients "
             f"(seed {a.seed}); evaluation tree: {a.eval_patients} other patients (seed {a.seed + 1000}) and {a.rsna} "
             f"RSNA-format DICOMs. Stage 1: {a.steps} steps of {a.batch_series} series at lr {a.lr} from random "
             f"weights (ITA + local); stage 2: {a.stage2_steps} steps at lr {a.stage2_lr} from the stage-1 weights; "
             f"full and no_temporal are the mean over stage-2 seeds {a.stage2_seeds}.", "",
             f"Temporal image classification (MS-CXR-T format): linear SVC (C=1) on [current || previous] embeddings, "
             f"{k}-fold CV, mean over seeds 42/100/666; accuracy and macro-accuracy in %, chance macro-accuracy "
             "33.3. `frontal_*`: the official frontal-only features; `study_*` and the per-finding columns: the "
             "study's lateral added (frontal-only models: their frontal features). Zero-shot, score-based AUROC: "
             "`zs_mimic_*` on the evaluation tree's own studies (its CheXpert-format labels, positive vs negative, "
             "prompts in the synthetic reports' phrasing, mean over the 5 findings; frontal-only or with the "
             "lateral), `zs_pneumonia_study` that AUROC for pneumonia with the lateral; `zs_biovil_auroc` / "
             "`zs_synth_*` on the RSNA-format set with BioViL's prompts / synthetic-phrasing prompts (accuracy "
             "in %). `probe_macro`: diagnostic, standardised study features, balanced logistic regression, "
             "macro-accuracy in %.", "",
             "| variant | runs | " + " | ".join(short.get(c, c) for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for v, row in table.items():
        lines.append(f"| {v} | {len(members[v])} | " + " | ".join(
            f"{row[c]:.3f}" if c.startswith("zs_") and c != "zs_synth_acc" else f"{100 * row[c]:.1f}"  # AUROCs
            for c in cols) + " |")
    lines += ["", "Per seed (study_macro / frontal_macro / zs_synth_auroc):", ""]
    for v in ("full", "no_temporal"):
        if v in members:
            lines.append(f"- {v}: " + "; ".join(
                f"{n} {100 * per_run[n]['study_macro']:.1f} / {100 * per_run[n]['frontal_macro']:.1f} / "
                f"{per_run[n]['zs_synth_auroc']:.3f}" for n in members[v]))
    lines += ["", "Last logged training losses (ITA chance level with ~35 studies a batch: 2 ln 35 = 7.1; temporal "
              "chance level: FMC 2 ln 4 = 2.8 plus RMR about 2):", ""]
    for n, l in losses.items():
        if l:
            lines.append(f"- {n}: " + ", ".join(f"{x} {y:.3f}" for x, y in l.items()))
    lines += ["", "## Expectations, checked from the numbers above (one stage-1 seed, no intervals: a PASS or FAIL here "
              "is one draw; ablations.md says which comparisons hold over seeds)", ""]

    def check(name, ok):
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {name}")

    t = table
    check("pretraining above random weights, temporal classification (study features, avg macro-accuracy)",
          t["full"]["study_macro"] > t["random"]["study_macro"])
    check("pretraining above random weights, temporal classification (official frontal-only features, avg "
          "macro-accuracy)", t["full"]["frontal_macro"] > t["random"]["frontal_macro"])
    check("pretraining above random weights, zero-shot on the evaluation tree's studies (frontal-only, mean AUROC "
          "over the findings)", t["full"]["zs_mimic_frontal"] > t["random"]["zs_mimic_frontal"])
    check("pretraining above random weights, zero-shot on the RSNA-format set (synthetic-phrasing prompts, AUROC)",
          t["full"]["zs_synth_auroc"] > t["random"]["zs_synth_auroc"])
    check("pretraining above random weights, zero-shot on the RSNA-format set (BioViL prompts, AUROC)",
          t["full"]["zs_biovil_auroc"] > t["random"]["zs_biovil_auroc"])
    check("the temporal loss helps the temporal task (study features, avg macro-accuracy, full vs no_temporal, "
          "seed means)", t["full"]["study_macro"] > t["no_temporal"]["study_macro"])
    check("the temporal loss helps the temporal task (official frontal-only features, full vs no_temporal, "
          "seed means)", t["full"]["frontal_macro"] > t["no_temporal"]["frontal_macro"])
    check("the lateral view helps the lateral-dominant finding (pneumonia, study features, macro-accuracy, "
          "full vs no_lateral)", t["full"]["pneumonia_study_macro"] > t["no_lateral"]["pneumonia_study_macro"])
    check("the lateral view helps the lateral-dominant finding (pneumonia zero-shot AUROC with the lateral, "
          "full vs no_lateral)", t["full"]["zs_pneumonia_study"] > t["no_lateral"]["zs_pneumonia_study"])
    lines += ["", "## Training commands", ""]
    for n, c in cmds.items():
        s = secs.get(n)
        lines += [f"- {n}" + (f" ({s:.0f} s)" if s else " (reused)") + f": `{c}`"]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(a.out + ".csv", "w") as f:
        f.write(to_csv(results))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
