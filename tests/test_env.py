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
    from medst_fast.kernels._utils import has_triton

    cuda = torch.cuda.is_available()
    if not has_triton():
        want = "PyTorch reference (Triton not installed)"
    else:
        want = "Triton (CUDA)" if cuda else "PyTorch reference (no CUDA)"
    assert report["fused MoVE FFN"] == report["local alignment loss"] == want
    assert report_switched_off["fused MoVE FFN"].startswith("PyTorch reference (backend 'torch'")
    if not cuda:
        from medst_fast.data.loaders import choose_backend

        name, why = choose_backend("auto", torch.device("cpu"))
        assert report["input pipeline (auto)"] == f"{name} ({why})" and name == "pil"
        assert report["packed attention"].startswith("not used: no CUDA")
        if has_triton():
            interp = _env_report(MEDST_FAST_KERNELS="triton", TRITON_INTERPRET="1")
            assert interp["fused MoVE FFN"].startswith("Triton interpreter on CPU tensors")


def test_env_input_pipeline_line_is_the_loaders_choice(monkeypatch):
    """env's line comes from data.loaders.choose_backend (it used to repeat the choice, and drifted)."""
    from medst_fast import env
    from medst_fast.data import loaders as L

    monkeypatch.setattr(L, "_op_note", lambda: "the op")
    monkeypatch.setattr(L, "dali_missing", lambda: "no DALI here")
    line = env.loader_path(cuda=True)
    assert line.startswith("nvjpeg (auto: nvjpeg decode on the GPU + the op") and "no DALI here" in line, line
    monkeypatch.setattr(L, "torchvision_missing", lambda: "no torchvision here")
    assert env.loader_path(cuda=True).startswith("pil (auto: no GPU decoder available")
    monkeypatch.setattr(L, "dali_missing", lambda: None)
    assert env.loader_path(cuda=True) == "dali (auto: dali decode on the GPU + the op)"


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
        "info = collect()\n"
        "print(info['fused MoVE FFN'])\n"
        "print(info['input pipeline (auto)'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 32])" in out.stdout
    assert "PyTorch reference (Triton not installed)" in out.stdout
    assert "unknown: medst_fast.data.loaders does not import" in out.stdout  # PIL blocked: named, not a crash


def _run_suite_without_shared(tmp_path, require):
    """Run a two-test suite with the real conftest and a shared folder that does not exist."""
    d = tmp_path / "suite" / "tests"
    d.mkdir(parents=True, exist_ok=True)
    (d / "conftest.py").write_text(open(os.path.join(os.path.dirname(__file__), "conftest.py")).read())
    (d / "test_needs_shared.py").write_text("def test_vocab(vocab_path):\n    pass\n\n"
                                            "def test_plain():\n    pass\n")
    env = {**os.environ, "MEDST_SHARED_DIR": str(tmp_path / "no_shared"), "MEDST_REQUIRE_SHARED": require}
    return subprocess.run([sys.executable, "-m", "pytest", str(d), "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path / "suite"))


def test_missing_shared_resources_fail_ci_and_are_named_for_users(tmp_path):
    user = _run_suite_without_shared(tmp_path, "0")
    assert user.returncode == 0, user.stdout + user.stderr
    assert "1 passed, 1 skipped" in user.stdout
    # a plain -q run names what the skip was missing
    assert f"1 test(s) skipped: missing shared resource: {tmp_path / 'no_shared'}" in user.stdout
    ci = _run_suite_without_shared(tmp_path, "1")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "1 passed" in ci.stdout and "1 error" in ci.stdout and "skipped" not in ci.stdout
    assert "MEDST_REQUIRE_SHARED=1" in ci.stdout and str(tmp_path / "no_shared") in ci.stdout


def test_ci_script_runs_the_readme_command_with_shared_resources_required(tmp_path):
    """.ci/run after its install steps, run for real on a README of our own: the command between the
    test-command markers runs with MEDST_REQUIRE_SHARED=1, its exit status is CI's, and pytest's "collected
    no tests" (exit 5) fails CI."""
    lines = open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("cmd="))  # the installs come before
    script = "\n".join(["set -euo pipefail", *lines[start:]])
    env = {k: v for k, v in os.environ.items() if k != "MEDST_REQUIRE_SHARED"}
    for command, rc, says in (('echo "require=${MEDST_REQUIRE_SHARED:-unset}"', 0, "require=1"),
                              ("(exit 5)", 1, "collected no tests"), ("(exit 3)", 3, "+ (exit 3)")):
        (tmp_path / "README.md").write_text(f"text\n<!-- test-command -->\n```bash\n{command}\n```\n"
                                            f"<!-- /test-command -->\nmore text\n")
        r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == rc and says in r.stdout, (command, r.returncode, r.stdout, r.stderr)
    (tmp_path / "README.md").write_text("no markers\n")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no test command found in README.md" in r.stdout
