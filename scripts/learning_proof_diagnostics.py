"""Why the learning proof's numbers look the way they do: three measurements on its trained models.

Run after ``scripts/learning_proof.py`` with the same ``--work``; reads nothing else and trains nothing.

1. RSNA-format zero-shot vs in-domain zero-shot. The RSNA-format images differ from the training images in
   two ways the official pipeline keeps (no augmentation): a square 256-px canvas (the MIMIC-format images
   are portrait, so resize-and-pad frames the chest differently) and 12-bit pixels stretched by their maximum
   on reading. Each shift is applied alone and together to the evaluation tree's own frontal images, and the
   frontal zero-shot AUROC (consolidation or pneumonia present) is measured on them.
2. What the temporal loss changes in the representation: cross-validated ridge probes on study embeddings for
   each finding's severity (Spearman, grouped by patient), the same within patient (patient means removed,
   Pearson), and the study's position in its series within patient.
3. The frontal-only path of a two-view model: mean pairwise cosine of frontal-only vs two-view embeddings in
   eval mode (BatchNorm running statistics). A tight cluster means the SVC on unit vectors sees little spread.

    python scripts/learning_proof_diagnostics.py [--work /tmp/medst_learning_proof]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import learning_proof as lp  # noqa: E402

FINDINGS = ("consolidation", "edema", "pleural_effusion", "pneumonia", "pneumothorax")


def load(work, name):
    from medst_fast import MedST, from_pretrained

    if name == "random":
        torch.manual_seed(0)
        return MedST(from_pretrained(os.path.join(work, "run_base", "final")).cfg).eval()
    return from_pretrained(os.path.join(work, f"run_{name}", "final")).eval()


def eval_studies(eval_raw):
    with open(os.path.join(eval_raw, "ground_truth.json")) as f:
        g = json.load(f)
    studies = [s for s in g["studies"].values() if any(v["view"] in ("PA", "AP") for v in s["views"])]
    fr = [os.path.join(eval_raw, next(v["path"] for v in s["views"] if v["view"] in ("PA", "AP"))) for s in studies]
    la = [next((os.path.join(eval_raw, v["path"]) for v in s["views"] if v["view"] in ("LATERAL", "LL")), None)
          for s in studies]
    return studies, fr, la


def domain_shift(model, tok, frontal_imgs, y):
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from medst_fast.eval import common, rsna_zeroshot

    def square(a):
        return np.asarray(Image.fromarray(a).resize((256, 256), Image.BILINEAR))

    def stretch(a):  # what reading a 12-bit DICOM scaled by 255/max does to an image whose max is below 255
        return np.clip(np.rint(a.astype(np.float64) * 255.0 / max(1, int(a.max()))), 0, 255).astype(np.uint8)

    p = lp.SYNTH_PROMPTS
    t = (rsna_zeroshot.class_embedding(model, tok, p["positive"]) -
         rsna_zeroshot.class_embedding(model, tok, p["negative"])).numpy()
    S = model.cfg.vision.img_size
    out = {}
    for name, fn in (("as_is", lambda a: a), ("square", square), ("stretch", stretch),
                     ("both", lambda a: stretch(square(a)))):
        x = torch.stack([common.eval_transform(fn(a), S) for a in frontal_imgs])
        with torch.inference_mode():
            e = model.encode_image(x).numpy()
        out[name] = roc_auc_score(y, e @ t)
    return out


def probes(E, Y, order, groups):
    from scipy.stats import spearmanr
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(X, t):
        m = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        return cross_val_predict(m, X, t, cv=GroupKFold(5), groups=groups)

    sev = [spearmanr(fit(E, Y[:, k]), Y[:, k])[0] for k in range(Y.shape[1])]
    Ec, Yc, Oc = E.copy(), Y.astype(float), order.astype(float)
    for p in np.unique(groups):
        i = groups == p
        Ec[i] -= Ec[i].mean(0)
        Yc[i] -= Yc[i].mean(0)
        Oc[i] -= Oc[i].mean()
    within = [np.corrcoef(fit(Ec, Yc[:, k]), Yc[:, k])[0, 1] for k in range(Y.shape[1])]
    return sev, within, float(np.corrcoef(fit(Ec, Oc), Oc)[0, 1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "medst_learning_proof"))
    ap.add_argument("--out", default=os.path.join(lp.ROOT, "benchmarks", "results", "learning_proof_diagnostics.md"))
    a = ap.parse_args(argv)
    from medst_fast.eval import common
    from medst_fast.eval.common import load_tokenizer
    from medst_fast.similarity import mean_pairwise_cosine

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    eval_raw, vocab = os.path.join(a.work, "eval_raw"), os.path.join(a.work, "vocab.txt")
    studies, fr, la = eval_studies(eval_raw)
    Y = np.array([[s["findings"][f] for f in FINDINGS] for s in studies])
    order = np.array([s["order"] for s in studies])
    groups = np.array([int(s["subject_id"]) for s in studies])
    y_cp = (Y[:, FINDINGS.index("consolidation")] > 0) | (Y[:, FINDINGS.index("pneumonia")] > 0)
    frontal_imgs = [common.read_image(p) for p in fr]
    both = [i for i, l in enumerate(la) if l]

    lines = ["# Learning proof: diagnostics", "", "Command:", "", "```",
             "python scripts/learning_proof_diagnostics.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "```", "", f"On the models of `{a.work}` (see learning_proof.md); evaluation tree: {len(studies)} studies "
             f"with a frontal, {len(both)} of them with a lateral.", "",
             "## 1. RSNA-format shifts applied to in-domain images (frontal zero-shot AUROC, consolidation or "
             "pneumonia present)", "", "| model | as is | square 256 canvas | max-stretch | both |", "|---|---|---|---|---|"]
    names = ["random", "base", "base_frontal", "full", "no_temporal"]
    for n in names:
        m = load(a.work, n)
        d = domain_shift(m, load_tokenizer(vocab, m), frontal_imgs, y_cp)
        lines.append(f"| {n} | {d['as_is']:.3f} | {d['square']:.3f} | {d['stretch']:.3f} | {d['both']:.3f} |")
    lines += ["", "## 2. What the representation encodes (study embeddings, probes cross-validated by patient)", "",
              "| model | severity (Spearman) " + " / ".join(f[:5] for f in FINDINGS) +
              " | within-patient severity (Pearson) | within-patient series position |", "|---|---|---|---|"]
    for n in ["random", "base", "no_temporal", "full", "fmc_only", "rmr_only"]:
        m = load(a.work, n)
        E = common.embed_studies(m, list(zip(fr, la))).numpy()
        sev, within, pos = probes(E, Y, order, groups)
        lines.append(f"| {n} | " + " / ".join(f"{x:.2f}" for x in sev) + " | " +
                     " / ".join(f"{x:.2f}" for x in within) + f" | {pos:.2f} |")
    lines += ["", "## 3. Spread of the embeddings in eval mode (mean pairwise cosine; studies with a lateral)", "",
              "| model | frontal only | frontal + lateral |", "|---|---|---|"]
    for n in ["base", "full", "base_frontal", "no_lateral"]:
        m = load(a.work, n)
        e_f = common.embed_images(m, [fr[i] for i in both]).numpy()
        e_s = (common.embed_studies(m, [(fr[i], la[i]) for i in both]).numpy()
               if m.cfg.vision.lateral_expert else None)
        lines.append(f"| {n} | {mean_pairwise_cosine(e_f):.3f} | " +
                     ("-" if e_s is None else f"{mean_pairwise_cosine(e_s):.3f}") + " |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
