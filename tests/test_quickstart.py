"""The quick start's reassurances: a core install (no [train] extra) gets one line naming the extra."""
import subprocess
import sys

import pytest

# Run in a child: blocking a module in this process would leak into other tests' imports.
_BLOCKED = """
import sys
sys.modules[{module!r}] = None  # what a missing package looks like to `import`
sys.argv = ["python -m medst_fast.pretrain", "--out", {out!r}]
from medst_fast.pretrain import _cli
sys.exit(_cli())
"""


def test_missing_train_extra_is_one_line_naming_it(tmp_path):
    """`python -m medst_fast.pretrain` without Pillow: exit code 1 and one line, in a fresh interpreter."""
    code = _BLOCKED.format(module="PIL", out=str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines == ["medst_fast.pretrain: error: python -m medst_fast.pretrain needs pillow, not installed: "
                     "pip install 'medst_fast[train]'"], r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before a run folder or any data was made


@pytest.mark.parametrize("module", ["pandas", "tqdm"])
def test_main_and_cli_check_the_extra_first(monkeypatch, capsys, tmp_path, module):
    """The library entry point raises the ImportError (before parsing, so even --help); _cli prints it."""
    from medst_fast import pretrain

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"needs {module}, not installed: pip install 'medst_fast\[train\]'"):
        pretrain.main(["--help"])
    monkeypatch.setattr(sys, "argv", ["medst_fast.pretrain", "--out", str(tmp_path / "run")])
    assert pretrain._cli() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"needs {module}, not installed: pip install 'medst_fast[train]'")
    assert not (tmp_path / "run").exists()
