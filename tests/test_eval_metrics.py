"""Evaluation metrics and protocols against hand-computed cases (and sklearn where it has the same thing)."""
import numpy as np
import pandas as pd
import pytest

from medst_fast.eval import metrics as M
from medst_fast.eval.report import TaskResult, to_csv, to_markdown, write_report


def test_accuracy_and_macro_accuracy_by_hand():
    assert M.accuracy([0, 1, 2, 1], [0, 2, 2, 1]) == pytest.approx(0.75)
    # class 0 recall 2/3, class 1 recall 1/1 -> 5/6 (plain accuracy 3/4)
    assert M.balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    # a predicted class absent from the labels does not count as a class
    assert M.balanced_accuracy([0, 0, 1, 1], [2, 0, 1, 1]) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError):
        M.accuracy([0, 1], [0])


def test_f1_by_hand():
    assert M.f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)  # tp 1, fp 1, fn 1
    assert M.f1_binary([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.8)  # tp 2, fn 1
    assert M.f1_binary([0, 0], [0, 0]) == 0.0


def test_auroc_by_hand_with_ties():
    # positives 0.35 (beats 0.1, loses to 0.4) and 0.8 (beats both): 3 of 4 pairs
    assert M.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # positive 2 vs negatives 1 (win) and 2 (tie): 1.5 / 2
    assert M.auroc([0, 0, 1], [1, 2, 2]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one class"):
        M.auroc([1, 1], [0.2, 0.3])


def test_hard_prediction_auroc_is_balanced_accuracy():
    y, pred = [0, 0, 0, 1, 1], [0, 1, 0, 1, 0]
    # pairs: pos(1) beats neg 0,0 and ties neg 1; pos(0) ties negs 0,0, loses to 1 -> 3.5 / 6
    assert M.auroc(y, pred) == pytest.approx(3.5 / 6)
    assert M.auroc(y, pred) == pytest.approx(M.balanced_accuracy(y, pred))


def test_auroc_matches_sklearn_random():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    assert M.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)


def test_kfold_indices():
    folds = M.kfold_indices(5, 2)
    assert [list(te) for _, te in folds] == [[0, 1, 2], [3, 4]]
    assert [list(tr) for tr, _ in folds] == [[3, 4], [0, 1, 2]]
    ms = pytest.importorskip("sklearn.model_selection")
    for n, k in ((23, 10), (361, 10), (10, 10)):
        ref = list(ms.KFold(n_splits=k).split(np.zeros(n)))
        for (a, b), (c, d) in zip(M.kfold_indices(n, k), ref):
            assert np.array_equal(a, c) and np.array_equal(b, d)
    with pytest.raises(ValueError):
        M.kfold_indices(3, 4)


def test_best_threshold_by_hand():
    # start (0, acc 0.5): t=0 predicts all positive; the first t >= 0.102 gives 0.75, the first >= 0.297 gives 1
    t, acc = M.best_threshold([0.102, 0.297, 0.6, 0.9], [0, 0, 1, 1])
    assert acc == 1.0 and t == pytest.approx(0.3)
    # all-negative labels: the first t >= 0.9 predicts nothing positive
    t, acc = M.best_threshold([0.9, 0.8], [0, 0])
    assert acc == 1.0 and t == pytest.approx(0.9)
    # nothing beats the start (t = 0 already perfect): t stays 0
    assert M.best_threshold([0.3, 0.4], [1, 1]) == (0.0, 1.0)


def test_official_vs_honest_threshold_accuracy_by_hand():
    sim = [0.9, 0.102, 0.712, 0.312]
    y = [1, 0, 1, 0]
    # fold 1: test {0,1}, train {0.712:1, 0.312:0} -> t = 0.315, test acc 1.0
    # fold 2: test {2,3}, train {0.9:1, 0.102:0} -> t = 0.105, test acc 0.5 (0.312 > 0.105 is wrong)
    acc, thr = M.official_threshold_accuracy(sim, y, n_splits=2)
    assert thr == pytest.approx(0.315)
    assert acc == 1.0  # the best test fold's threshold, applied to all pairs
    mean, std, per_fold = M.honest_threshold_accuracy(sim, y, n_splits=2)
    assert per_fold == [1.0, 0.5]
    assert mean == pytest.approx(0.75) and std == pytest.approx(0.25)


def test_official_threshold_ties_keep_first_fold():
    sim = [0.9, 0.102, 0.612, 0.412]
    y = [1, 0, 1, 0]
    # fold 1: train {0.612:1, 0.412:0} -> t 0.415, test acc 1.0; fold 2: train {0.9, 0.102} -> t 0.105,
    # test: 0.612 T ok, 0.412 T wrong -> 0.5. Fold 1 wins.
    acc, thr = M.official_threshold_accuracy(sim, y, n_splits=2)
    assert thr == pytest.approx(0.415) and acc == 1.0
    # equal test accuracy (0.5) in both folds, thresholds 0.315 and 0: the first fold's is kept;
    # applied to all: 0.102 (pos) wrong, 0.212, 0.412, 0.312 right -> 0.75
    acc, thr = M.official_threshold_accuracy([0.102, 0.212, 0.412, 0.312], y, n_splits=2)
    assert thr == pytest.approx(0.315) and acc == pytest.approx(0.75)


def test_svc_cross_val_matches_sklearn():
    ms = pytest.importorskip("sklearn.model_selection")
    svm = pytest.importorskip("sklearn.svm")
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [9, 7, 5])
    X = rng.normal(size=(len(y), 6)) + y[:, None] * 0.7
    accs, maccs = M.svc_cross_val(X, y, 3)
    ref_acc = ms.cross_val_score(svm.SVC(kernel="linear"), X, y, cv=3)
    ref_bal = ms.cross_val_score(svm.SVC(kernel="linear"), X, y, cv=3, scoring="balanced_accuracy")
    assert np.allclose(accs, ref_acc) and np.allclose(maccs, ref_bal)


