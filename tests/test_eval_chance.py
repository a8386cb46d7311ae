"""Chance levels, intervals and verdicts of evaluation tables, checked against known values."""
import math

import numpy as np
import pytest

from medst_fast.eval import chance as C
from medst_fast.eval.report import TaskResult, to_csv, to_markdown


def test_binomial_sf_matches_direct_sum():
    n, p = 12, 0.3
    for k in (0, 1, 5, 12, 13):
        ref = sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1)) if k <= n else 0.0
        assert C.binomial_sf(k, n, p) == pytest.approx(ref, rel=1e-10, abs=1e-15)


def test_wilson_known_values():
    # 0 of 6 and 6 of 6: the interval stays inside [0, 1] and is wide (n = 6 says little)
    lo, hi = C.wilson(0, 6)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.3903, abs=1e-4)
    lo, hi = C.wilson(6, 6)
    assert hi == pytest.approx(1.0, abs=1e-12) and lo == pytest.approx(0.6097, abs=1e-4)
    lo, hi = C.wilson(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))


def test_hanley_mcneil_and_auroc_p():
    # AUC 0.8, 30 + 30 by hand: Q1 = 0.8/1.2, Q2 = 1.28/1.8, SE^2 = (0.16 + 29 (Q1 - 0.64) + 29 (Q2 - 0.64)) / 900
    lo, hi = C.hanley_mcneil(0.8, 30, 30)
    assert (hi - lo) / (2 * C.Z95) == pytest.approx(0.05769, abs=1e-4)
    assert C.hanley_mcneil(0.99, 10, 10)[1] == 1.0  # clipped to the range an AUROC has
    assert C.auroc_p(0.5, 30, 30) == pytest.approx(0.5)
    assert C.auroc_p(0.9, 30, 30) < 1e-6 and C.auroc_p(0.3, 30, 30) > 0.99
    # the Mann-Whitney null SE against a permutation estimate
    rng = np.random.default_rng(0)
    from medst_fast.eval.metrics import auroc

    y = np.array([1] * 7 + [0] * 9)
    aucs = np.array([auroc(y, rng.permutation(16).astype(float)) for _ in range(4000)])
    assert aucs.std() == pytest.approx(math.sqrt((7 + 9 + 1) / (12 * 7 * 9)), rel=0.05)


def test_chance_levels():
    assert C.majority_fraction([0, 0, 1, 2]) == 0.5
    assert C.f1_chance([1, 0, 0, 0]) == pytest.approx(2 * 0.25 / 1.25)
    assert C.f1_chance([0, 0]) == 0.0


def _res(value, n, chance, baseline=None):
    r = TaskResult("demo")
    r.add("test", "accuracy", value, n=n, chance=chance, stats=C.accuracy_stats(value, n, chance))
    if baseline is not None:
        r.rows[0]["baseline"] = baseline
    return r


def test_verdict_wording_on_known_inputs():
    # 5 of 6 right against a majority rate of 0.5: p = 7/64 = 0.109, not distinguishable, and flagged small
    v = C.verdict(_res(5 / 6, 6, 0.5).rows)
    assert v.startswith("verdict: not distinguishable from chance at p < 0.05")
    assert "smallest p 0.11" in v and "small test set (n=6)" in v
    # 80 of 100 against 0.5: far above
    v = C.verdict(_res(0.8, 100, 0.5, baseline=0.52).rows)
    assert v.startswith("verdict: above chance on 1 of 1 scores (test accuracy p 5.6e-10")
    assert "beats the random-init baseline on 1 of 1" in v and "small test set" not in v
    # below its chance level is said, not silently printed
    assert "1 below their chance level" in C.verdict(_res(0.3, 200, 0.5).rows)
    # a score equal to chance up to rounding is not below it, and a tie with the baseline is no win
    v = C.verdict(_res(0.6 - 1e-15, 50, 0.6, baseline=0.6).rows)
    assert "below" not in v and "beats the random-init baseline on 0 of 1" in v


def test_verdict_corrects_for_the_number_of_scores():
    r = TaskResult("demo")
    for i in range(5):  # each p is about 0.02: one such score passes, five at once do not (0.05 / 5)
        r.add(f"s{i}", "accuracy", 0.6, n=100, chance=0.5, stats={"p": 0.02})
    assert C.verdict(r.rows).startswith("verdict: not distinguishable")
    assert C.verdict(r.rows[:1]).startswith("verdict: above chance")


def test_table_carries_chance_baseline_interval_and_verdict():
    r, base = _res(0.8, 100, 0.5), _res(0.55, 100, 0.5)
    r.set_baseline(base)
    md = to_markdown([r])
    assert "| chance | random init | p vs chance |" in md
    assert "| test | accuracy (%) | 80.00 | 71.1" in md and "| 100 | 50.00 | 55.00 | 5.6e-10 |" in md
    assert "verdict: above chance" in md
    csv = to_csv([r])
    assert csv.splitlines()[0] == "task,subset,metric,value,std,n,ci_low,ci_high,chance,p,baseline,note"


def test_default_output_folder(tmp_path):
    from medst_fast.eval.common import default_out

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "args.json").write_text("{}")
    assert default_out(run / "final") == str(run / "eval")
    assert default_out(run / "checkpoints" / "ckpt-00000010.pt") == str(run / "eval")
    assert default_out(tmp_path / "models" / "medst") == str(tmp_path / "models" / "eval-medst")
    assert default_out(None) == "eval_results"  # a random init has no folder of its own


def test_sklearn_warnings_become_one_counted_line(caplog):
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning

    from medst_fast.eval.__main__ import sklearn_warnings_counted

    with caplog.at_level("WARNING", logger="medst_fast"), sklearn_warnings_counted():
        for _ in range(7):
            warnings.warn("The least populated class in y has only 1 members", UndefinedMetricWarning)
    lines = [r.getMessage() for r in caplog.records if "scikit-learn warned" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("scikit-learn warned 7 time(s): UndefinedMetricWarning")
