"""Which CUDA architectures the extension is compiled for (medst_fast.ext.choose_cuda_archs, used by setup.py and
CMakeLists.txt): what the installed nvcc and torch accept, the visible GPUs, the user's TORCH_CUDA_ARCH_LIST."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from medst_fast import ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("nvcc,nvcc_archs,torch_archs,torch_version,visible,want,why", [
    # no GPU visible: A100, H100, B200 where the toolchain takes them, PTX on the newest
    ((13, 0), None, None, (2, 11), (), "8.0;9.0;10.0+PTX", ""),
    ((12, 8), None, None, (2, 7), (), "8.0;9.0;10.0+PTX", ""),
    ((12, 4), None, None, (2, 11), (), "8.0;9.0+PTX", "nvcc 12.4 rejects 10.0"),
    ((12, 8), None, None, (2, 6), (), "8.0;9.0+PTX", "torch 2.6 rejects 10.0"),
    ((11, 8), None, None, (2, 4), (), "8.0;9.0+PTX", "nvcc 11.8 rejects 10.0"),
    # what the tools say themselves wins over the version tables
    ((13, 0), {"7.5", "8.0", "9.0"}, None, (2, 11), (), "8.0;9.0+PTX", "nvcc 13.0 rejects 10.0"),
    ((13, 0), None, {"8.0", "9.0", "9.0a"}, (2, 11), (), "8.0;9.0+PTX", "torch 2.11 rejects 10.0"),
    # visible GPUs: theirs; one newer than the toolchain gets the newest it takes, as PTX
    ((12, 4), None, None, (2, 4), [(7, 5)], "7.5+PTX", ""),
    ((12, 4), None, None, (2, 4), [(8, 6), (7, 5), (8, 6)], "7.5;8.6+PTX", ""),
    ((12, 4), None, None, (2, 6), [(12, 0)], "9.0+PTX", "nvcc 12.4 rejects 12.0"),
    ((12, 8), None, None, (2, 6), [(7, 5), (12, 0)], "7.5;9.0+PTX", "torch 2.6 rejects 12.0"),
    # nvcc 13 dropped the GPUs below 7.5: nothing to build for a P100
    ((13, 0), None, None, (2, 11), [(6, 0)], None, "nvcc 13.0 rejects 6.0"),
    (None, None, None, (2, 11), (), None, "nvcc (version unknown) rejects 8.0"),
])
def test_arch_choice(nvcc, nvcc_archs, torch_archs, torch_version, visible, want, why):
    got, note = ext.choose_cuda_archs(nvcc, nvcc_archs, torch_archs, torch_version, visible)
    assert got == want, note
    assert why in note and (bool(why) == ("rejects" in note))


def test_the_users_list_is_kept_and_a_rejected_entry_named():
    assert ext.choose_cuda_archs((12, 4), None, None, (2, 6), [(9, 0)], "7.5;8.6") == ("7.5;8.6", "from TORCH_CUDA_ARCH_LIST")
    got, note = ext.choose_cuda_archs((12, 4), None, None, (2, 6), (), "8.0 10.0+PTX")
    assert got == "8.0 10.0+PTX" and "nvcc 12.4 rejects 10.0: the build will fail" in note
    assert ext.choose_cuda_archs((12, 4), None, None, (2, 6), (), "Hopper") == ("Hopper", "from TORCH_CUDA_ARCH_LIST")


def test_nvcc_version_table():
    assert ext.nvcc_accepts("10.0", (12, 8), None) and not ext.nvcc_accepts("10.0", (12, 6), None)
    assert ext.nvcc_accepts("7.0", (12, 9), None) and not ext.nvcc_accepts("7.0", (13, 0), None)
    assert ext.nvcc_accepts("3.5", (11, 8), None) and not ext.nvcc_accepts("3.5", (12, 0), None)
    assert not ext.nvcc_accepts("13.0", (13, 0), None)  # unknown to the table: not assumed
    assert ext.nvcc_accepts("9.0a", (12, 0), None) and ext.nvcc_accepts("9.0a", None, {"9.0"})
    assert ext.torch_accepts("9.0", None, (2, 3)) and not ext.torch_accepts("10.0", None, (2, 6))
    assert ext.torch_accepts("12.0", None, (2, 7))


def test_cmake_architectures():
    assert ext.cmake_architectures("8.0;9.0;10.0+PTX") == "80-real;90-real;100"
    assert ext.cmake_architectures("7.5+PTX") == "75"


def _fake_nvcc(folder, version, archs=None):
    """An ``nvcc`` that answers --version (and --list-gpu-arch when ``archs``) like the real one."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvcc")
    listing = "\n".join(f"compute_{a.replace('.', '')}" for a in archs or [])
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                'if [ "$1" = "--version" ]; then\n'
                f'  echo "Cuda compilation tools, release {version}, V{version}.1"\n'
                'elif [ "$1" = "--list-gpu-arch" ]; then\n'
                + (f"  printf '%s\\n' '{listing}'\n" if archs else "  echo 'nvcc fatal: Unknown option' >&2; exit 1\n")
                + "fi\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def test_reading_nvcc(tmp_path):
    old = _fake_nvcc(str(tmp_path / "a"), "12.4")
    assert ext.nvcc_version(old) == (12, 4) and ext.nvcc_arch_list(old) is None
    new = _fake_nvcc(str(tmp_path / "b"), "13.0", ["7.5", "8.0", "10.0", "12.1"])
    assert ext.nvcc_version(new) == (13, 0) and ext.nvcc_arch_list(new) == {"7.5", "8.0", "10.0", "12.1"}
    assert ext.nvcc_version(str(tmp_path / "missing")) is None


def test_asking_torch_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "users;value")
    got = ext.torch_arch_list(["8.0", "9.0", "0.1"])
    assert got is None or ({"8.0", "9.0"} <= got and "0.1" not in got)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "users;value"


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU-only torch: setup.py builds no CUDA kernels")
def test_setup_builds_for_what_the_toolchain_takes_and_says_so(tmp_path):
    """setup.py with an nvcc 12.4 and no GPU visible: 10.0 is dropped and the chosen list is printed."""
    home = tmp_path / "cuda"
    _fake_nvcc(str(home / "bin"), "12.4")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "MEDST_FAST_NO_EXT",
                                                            "MEDST_FAST_NO_CUDA_EXT", "CUDA_PATH")}
    env.update(CUDA_HOME=str(home), CUDA_VISIBLE_DEVICES="")
    known = ext.torch_arch_list(["8.0", "9.0"])
    if known is not None and not {"8.0", "9.0"} <= known:
        pytest.skip(f"this torch's extension builder rejects 8.0 or 9.0 ({sorted(known)})")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    want = "compiling the CUDA kernels for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX"
    assert want in r.stderr and "nvcc 12.4 rejects 10.0" in r.stderr, r.stderr[-2000:]
