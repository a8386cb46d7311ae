"""scripts/ablations.py: the statistics behind its verdicts and the grid it would run (no training here)."""
import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "ablations.py")


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("ablations_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_t_interval_matches_the_textbook_formula(ab):
    # [1, 2, 3]: mean 2, sd 1, t_{0.975,2} = 4.302653, half-width 4.302653 / sqrt(3)
    mean, lo, hi = ab.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-9)
    # a different n uses a different quantile: t_{0.975,4} = 2.776445
    x = [0.1, 0.4, 0.2, 0.9, 0.3]
    m, lo5, hi5 = ab.t_interval(x)
    assert (hi5 - m) == pytest.approx(2.7764451051977987 * np.std(x, ddof=1) / math.sqrt(5), rel=1e-9)
    assert m - lo5 == pytest.approx(hi5 - m)


def test_t_interval_single_value_has_no_interval_and_empty_is_an_error(ab):
    mean, lo, hi = ab.t_interval([0.7])
    assert mean == 0.7 and math.isnan(lo) and math.isnan(hi)
    assert ab.verdict(lo, hi) == "one seed: no interval"
    with pytest.raises(ValueError, match="no values"):
        ab.t_interval([])


def test_paired_difference_uses_matching_seeds_only(ab):
    variant = {0: 0.50, 1: 0.61, 2: 0.58, 7: 9.0}   # seed 7 has no default partner: ignored
    default = {0: 0.40, 1: 0.52, 2: 0.47}
    d, lo, hi, seeds = ab.paired_diff(variant, default)
    assert seeds == [0, 1, 2]
    diffs = [0.10, 0.09, 0.11]
    assert d == pytest.approx(0.10)
    half = 4.302652729911275 * np.std(diffs, ddof=1) / math.sqrt(3)
    assert (lo, hi) == pytest.approx((0.10 - half, 0.10 + half))
    # pairing matters: the unpaired spread of the variant alone is far wider than the paired interval
    _, ulo, uhi = ab.t_interval([variant[s] for s in seeds])
    assert uhi - ulo > 5 * (hi - lo)
    assert ab.verdict(lo, hi) == "real at this scale"
    with pytest.raises(ValueError, match="no seed in common"):
        ab.paired_diff({5: 1.0}, {0: 1.0})


def test_verdict_needs_the_interval_to_exclude_zero(ab):
    assert ab.verdict(0.01, 0.2) == "real at this scale"
    assert ab.verdict(-0.3, -0.001) == "real at this scale"
    assert ab.verdict(-0.01, 0.2) == "not distinguishable"
    assert ab.verdict(0.0, 0.2) == "not distinguishable"


def test_near_tie_flag_from_auroc_noise_sensitivity(ab):
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 100)
    separated = y * 0.05 + rng.normal(0, 0.02, 200)        # a trained model's score gaps: ~1e-2
    tied = 0.3 + 1e-7 * rng.normal(size=200)               # random-init-like: one score plus float noise
    sd_sep, sd_tied = ab.auroc_noise_std([(y, separated)]), ab.auroc_noise_std([(y, tied)])
    assert sd_sep < 1e-3 and not ab.near_tie(sd_sep)
    assert sd_tied > 0.02 and ab.near_tie(sd_tied)
    assert ab.auroc_noise_std([(y, tied)]) == sd_tied       # seeded: the same draws every time
    # several tasks: the std of their mean AUROC, so one tied task among separated ones still shows
    assert 0 < ab.auroc_noise_std([(y, separated), (y, tied)]) < sd_tied


