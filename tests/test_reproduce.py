"""python -m medst_fast.reproduce: the smoke pipeline end to end, resuming by stage markers, bad input."""
import json
import math
import os
import re

import pytest

from medst_fast import reproduce

STAGES = ["synth", "prepare", "vocab", "pretrain", *reproduce.EVAL_TASKS, "results"]


def _mtimes(run):
    """Every file of the run (the append-only reproduce.log aside) -> its mtime in ns."""
    out = {}
    for d, _, files in os.walk(run):
        for f in files:
            p = os.path.join(d, f)
            if os.path.relpath(p, run) != "reproduce.log":
                out[os.path.relpath(p, run)] = os.stat(p).st_mtime_ns
    return out


def _smoke(run, *extra):
    return reproduce.main(["--smoke", "--out", str(run), *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("sklearn.svm")
    pytest.importorskip("pydicom")  # the synthetic RSNA set is DICOM
    run = tmp_path_factory.mktemp("reproduce") / "run"
    summary = _smoke(run)
    return run, summary


def test_smoke_end_to_end_writes_the_table(smoke_run):
    run, summary = smoke_run
    assert summary.status == {s: "ran" for s in STAGES} and not summary.failed
    doc = json.loads((run / "results.json").read_text())
    assert list(doc["tasks"]) == list(reproduce.EVAL_TASKS) and doc["smoke"] and doc["mode"] == "official"
    names = {t: e["name"] for t, e in doc["tasks"].items()}
    assert names == {t: t.replace("-", "_") for t in reproduce.EVAL_TASKS}
    for task, e in doc["tasks"].items():
        assert e["status"] == "evaluated" and e["rows"], task
        for r in e["rows"]:
            assert math.isfinite(r["value"]) and (r["std"] is None or math.isfinite(r["std"])), (task, r)
            if (e["name"], r["subset"]) == ("msxrt_image", "pleural_effusion"):
                assert r["paper"] == 0.674 and r["gap"] == pytest.approx(r["value"] - 0.674, abs=1e-12)
            else:
                assert r["paper"] is None and r["gap"] is None and r["paper_source"] == reproduce.NOT_REPORTED
    pe = [r for r in doc["tasks"]["msxrt-image"]["rows"] if r["subset"] == "pleural_effusion"]
    assert {r["metric"] for r in pe} == {"accuracy_cv2", "macro_accuracy_cv2"}
    md = (run / "results.md").read_text()
    for name in names.values():
        assert f"| {name} |" in md
    assert "67.40" in md and "| n/r |" in md and "Smoke run" in md
    # each stage has its marker with the command it ran; official mode reached every tool
    for s in STAGES:
        m = json.loads((run / "stages" / f"{s}.done").read_text())
        assert m["stage"] == s and m["command"] and m["seconds"] >= 0
    args = json.loads((run / "pretrain" / "args.json").read_text())
    assert args["faithful"] and args["replicate_collate_bug"] and args["model"] == "medst_tiny"
    assert json.loads((run / "index" / "meta.json").read_text())["mode"] == "official_rows"
    sentence = json.loads((run / "stages" / "msxrt-sentence.done").read_text())["command"]
    assert "--official-join" in sentence


def test_paper_column_is_the_method_table():
    """The one Med-ST number of docs/method.md §7.5 is the one the table carries; every other Med-ST cell is unknown."""
    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "method.md")
    text = open(doc, encoding="utf-8").read()
    section = text.split("### §7.5", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| Task")]
    numbers = {}
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        m = re.search(r"\d+(\.\d+)?", cells[1])
        if m:
            numbers[cells[0]] = float(m.group()) / 100
        else:
            assert "unknown" in cells[1], ln
    assert numbers == {"MS-CXR-T temporal image classification, pleural effusion": 0.674}
    assert [(p["task"], p["subset"], p["value"]) for p in reproduce.PAPER] == [
        ("msxrt_image", "pleural_effusion", 0.674)]


def test_rerun_skips_every_stage_and_touches_nothing(smoke_run):
    run, _ = smoke_run
    before = _mtimes(run)
    summary = _smoke(run)
    assert summary.status == {s: "skipped" for s in STAGES}
    assert _mtimes(run) == before
    tail = (run / "reproduce.log").read_text().splitlines()[-len(STAGES) - 1:-1]
    assert [re.search(r"\[(.+?)\] (\w+)", ln).groups() for ln in tail] == [(s, "skipped") for s in STAGES]


def test_deleting_one_eval_marker_reruns_only_it(smoke_run):
    run, _ = smoke_run
    (run / "stages" / "msxrt-sentence.done").unlink()
    before = _mtimes(run)
    summary = _smoke(run)
    assert summary.status == {s: "ran" if s in ("msxrt-sentence", "results") else "skipped" for s in STAGES}
    after = _mtimes(run)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed == {os.path.join("eval", "msxrt-sentence", f) for f in
                       ("result.json", "msxrt_sentence.md", "msxrt_sentence.csv")} | {
        os.path.join("stages", "msxrt-sentence.done"), os.path.join("stages", "results.done"), "results.md",
        "results.json"}


def test_other_settings_on_a_finished_run_are_an_error(smoke_run):
    run, _ = smoke_run
    before = _mtimes(run)
    with pytest.raises(SystemExit, match=r"stage prepare .* other settings(.|\n)*--official-rows"):
        _smoke(run, "--mode", "fixed")
    assert _mtimes(run) == before


def test_missing_required_input_is_a_clear_error(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (tmp_path / "mgca.ckpt").write_bytes(b"x")
    (d / "vocab.txt").write_text("[PAD]\n")
    good = ["--mimic-jpg", str(d), "--mimic-reports", str(d), "--init", str(tmp_path / "mgca.ckpt"),
            "--text-init", str(d)]
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=f"--mimic-jpg {re.escape(str(tmp_path / 'nope'))}: no such folder"):
        reproduce.main([*good, "--mimic-jpg", str(tmp_path / "nope"), "--out", str(out)])
    with pytest.raises(SystemExit, match="--init is required without --smoke"):
        reproduce.main(["--mimic-jpg", str(d), "--mimic-reports", str(d), "--text-init", str(d), "--out", str(out)])
    with pytest.raises(SystemExit, match=f"--covidx {re.escape(str(tmp_path / 'cx'))}: no such folder"):
        reproduce.main(["--smoke", "--covidx", str(tmp_path / "cx"), "--out", str(out)])
    with pytest.raises(SystemExit, match="--text-init .*: no vocab.txt in it; give --vocab"):
        reproduce.main([*good[:-1], str(tmp_path), "--out", str(out)])
    assert not out.exists()  # nothing ran


def test_missing_optional_eval_input_is_a_reported_skip(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "mgca.ckpt").write_bytes(b"x")
    argv = ["--mimic-jpg", str(d), "--mimic-reports", str(d), "--init", str(tmp_path / "mgca.ckpt"), "--text-init",
            str(d), "--rsna", str(d), "--out", str(tmp_path / "run")]
    a = reproduce.build_parser().parse_args(argv)
    reproduce.check_inputs(a)
    p = reproduce.Pipeline(a)
    stages = {s.name: s for s in p.stages()}
    assert [n for n in stages] == ["prepare", "pretrain", *reproduce.EVAL_TASKS, "results"]
    assert {t: stages[t].skip_reason for t in reproduce.EVAL_TASKS} == {
        "msxrt-image": "no --ms-cxr-t given", "msxrt-sentence": "no --ms-cxr-t given", "rsna-zeroshot": None,
        "covidx-probe": "no --covidx given"}
    # the official recipe reaches the trainer; rsna-zeroshot reads the given folder
    pre = stages["pretrain"].command
    assert pre[pre.index("--lr") + 1] == "4e-5" and pre[pre.index("--epochs") + 1] == "8"
    assert "--faithful" in pre and pre[pre.index("--init-kind") + 1] == "mgca"
    rsna = stages["rsna-zeroshot"].command
    assert rsna[rsna.index("--data") + 1] == str(d) and "--official-join" in rsna
    os.makedirs(p.stage_dir)
    assert p.execute(stages["covidx-probe"]) and p.summary.status["covidx-probe"] == "skipped: no --covidx given"
    assert not os.path.exists(p.marker_path("covidx-probe"))


def test_a_failed_evaluation_is_reported_and_retried(smoke_run, monkeypatch):
    """One evaluation raising: the table says so, the results get no marker, and the next run redoes both."""
    import medst_fast.eval.__main__ as ev

    run, _ = smoke_run
    (run / "stages" / "covidx-probe.done").unlink()

    def broken(argv):
        raise ValueError("covidx.txt: field 'label' row 3 is 'x'")

    with monkeypatch.context() as m:
        m.setattr(ev, "main", broken)
        summary = _smoke(run)
    assert summary.failed == ["covidx-probe"] and summary.status["covidx-probe"].startswith("failed: ValueError")
    doc = json.loads((run / "results.json").read_text())
    assert doc["tasks"]["covidx-probe"]["status"] == "failed" and "row 3" in doc["tasks"]["covidx-probe"]["reason"]
    assert doc["tasks"]["msxrt-image"]["rows"] and "| covidx-probe | | | failed:" in (run / "results.md").read_text()
    assert not (run / "stages" / "results.done").exists() and not (run / "stages" / "covidx-probe.done").exists()
    summary = _smoke(run)
    assert summary.status == {s: "ran" if s in ("covidx-probe", "results") else "skipped" for s in STAGES}
    assert json.loads((run / "results.json").read_text())["tasks"]["covidx-probe"]["status"] == "evaluated"


def test_interrupted_pretrain_writes_no_marker(smoke_run, monkeypatch):
    """A trainer stopped by a signal: exit 128 + signal, no pretrain marker (the rerun resumes via --resume auto),
    nothing downstream touched. Last in the module: it leaves the run without its pretrain marker."""
    import medst_fast.pretrain
    from medst_fast.train.loop import TrainResult

    run, _ = smoke_run
    seen = []
    monkeypatch.setattr(medst_fast.pretrain, "main",
                        lambda argv: seen.append(argv) or TrainResult(str(run / "pretrain"), 2, 0, interrupted=15))
    (run / "stages" / "pretrain.done").unlink()
    before = _mtimes(run)
    with pytest.raises(SystemExit) as e:
        _smoke(run)
    assert e.value.code == 128 + 15
    assert seen and seen[0][seen[0].index("--resume") + 1] == "auto"
    assert not (run / "stages" / "pretrain.done").exists() and _mtimes(run) == before
    assert "interrupted by signal 15 after step 2" in (run / "reproduce.log").read_text()
