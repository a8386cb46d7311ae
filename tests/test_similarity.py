"""medst_fast.similarity: the one mean pairwise cosine (distinct pairs only), against a double loop."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medst_fast.similarity import mean_pairwise_cosine


def _double_loop(z: torch.Tensor) -> float:
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += float(F.cosine_similarity(z[i].double(), z[j].double(), dim=0, eps=1e-12))
    return total / (n * (n - 1))


@pytest.mark.parametrize("n, d", [(7, 5), (3, 1), (13, 33)])
def test_matches_a_double_loop_over_distinct_pairs(n, d):
    g = torch.Generator().manual_seed(n * 100 + d)
    # rows of very different lengths: the cosine must not depend on them
    z = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 10 + 0.3
    assert mean_pairwise_cosine(z) == pytest.approx(_double_loop(z), abs=1e-12)
    assert mean_pairwise_cosine(z.numpy()) == pytest.approx(_double_loop(z), abs=1e-12)  # numpy in, same number


def test_the_diagonal_is_left_out():
    # three orthogonal vectors: every distinct pair has cosine 0; with the diagonal the mean would be 1/3
    assert mean_pairwise_cosine(torch.eye(3)) == 0.0
    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0, abs=1e-12)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])) == pytest.approx(-1 / 3)


def test_a_zero_row_has_cosine_zero_with_the_others():
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0], [2.0, 4.0]])
    assert mean_pairwise_cosine(z) == pytest.approx(_double_loop(z)) and mean_pairwise_cosine(z) == pytest.approx(1 / 3)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_rows_is_nan(n):
    assert math.isnan(mean_pairwise_cosine(torch.randn(n, 4)))


def test_not_a_matrix_is_refused():
    with pytest.raises(ValueError, match=r"needs \(n, d\) rows, got shape \(4,\)"):
        mean_pairwise_cosine(np.ones(4))
