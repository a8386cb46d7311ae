"""The top-level ``kernels/`` folder is shipped as ``medst_fast.kernels`` and shadows no installed package.

``python -m ...`` and ``python -m pytest`` put the repository root first on ``sys.path``. A regular package
there named ``kernels`` hid Hugging Face's ``kernels`` package, which transformers imports, so
``from transformers import BertModel`` failed from the root. The folder is now a namespace portion (no
``__init__.py``); these tests pin that down from the root, from an editable install and from a wheel.
"""
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("_utils", "local_align", "move_ffn", "cross_local")
IMPORT_KERNELS = ("import importlib, medst_fast.kernels as k\n"
                  f"for m in {KERNEL_MODULES!r}: importlib.import_module('medst_fast.kernels.' + m)\n"
                  "print(list(k.__path__)[0])\n")


def _run(code, cwd, env=None):
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()


def test_no_top_level_folder_but_medst_fast_is_a_regular_package():
    # A regular package at the root wins over any installed package of the same name.
    regular = sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))
    assert regular == ["medst_fast"]


def test_transformers_imports_from_the_repo_root():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    code = ("from transformers import BertModel\n"
            "import kernels\n"
            "print(getattr(kernels, '__file__', None) or 'namespace')\n")
    (where,) = _run(code, cwd=ROOT)[-1:]
    # With Hugging Face's kernels installed it must be that one; without it the root folder is only a
    # namespace portion (no __file__), which shadows nothing.
    assert where == "namespace" or not os.path.abspath(where).startswith(os.path.join(ROOT, "kernels")), where


def test_every_kernel_module_imports_through_the_package(tmp_path):
    # From outside the checkout: the installed (editable) package maps medst_fast.kernels to kernels/.
    (path,) = _run(IMPORT_KERNELS, cwd=tmp_path)[-1:]
    assert os.path.samefile(path, os.path.join(ROOT, "kernels")) or path.endswith(os.path.join("medst_fast", "kernels"))


def test_wheel_carries_the_kernels_as_medst_fast_kernels(tmp_path):
    env = dict(os.environ, MEDST_FAST_NO_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), ROOT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not available")
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = list((tmp_path / "dist").glob("medst_fast-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    assert {f"medst_fast/kernels/{m}.py" for m in KERNEL_MODULES} <= names
    assert not [n for n in names if n.startswith("kernels/")]  # nothing top-level to shadow an installed package
    assert "medst_fast/kernels/__init__.py" not in names
    # Imported from the unpacked wheel alone (not the checkout): the import system finds the folder itself.
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    code = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n" + IMPORT_KERNELS
    (path,) = _run(code, cwd=tmp_path, env=env)[-1:]
    assert os.path.samefile(path, site / "medst_fast" / "kernels")
