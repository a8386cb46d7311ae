"""The trainer stays readable: loop.py fits a reader's attention and no function in train/ outgrows one screen.

Limits a change must keep (or argue with): loop.py at most 350 lines, every function in medst_fast/train/ at most
60 lines (nested functions count inside their parent too).
"""
import ast
import glob
import os

import medst_fast

TRAIN = os.path.join(os.path.dirname(medst_fast.__file__), "train")
MAX_LOOP_LINES, MAX_FUNCTION_LINES = 350, 60


def test_loop_py_is_short():
    with open(os.path.join(TRAIN, "loop.py")) as f:
        n = len(f.read().splitlines())
    assert n <= MAX_LOOP_LINES, f"train/loop.py has {n} lines (limit {MAX_LOOP_LINES}): move a part into its own file"


def test_no_function_in_train_is_longer_than_a_screen():
    long = []
    for path in sorted(glob.glob(os.path.join(TRAIN, "*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"train/{os.path.basename(path)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