def test_classify_protocol_matches_direct_official_computation():
    """Whole-CSV shuffle with the seed, then per-finding dropna, as the official script orders it."""
    ms = pytest.importorskip("sklearn.model_selection")
    svm = pytest.importorskip("sklearn.svm")
    from medst_fast.eval.msxrt_image import FINDINGS, LABELS, classify

    rng = np.random.default_rng(2)
    n = 30
    labels = np.array(list(LABELS))
    df = pd.DataFrame({"dicom_id": [f"c{i}" for i in range(n)], "previous_dicom_id": [f"p{i}" for i in range(n)],
                       "study_id": range(n), "subject_id": range(n)})
    for j, f in enumerate(FINDINGS):
        col = labels[(np.arange(n) + j) % 3].astype(object)
        col[rng.random(n) < 0.3] = None
        df[f"{f}_progression"] = col
    feats = {k: rng.normal(size=4) for k in list(df["dicom_id"]) + list(df["previous_dicom_id"])}
    for i in range(n):  # make the label learnable from the pair
        feats[f"c{i}"][0] += (i % 3)
    out = classify(df, feats, seeds=(42, 100), folds=(3,))
    for s_i, seed in enumerate((42, 100)):
        sh = df.sample(frac=1, random_state=seed)
        per = []
        for f in FINDINGS:
            sub = sh.dropna(subset=[f"{f}_progression"])
            X = np.stack([np.concatenate([feats[a], feats[b]]) for a, b in zip(sub.dicom_id, sub.previous_dicom_id)])
            y = sub[f"{f}_progression"].map(LABELS).to_numpy()
            ref = ms.cross_val_score(svm.SVC(kernel="linear"), X, y, cv=3).mean()
            assert out[(f, 3)]["acc"][s_i] == pytest.approx(ref)
            per.append(ref)
        assert out[("average", 3)]["acc"][s_i] == pytest.approx(np.mean(per))
    with pytest.raises(ValueError, match="fewer than the 40 CV folds"):
        classify(df, feats, seeds=(42,), folds=(40,))


def test_mean_std_is_population_std():
    assert M.mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_report_markdown_and_csv(tmp_path):
    r = TaskResult("demo", meta={"data": "x.csv"})
    r.add("RadGraph", "auroc", 0.8125, n=16)
    r.add("RadGraph", "accuracy_cv10", 0.75, 0.05, 16, note="honest")
    md = to_markdown([r])
    assert "| RadGraph | auroc | 0.8125 |" in md and "| accuracy_cv10 (%) | 75.00 |  | 5.00 | 16 |  |  |  | honest |" in md
    assert "verdict: no score here has a chance test" in md  # rows without a chance level are not judged
    rows = list(pd.read_csv(__import__("io").StringIO(to_csv([r]))).itertuples())
    assert rows[1].value == 0.75 and rows[1].std == 0.05 and rows[0].metric == "auroc"
    paths = write_report([r], str(tmp_path / "out"), "python -m x", stem="demo")
    assert "python -m x" in open(paths["md"]).read()
    assert r.get("RadGraph", "auroc") == 0.8125
    with pytest.raises(KeyError):
        r.get("RadGraph", "f1")


def test_auroc_refuses_nan_scores():
    # argsort puts NaN last, so the old ranks called an all-NaN score perfect (1.0)
    with pytest.raises(ValueError, match=r"4 of 4 rows of scores/predictions are not finite"):
        M.auroc([0, 0, 1, 1], [np.nan] * 4)
    with pytest.raises(ValueError, match=r"1 of 4 rows .*first at row 2"):
        M.auroc([0, 0, 1, 1], [0.1, 0.2, np.inf, 0.4])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_metric_refuses_non_finite_input(bad):
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0, 1, 0])
    s = np.linspace(0.1, 0.9, 10)
    s[3] = bad
    calls = [lambda: M.accuracy(y, s), lambda: M.balanced_accuracy(y, s), lambda: M.f1_binary(y, s),
             lambda: M.auroc(y, s), lambda: M.best_threshold(s, y), lambda: M.official_threshold_accuracy(s, y, 2),
             lambda: M.honest_threshold_accuracy(s, y, 2), lambda: M.mean_std([0.5, bad]),
             lambda: M.auroc(np.where(np.arange(10) == 4, bad, y), np.linspace(0, 1, 10))]  # bad labels too
    for call in calls:
        with pytest.raises(ValueError, match="not finite"):
            call()
    pytest.importorskip("sklearn.svm")
    X = np.random.default_rng(0).normal(size=(10, 3))
    X[7, 1] = bad
    with pytest.raises(ValueError, match=r"SVC cross-validation: 1 of 10 rows of classifier features .*row 7"):
        M.svc_cross_val(X, y, 2)


def test_require_finite_names_task_rows_and_first_item():
    good = np.ones((3, 4), dtype=np.float32)
    assert M.require_finite(good, "x", "t") is not None
    assert M.require_finite(np.array(["a", "b"], dtype=object), "labels") is not None  # strings pass
    bad = good.copy()
    bad[1, 2] = np.nan
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"^rsna_zeroshot: 2 of 3 rows of image embeddings .*row 1, patientId b"):
        M.require_finite(bad, "image embeddings", "rsna_zeroshot", names=["patientId a", "patientId b", "c"])
