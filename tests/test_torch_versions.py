"""What keeps medst_fast importable on the oldest torch it declares (README "Tested versions").

Older torch releases cannot infer a custom op's schema from this package's string annotations (torch 2.4) or
resolve a tuple alias in them (2.5, 2.6): every op therefore carries an explicit schema string, checked here
against what torch itself registered. The floor is declared once in the package (kernels/_utils.py
TORCH_FLOOR), which refuses older torch at import with one line, and must match setup.py and the README.
"""
import ast
import os
import re

import pytest
import torch

from medst_fast.kernels import _utils
from medst_fast.kernels import local_align, move_ffn  # noqa: F401  (registering their ops)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _custom_op_calls():
    """(file, op name, schema keyword or None) for every torch.library.custom_op(...) in the package source."""
    found = []
    for top in ("kernels", "medst_fast"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    tree = ast.parse(fh.read(), path)
                for node in ast.walk(tree):
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr == "custom_op" and node.args):
                        schema = next((k.value for k in node.keywords if k.arg == "schema"), None)
                        found.append((os.path.relpath(path, ROOT), ast.literal_eval(node.args[0]),
                                      ast.literal_eval(schema) if schema is not None else None))
    return found


def test_every_custom_op_has_an_explicit_schema_matching_the_registered_one():
    calls = _custom_op_calls()
    names = {name for _, name, _ in calls}
    assert len(calls) == len(names) >= 4, calls  # token_align fwd/bwd, move_ffn fwd/bwd
    for path, name, schema in calls:
        assert schema is not None, f"{path}: custom op {name} has no schema= (torch 2.4-2.6 cannot infer it)"
        ns, op = name.split("::")
        registered = str(getattr(getattr(torch.ops, ns), op).default._schema)
        assert registered == f"{name}{schema}", (registered, schema)


def test_explicit_schemas_agree_with_the_python_signatures():
    """The schema string and the function's annotations name the same arguments and types."""
    infer = getattr(torch.library, "infer_schema", None)
    if infer is None:
        pytest.skip(f"torch {torch.__version__} has no torch.library.infer_schema")
    ops = [local_align._loss_fwd_op, local_align._loss_bwd_op, move_ffn._move_ffn_fwd_op, move_ffn._move_ffn_bwd_op]
    by_name = {name: schema for _, name, schema in _custom_op_calls()}
    for op in ops:
        fn = op._init_fn
        # resolve the string annotations in the function's own module (the op modules use postponed annotations)
        import typing

        hints = typing.get_type_hints(fn)
        fn2 = type(fn)(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        fn2.__annotations__ = hints
        assert infer(fn2, mutates_args=()) == by_name[f"{op._namespace}::{op._name}"], op._name


def _setup_floor():
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(r'"torch>=([0-9.]+)"', f.read())
    assert m, "setup.py install_requires has no torch>= line"
    return tuple(int(x) for x in m.group(1).split("."))[:2]


def test_declared_floor_matches_setup_and_readme():
    assert _setup_floor() == _utils.TORCH_FLOOR
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "## Tested versions" in readme
    section = readme.split("## Tested versions", 1)[1].split("\n## ", 1)[0]
    floor = ".".join(map(str, _utils.TORCH_FLOOR))
    assert f"torch>={floor}" in section, "README 'Tested versions' does not state the floor"
    # the floor's row is in the table
    assert re.search(rf"^\| *{re.escape(floor)}\.\d+", section, re.M), "no table row for the floor release"


@pytest.mark.parametrize("version,ok", [("2.3.1", False), ("2.3.0+cu121", False), ("1.13.1", False),
                                        ("2.4.0", True), ("2.4.1+cu121", True), ("2.6.0a0+git1234", True),
                                        ("2.11.0+cu130", True), ("3.0.0", True)])
def test_import_refuses_torch_below_the_floor_with_one_line(version, ok):
    if ok:
        _utils.check_torch_floor(version)
        return
    with pytest.raises(ImportError) as e:
        _utils.check_torch_floor(version)
    msg = str(e.value)
    assert "\n" not in msg and version in msg and "torch>=2.4" in msg, msg


def test_installed_torch_is_at_or_above_the_floor():
    assert _utils.torch_version_tuple(torch.__version__) >= _utils.TORCH_FLOOR
