import os
import subprocess
import sys

import pytest
import torch


def _env_report(**env):
    out = subprocess.run([sys.executable, "-m", "medst_fast.env"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    info = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("  ")
        info[key.strip()] = value.strip()
    return info


@pytest.fixture(scope="module")
def report():
    return _env_report(MEDST_FAST_NO_EXT="0", MEDST_FAST_KERNELS="triton", TRITON_INTERPRET="0")


@pytest.fixture(scope="module")
def report_switched_off():
    return _env_report(MEDST_FAST_NO_EXT="1", MEDST_FAST_KERNELS="0")


def test_env_report_runs_and_names_backends(report):
    for key in ("torch", "SDPA backends enabled", "triton", "DALI", "C++ extension", "kernel backend",
                "fused MoVE FFN", "local alignment loss", "packed attention", "batched resize op",
                "input pipeline (auto)"):
        assert key in report, key


def test_env_detects_the_extension_as_the_code_loads_it(report, report_switched_off):
    from medst_fast import ext

    loaded = ext.load()  # what every caller of ext.op sees in this environment
    # the old report imported a function ext.py does not have and always said "not built"
    assert report["C++ extension"].startswith("built and loaded") == loaded, report["C++ extension"]
    resize = report["batched resize op"]
    assert ("medst_fast._C" in resize and "not loaded" not in resize) == loaded, resize
    assert report_switched_off["C++ extension"] == "not loaded (disabled by MEDST_FAST_NO_EXT)"
    assert report_switched_off["batched resize op"].startswith("PyTorch per-image path")


def test_env_says_what_the_fused_ops_run_here(report, report_switched_off):
    from medst_fast.kernels import has_triton

    cuda = torch.cuda.is_available()
    if not has_triton():
        want = "PyTorch reference (Triton not installed)"
    else:
        want = "Triton (CUDA)" if cuda else "PyTorch reference (no CUDA)"
    assert report["fused MoVE FFN"] == report["local alignment loss"] == want
    assert report_switched_off["fused MoVE FFN"].startswith("PyTorch reference (backend 'torch'")
    if not cuda:
        assert report["input pipeline (auto)"] == "PIL DataLoader workers (no CUDA)"
        assert report["packed attention"].startswith("not used: no CUDA")
        if has_triton():
            interp = _env_report(MEDST_FAST_KERNELS="triton", TRITON_INTERPRET="1")
            assert interp["fused MoVE FFN"].startswith("Triton interpreter on CPU tensors")


def test_import_needs_only_torch():
    # Block every optional dependency and import the package in a fresh interpreter.
    code = (
        "import sys\n"
        "for m in ['triton', 'tokenizers', 'safetensors', 'nvidia', 'nvidia.dali', 'PIL', 'sklearn', 'pydicom',"
        " 'tqdm', 'torchvision', 'pandas']:\n"
        "    sys.modules[m] = None\n"
        "import medst_fast\n"
        "m = medst_fast.create_model('medst_tiny').eval()\n"
        "import torch\n"
        "print(m.encode_image(torch.randn(1, 1, 96, 96)).shape)\n"
        "from medst_fast.env import collect\n"
        "print(collect()['fused MoVE FFN'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 32])" in out.stdout
    assert "PyTorch reference (Triton not installed)" in out.stdout
