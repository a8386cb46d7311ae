"""python -m medst_fast.embed: rows equal a direct forward, corrupt inputs are counted skips, NaN is an error."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

import medst_fast
from medst_fast.data import transforms as T
from medst_fast.embed import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory, vocab_path):
    torch.manual_seed(0)
    m = medst_fast.create_model("medst_tiny").eval()
    d = tmp_path_factory.mktemp("model") / "m"
    medst_fast.save_pretrained(m, d, vocab=vocab_path)
    return str(d), m


def _images(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for rel in ("a.png", "b.jpg", os.path.join("sub", "c.png"), os.path.join("sub", "d.png")):
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        a = rng.integers(0, 256, (80 + len(rel), 70), dtype=np.uint8)
        Image.fromarray(a).save(p, quality=100) if p.endswith(".jpg") else Image.fromarray(a).save(p)
        arrays[p] = np.asarray(Image.open(p).convert("L"))
    with open(os.path.join(root, "sub", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    return arrays


def test_images_folder_npy_and_skips(tmp_path, folder):
    path, model = folder
    arrays = _images(str(tmp_path / "imgs"))
    out = str(tmp_path / "out" / "emb.npy")
    res = main(["--checkpoint", path, "--images", str(tmp_path / "imgs"), "--out", out, "--batch-size", "2",
                "--workers", "0", "--no-progress"])
    assert res["rows"] == 4 and res["skipped"] == 1
    emb = np.load(out)
    ids = open(tmp_path / "out" / "emb.ids.txt").read().splitlines()
    assert ids == sorted(arrays)  # folder order: sorted, recursive
    with torch.no_grad():
        want = model.encode_image(torch.stack([T.eval_transform(arrays[p], 96) for p in ids])).numpy()
    np.testing.assert_allclose(emb, want, atol=1e-5)
    skipped = open(tmp_path / "out" / "emb.skipped.txt").read().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(tmp_path / "imgs" / "sub" / "broken.png") + "\t")
    # a CSV of relative paths, CLS features, parquet, two decoding workers: the same rows
    pd.DataFrame({"path": [os.path.relpath(p, tmp_path) for p in ids]}).to_csv(tmp_path / "list.csv", index=False)
    pq = str(tmp_path / "cls.parquet")
    main(["--checkpoint", path, "--images", str(tmp_path / "list.csv"), "--feature", "cls", "--out", pq,
          "--workers", "2", "--no-progress"])
    pytest.importorskip("pyarrow")
    table = pd.read_parquet(pq)
    assert list(table["id"]) == ids
    with torch.no_grad():
        cls = model.image_features(torch.stack([T.eval_transform(arrays[p], 96) for p in ids])).numpy()
    np.testing.assert_allclose(np.stack(table["embedding"]), cls, atol=1e-5)
    assert open(tmp_path / "cls.skipped.txt").read() == ""


def test_texts_csv_and_bf16(tmp_path, folder, vocab_path):
    path, model = folder
    texts = ["Small right pleural effusion.", "", "No pneumothorax.   Heart size normal."]
    pd.DataFrame({"id": ["r1", "r2", "r3"], "text": texts}).to_csv(tmp_path / "t.csv", index=False)
    out = str(tmp_path / "t.npy")
    res = main(["--checkpoint", path, "--texts", str(tmp_path / "t.csv"), "--out", out, "--no-progress"])
    assert res["rows"] == 2 and open(tmp_path / "t.skipped.txt").read() == "r2\tempty text\n"
    from medst_fast.eval import common
    from medst_fast.text.report import clean_report

    tok = medst_fast.get_tokenizer(vocab_path)
    want = common.embed_texts(model, tok, [clean_report(t)[0] for t in (texts[0], texts[2])]).numpy()
    np.testing.assert_allclose(np.load(out), want, atol=1e-5)
    assert open(tmp_path / "t.ids.txt").read().split() == ["r1", "r3"]
    main(["--checkpoint", path, "--texts", str(tmp_path / "t.csv"), "--out", str(tmp_path / "b.npy"),
          "--precision", "bf16", "--no-progress"])
    b = np.load(tmp_path / "b.npy")
    assert b.dtype == np.float32 and np.abs(b - want).max() < 0.1 and np.abs(b - want).max() > 0


def test_errors_nan_encoder_only_and_bad_out(tmp_path, folder, vocab_path):
    path, model = folder
    _images(str(tmp_path / "imgs"))
    import copy

    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.visual.norm.weight.fill_(float("nan"))
    medst_fast.save_pretrained(bad, tmp_path / "nan")
    with pytest.raises(ValueError, match=r"embed: 4 of 4 rows of embeddings are not finite.*a.png"):
        main(["--checkpoint", str(tmp_path / "nan"), "--images", str(tmp_path / "imgs"),
              "--out", str(tmp_path / "x.npy"), "--workers", "0", "--no-progress"])
    assert not os.path.exists(tmp_path / "x.npy")  # nothing written
    medst_fast.save_pretrained(model, tmp_path / "enc", components=["visual", "visual_global_head"])
    pd.DataFrame({"text": ["effusion"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(RuntimeError, match="enc holds only"):
        main(["--checkpoint", str(tmp_path / "enc"), "--texts", str(tmp_path / "t.csv"), "--vocab", vocab_path,
              "--out", str(tmp_path / "y.npy"), "--no-progress"])
    with pytest.raises(ValueError, match=r"\.npy or \.parquet"):
        main(["--checkpoint", path, "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "e.txt"),
              "--workers", "0", "--no-progress"])
    with pytest.raises(ValueError, match="missing column"):
        main(["--checkpoint", path, "--texts", str(tmp_path / "t.csv"), "--column", "report",
              "--out", str(tmp_path / "z.npy")])


def _result(out):
    emb = np.load(out)
    ids = open(os.path.splitext(out)[0] + ".ids.txt").read().splitlines()
    skipped = open(os.path.splitext(out)[0] + ".skipped.txt").read().splitlines()
    return emb, ids, skipped


def test_two_writers_on_one_out_leave_one_complete_result(tmp_path, monkeypatch):
    """Run A is paused inside its renames while run B writes the same --out; the result is one run's set."""
    import threading

    from medst_fast.embed import write_embeddings

    out = str(tmp_path / "emb.npy")
    runs = {"a": (["a0", "a1", "a2"], np.full((3, 4), 1.0, np.float32), [("ax", "why a")]),
            "b": (["b0", "b1", "b2", "b3", "b4"], np.full((5, 4), 2.0, np.float32), [("bx", "why b")])}
    real_replace = os.replace
    paused, b_started = threading.Event(), threading.Event()
    holder = {}

    def replace(src, dst):  # A stops after its first rename until B has had its chance to write
        real_replace(src, dst)
        if threading.current_thread().name == "a" and not paused.is_set():
            paused.set()
            b_started.wait(10)
            holder["b"].join(timeout=2.0)  # B finishes here unless a lock makes it wait for A

    monkeypatch.setattr(os, "replace", replace)
    a = threading.Thread(target=write_embeddings, args=(out, *runs["a"]), name="a")
    holder["b"] = b = threading.Thread(target=lambda: (b_started.set(), write_embeddings(out, *runs["b"])), name="b")
    a.start()
    assert paused.wait(10)
    b.start()
    a.join(20)
    b.join(20)
    assert not a.is_alive() and not b.is_alive()
    emb, ids, skipped = _result(out)
    run = ids[0][0]
    want_ids, want_emb, want_skip = runs[run]
    assert ids == want_ids and np.array_equal(emb, want_emb), (ids, emb[:, 0])
    assert skipped == [f"{k}\t{why}" for k, why in want_skip]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_a_failed_write_leaves_the_previous_result(tmp_path):
    from medst_fast.embed import write_embeddings

    out = str(tmp_path / "emb.npy")
    write_embeddings(out, ["x"], np.ones((1, 2), np.float32), [])
    with pytest.raises(ValueError, match="non-finite"):
        write_embeddings(out, ["y"], np.full((1, 2), np.nan, np.float32), [])
    emb, ids, _ = _result(out)
    assert ids == ["x"] and emb.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--workers", "-1")])
def test_bad_flags_are_usage_errors(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "x.npy"), flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err