def test_summary_marks_ties_and_pairs_by_seed(ab):
    def row(study, tie):
        r = {k: study for k, _, _ in ab.METRICS}
        r.update({f"tie_{k}": tie for k in ab.TIE_METRICS})
        r["tie_sentence_auroc"] = 0.0
        return r
    rows = {"default_s0": row(0.40, 0.0), "default_s1": row(0.42, 0.0), "default_s2": row(0.41, 0.001),
            "random_s0": row(0.33, 0.02), "random_s1": row(0.33, 0.001), "random_s2": row(0.34, 0.03),
            "no_temporal_s0": row(0.41, 0.0), "no_temporal_s1": row(0.40, 0.0), "no_temporal_s2": row(0.43, 0.0)}
    recs = {(r["variant"], r["metric"]): r for r in ab.summarise(rows, ["default", "no_temporal"])}
    rnd = recs[("random", "zs_biovil_auroc")]
    assert rnd["note"].startswith("near-tie scores in 2 of 3 seeds") and rnd["verdict"] == "real at this scale"
    assert recs[("random", "sentence_auroc")]["note"] == ""      # that task was not tied
    assert recs[("random", "study_macro")]["note"] == ""         # classification rows carry no tie test
    nt = recs[("no_temporal", "zs_biovil_auroc")]
    assert nt["note"] == "" and nt["verdict"] == "not distinguishable"
    assert recs[("default", "zs_biovil_auroc")]["note"] == ""    # 0.001 is below the threshold
    assert "diff" not in recs[("default", "study_macro")]
    csv_text = ab.to_csv_text(list(recs.values()))
    assert csv_text.splitlines()[0].startswith("variant,metric,n_seeds,mean,ci95_low")
    assert len(csv_text.splitlines()) == 1 + len(recs)


def test_variants_without_their_trainer_flag_are_left_out(ab):
    keep, left = ab.available_variants("--local-weighting --local-scope", ["default", "local_uniform",
                                                                          "temporal_shuffle", "series_len_2"])
    assert keep == ["default", "local_uniform"]
    assert set(left) == {"temporal_shuffle", "series_len_2"} and "--series-len" in left["series_len_2"]
    with pytest.raises(SystemExit, match="unknown variant"):
        ab.available_variants("", ["nope"])


def dry_run(tmp_path, *extra):
    work = str(tmp_path / "w")
    r = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--work", work, "--seeds", "0,1",
                        "--variants", "default,no_temporal,local_batch", "--steps", "7", "--stage2-steps", "3",
                        *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(work)  # a dry run builds nothing
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if not line.startswith("#"))
    return work, lines, r.stdout


def test_dry_run_prints_the_grid(tmp_path):
    work, lines, out = dry_run(tmp_path)
    # stage 1: one paper run per seed, from random weights, no temporal loss; every variant starts from it
    assert set(lines) == {"s1_paper_s0", "s1_paper_s1", "default_s0", "default_s1", "no_temporal_s0",
                          "no_temporal_s1", "local_batch_s0", "local_batch_s1"}
    for n in ("s1_paper_s0", "s1_paper_s1"):
        c = lines[n]
        assert "--init" not in c and "--lambda-temporal 0" in c and "--max-steps 7" in c
        assert f"--seed {n[-1]}" in c and "--local-scope" not in c
    # stage 2 starts from its own seed's stage-1 run, with the variant's switch
    assert f"--init {work}/run_s1_paper_s1/final/model.safetensors" in lines["no_temporal_s1"]
    assert "--seed 1" in lines["no_temporal_s1"] and "--lambda-temporal 0" in lines["no_temporal_s1"]
    assert "--local-scope batch" in lines["local_batch_s0"] and "--max-steps 3" in lines["local_batch_s0"]
    assert f"--init {work}/run_s1_paper_s0/final" in lines["local_batch_s0"]
    assert "--lambda-temporal" not in lines["default_s0"]
    assert "# left out temporal_shuffle: not in --variants" in out


def test_dry_run_with_switches_in_stage1(tmp_path):
    work, lines, _ = dry_run(tmp_path, "--switches-in-stage1")
    assert {"s1_local_batch_s0", "s1_local_batch_s1"} <= set(lines)
    c = lines["s1_local_batch_s1"]
    assert "--init" not in c and "--local-scope batch" in c and "--lambda-temporal 0" in c
    assert "--local-scope" not in lines["s1_paper_s1"]
    assert f"--init {work}/run_s1_local_batch_s1/final" in lines["local_batch_s1"]
    assert f"--init {work}/run_s1_paper_s1/final" in lines["no_temporal_s1"]
