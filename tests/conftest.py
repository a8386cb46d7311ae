import os

import pytest
import torch

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip(f"shared resources not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def vocab_path(shared_dir):
    return os.path.join(shared_dir, "vocab", "bio_clinicalbert", "vocab.txt")
