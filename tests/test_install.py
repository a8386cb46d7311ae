"""One install serves the quick start and evaluation, and a second install does not recompile the extension."""
import ast
import os

import pytest

from medst_fast import build_stamp as B
from medst_fast.factory import TRAIN_MODULES, _PACKAGE_OF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extras():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extras_require")


def _pkg(spec):
    return spec.split(">")[0].split("=")[0].split("<")[0].strip().lower()


def test_train_extra_holds_the_quick_start_and_evaluation():
    extras = _extras()
    train = {_pkg(s) for s in extras["train"]}
    # the trainer, the quick start's figure (plot.py), eval all (sklearn; pydicom for the synthetic RSNA set)
    needed = list(TRAIN_MODULES) + ["matplotlib", "sklearn", "pydicom"]
    missing = [m for m in needed if _PACKAGE_OF.get(m, m).lower() not in train]
    assert not missing, f"[train] lacks {missing}"
    # and [eval] brings nothing the quick start's install does not already have
    assert {_pkg(s) for s in extras["eval"]} <= train


def _files(tmp_path):
    src = tmp_path / "ops.cpp"
    src.write_text("int f() { return 1; }\n")
    so = tmp_path / "_C.so"
    so.write_bytes(b"\x7fELF library")
    return src, so, str(tmp_path / "build" / "_C.stamp.json")


def test_skip_rebuild_only_when_nothing_changed(tmp_path):
    src, so, stamp = _files(tmp_path)
    flags = {"cuda": False, "args": {"cxx": ["-O3"]}}
    fp = B.fingerprint([str(src)], "2.11.0", "13.0", flags)
    assert not B.is_up_to_date(stamp, str(so), fp)  # no stamp yet: build
    B.write_stamp(stamp, str(so), fp)
    assert B.is_up_to_date(stamp, str(so), fp)  # the same inputs and library: skip
    # any input that goes into the library changes the fingerprint
    assert B.fingerprint([str(src)], "2.11.1", "13.0", flags) != fp
    assert B.fingerprint([str(src)], "2.11.0", None, flags) != fp
    assert B.fingerprint([str(src)], "2.11.0", "13.0", {**flags, "cuda": True}) != fp
    src.write_text("int f() { return 2; }\n")
    assert not B.is_up_to_date(stamp, str(so), B.fingerprint([str(src)], "2.11.0", "13.0", flags))


@pytest.mark.parametrize("change", ["deleted", "replaced", "stamp_garbage"])
def test_a_changed_library_or_stamp_means_rebuild(tmp_path, change):
    src, so, stamp = _files(tmp_path)
    fp = B.fingerprint([str(src)], "2.11.0", None, {})
    B.write_stamp(stamp, str(so), fp)
    if change == "deleted":
        so.unlink()
    elif change == "replaced":  # e.g. built by hand with other flags: another size
        so.write_bytes(b"\x7fELF another library, longer")
    else:
        open(stamp, "w").write("{not json")
    assert not B.is_up_to_date(stamp, str(so), fp)
