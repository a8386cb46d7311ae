"""What prepare writes, the index reader reads: reports are bounded at prepare (with a count), and a
studies.csv the reader cannot take is one error naming the file."""
import csv
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medst_fast.data import prepare as prep
from medst_fast.data.index import SeriesIndex, Study

_LONG = " ".join(f"word{i % 997} effusion." for i in range(50_000))  # a 100,000-word report


def _manifest(tmp_path, reports):
    """A manifest CSV with one frontal per patient and the given reports."""
    rows = []
    rng = np.random.default_rng(0)
    for i, text in enumerate(reports):
        name = f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)).save(tmp_path / name)
        rows.append({"patient": f"p{i}", "time": f"2020-01-0{i + 1}", "view": "PA", "image": name, "report": text})
    p = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return str(p)


def test_bound_report_cuts_at_a_word_boundary():
    from medst_fast.data.index import REPORT_MAX_CHARS, bound_report

    text, n, cut = bound_report("a b c", 3)
    assert (text, n, cut) == ("a b c", 3, False)
    long = " ".join(["abcd"] * 10_000)  # 49,999 characters
    text, n, cut = bound_report(long, 10_000)
    assert cut and len(text) <= REPORT_MAX_CHARS and long.startswith(text) and text.endswith("abcd")
    assert n == len(text.split()) and REPORT_MAX_CHARS < csv.field_size_limit()


def test_a_huge_report_is_truncated_and_counted_and_the_index_reads(tmp_path, caplog):
    csv_path = _manifest(tmp_path, [_LONG, "small left pleural effusion unchanged", "no acute cardiopulmonary process"])
    out = tmp_path / "idx"
    with caplog.at_level(logging.INFO, logger="medst_fast"):
        rc = prep.main(["manifest", "--csv", csv_path, "--out", str(out), "--workers", "0"])
    assert rc == 0
    assert any("truncated 1 report(s) to 20000 characters" in r.getMessage() for r in caplog.records)
    idx = SeriesIndex.load(out)  # with the default csv field limit untouched by anyone
    assert idx.meta["counts"]["truncated_reports"] == 1 and idx.meta["report_max_chars"] == 20_000
    texts = sorted((s.text for s in idx.studies), key=len)
    assert len(texts[-1]) <= 20_000 and texts[-1].startswith("word0 effusion word1")
    assert texts[0] == "no acute cardiopulmonary process"
    with open(out / "studies.csv", newline="", encoding="utf-8") as f:  # any csv reader with default settings
        assert len(list(csv.DictReader(f))) == 3


def test_the_mimic_path_bounds_reports_too(tmp_path):
    from collections import Counter

    class Src:
        def get(self, subject, study):
            return (_LONG, None)

    st = {"frontal": [(0, 0, "d1")], "frontal_rows": 1, "when": ((1, 2), "2020"), "subject": "1", "study": "2"}
    skipped = Counter()
    (got, text, n), = prep._with_reports({("1", "2"): st}, Src(), skipped)
    assert got["truncated"] and len(text) <= 20_000 and n == len(text.split()) and not skipped


def test_the_writer_refuses_an_unbounded_report(tmp_path):
    s = Study(row=0, subject_id="p", study_id="s", split="train", order=0, study_datetime="", frontal_path="a.png",
              lateral_path="", frontal_dicom="a", lateral_dicom="", text="x" * 20_001, n_tokens=1)
    with pytest.raises(ValueError, match="study row 0 has a report of 20001 characters"):
        SeriesIndex([s], {"train": [[0]]}, {"image_root": str(tmp_path)}).save(tmp_path / "i")


def test_an_old_index_with_a_huge_field_still_reads(tmp_path):
    csv_path = _manifest(tmp_path, ["small left pleural effusion unchanged"])
    out = tmp_path / "idx"
    assert prep.main(["manifest", "--csv", csv_path, "--out", str(out), "--workers", "0"]) == 0
    p = out / "studies.csv"
    rows = list(csv.DictReader(open(p, newline="", encoding="utf-8")))
    rows[0]["text"] = "word " * 40_000  # 200,000 characters, as an earlier prepare wrote them
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    limit = csv.field_size_limit()
    assert len(SeriesIndex.load(out).studies[0].text) == 200_000
    assert csv.field_size_limit() == limit  # the reader restores the process-wide setting


def test_a_non_utf8_studies_csv_names_the_file(tmp_path):
    csv_path = _manifest(tmp_path, ["small left pleural effusion unchanged"])
    out = tmp_path / "idx"
    assert prep.main(["manifest", "--csv", csv_path, "--out", str(out), "--workers", "0"]) == 0
    p = out / "studies.csv"
    p.write_bytes(p.read_bytes().replace(b"small", "sm\u00e4ll".encode("latin-1")))
    with pytest.raises(ValueError, match=rf"{p}: not UTF-8 text \(byte \d+: b'\\xe4'\)"):
        SeriesIndex.load(out)
