"""Running a test module's ``test_interp_*`` tests under Triton's CPU interpreter, in a child pytest.

Triton reads TRITON_INTERPRET only before its first import, and setting it in the main test process would
switch every other test (and any CUDA kernel) to the interpreter; so each kernel test module runs its
interpreter tests in a child process with the variable set.
"""
import importlib.util
import os
import subprocess
import sys

from medst_fast.kernels import _utils

# Start-up hook for interpreter children: Triton 3.6 + numpy >= 2.4 workaround (see its docstring).
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_interp_site")


def _load_fix():
    spec = importlib.util.spec_from_file_location("_medst_interp_fix", os.path.join(SITE, "sitecustomize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # applies the fix when TRITON_INTERPRET=1 (this process is a child)
    return mod


fix_interpreter_index = _load_fix().fix_interpreter_index


def interp_env(**extra) -> dict:
    """Environment of a child process that runs Triton's interpreter: TRITON_INTERPRET=1 and the start-up
    hook that makes Triton 3.6's interpreter work with numpy >= 2.4."""
    env = dict(os.environ, TRITON_INTERPRET="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([SITE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU wheels without Triton
    HAS_TRITON = False

IN_INTERPRETER = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" and _utils.interpreter_ready()


def run_interp_tests_in_child(test_file: str) -> None:
    """Run ``-k test_interp_`` of ``test_file`` with TRITON_INTERPRET=1; assert they ran and passed."""
    env = interp_env()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_",
                        os.path.abspath(test_file)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-3000:]


def triton_backend_counting(monkeypatch, module, fwd_name: str, bwd_name: str):
    """Generator for an ``interpret`` fixture: select the Triton backend and count forward/backward launches
    of ``module.<fwd_name>`` / ``module.<bwd_name>``, so a test can assert the kernels really ran."""
    import pytest

    if not IN_INTERPRETER:
        pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported: run by test_kernels_under_interpreter")
    old = _utils.get_backend()
    _utils.set_backend("triton")
    calls = {"fwd": 0, "bwd": 0}
    for key, name in (("fwd", fwd_name), ("bwd", bwd_name)):
        orig = getattr(module, name)

        def counted(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(module, name, counted)
    try:
        yield calls
    finally:
        _utils.set_backend(old)
