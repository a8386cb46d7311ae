import subprocess
import sys


def test_env_report_runs_and_names_backends():
    out = subprocess.run([sys.executable, "-m", "medst_fast.env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for key in ("torch", "SDPA backends enabled", "triton", "DALI", "C++ extension", "kernel backend"):
        assert key in out.stdout


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
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 32])" in out.stdout
