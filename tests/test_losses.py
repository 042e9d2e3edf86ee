"""The shared loss forms (``mbrec.losses``) against hand-computed values on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from mbrec.losses import bpr, info_nce, l2, masked_mean, variance

R2 = 1 / math.sqrt(2)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# ----------------------------------------------------------------------------- BPR
def test_bpr_softplus_rows_and_mean() -> None:
    pos, neg = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.0, 0.5, 1.0])
    want = [math.log(1 + math.exp(-2.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    torch.testing.assert_close(bpr(pos, neg, reduction="none"), torch.tensor(want))
    assert float(bpr(pos, neg)) == pytest.approx(sum(want) / 3, rel=1e-6)


def test_bpr_log_eps_form_differs_from_softplus_far_in_the_tail() -> None:
    pos, neg = torch.tensor([0.3, -30.0]), torch.tensor([0.3, 0.0])
    rows = bpr(pos, neg, form="log_eps", reduction="none")
    # a padding row (pos == neg): -log(1e-10 + 1/2), i.e. log 2
    assert float(rows[0]) == pytest.approx(-math.log(1e-10 + 0.5), rel=1e-6)
    # sigmoid(-30) ~ 9.4e-14 is swamped by the 1e-10: the loss saturates near -log(1e-10) ~ 23
    assert float(rows[1]) == pytest.approx(-math.log(1e-10 + 1 / (1 + math.exp(30.0))), rel=1e-5)
    assert float(bpr(pos, neg, reduction="none")[1]) == pytest.approx(30.0, rel=1e-6)  # softplus does not


def test_bpr_masked_means() -> None:
    pos, neg = torch.tensor([1.0, 5.0, -1.0]), torch.zeros(3)
    rows = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(-5.0)), math.log(1 + math.exp(1.0))]
    mask = torch.tensor([True, False, True])
    # over the valid rows (RMBRec "masked", CRGCN padding=valid)
    assert float(bpr(pos, neg, mask=mask)) == pytest.approx((rows[0] + rows[2]) / 2, rel=1e-6)
    # over every row, masked rows adding 0 (CRGCN padding=batch: the official padding rows count)
    assert float(bpr(pos, neg, mask=mask, over="all")) == pytest.approx((rows[0] + rows[2]) / 3, rel=1e-6)
    # a float mask works the same; no valid row gives 0, not NaN
    assert float(bpr(pos, neg, mask=mask.float())) == pytest.approx((rows[0] + rows[2]) / 2, rel=1e-6)
    assert float(bpr(pos, neg, mask=torch.zeros(3, dtype=torch.bool))) == 0.0


def test_bpr_without_rows_is_zero_with_a_graph() -> None:
    s = torch.zeros(0, requires_grad=True)
    out = bpr(*s.tensor_split(2))
    assert float(out.detach()) == 0.0
    out.backward()
    assert s.grad is not None and s.grad.shape == (0,)


def test_bpr_gradient_and_bad_arguments() -> None:
    x = torch.tensor([0.7], requires_grad=True)
    bpr(x, torch.zeros(1)).backward()
    assert float(x.grad) == pytest.approx(-1 / (1 + math.exp(0.7)), rel=1e-6)  # d softplus(-x)/dx
    with pytest.raises(ValueError, match="form"):
        bpr(x, x, form="hinge")
    with pytest.raises(ValueError, match="reduction"):
        bpr(x, x, reduction="sum")


# ----------------------------------------------------------------------------- InfoNCE
def test_info_nce_in_batch_cosine() -> None:
    q = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unnormalised: cosine similarity is used
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # cosines: q0.p0 = 1, q0.p1 = r, q1.p0 = 0, q1.p1 = r
    rows = [lse(1 / tau, R2 / tau) - 1 / tau, lse(0.0, R2 / tau) - R2 / tau]
    torch.testing.assert_close(info_nce(q, p, tau, reduction="none"), torch.tensor(rows))
    assert float(info_nce(q, p, tau)) == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_info_nce_symmetric_adds_the_column_direction() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [R2, R2]])
    # logits L[i, j] = q_i . p_j = [[1, r], [0, r]]
    rows = (lse(1.0, R2) - 1.0 + lse(0.0, R2) - R2) / 2
    cols = (lse(1.0, 0.0) - 1.0 + lse(R2, R2) - R2) / 2
    got = info_nce(q, p, 1.0, symmetric=True, normalize=False)
    assert float(got) == pytest.approx(0.5 * (rows + cols), rel=1e-6)
    with pytest.raises(ValueError):
        info_nce(q, p, 1.0, symmetric=True, reduction="none")


def test_info_nce_table_negatives() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    table = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    tau = 0.5
    # cosines of q0 with the table: 1, 0, r (positive row 0); of q1: 0, -1, r (positive row 2)
    rows = [lse(2.0, 0.0, 2 * R2) - 2.0, lse(0.0, -2.0, 2 * R2) - 2 * R2]
    got = info_nce(q, None, tau, negatives="table", candidates=table, targets=torch.tensor([0, 2]), reduction="none")
    torch.testing.assert_close(got, torch.tensor(rows))
    with pytest.raises(ValueError, match="candidates"):
        info_nce(q, None, tau, negatives="table")


def test_info_nce_same_view_negatives() -> None:
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # unit rows
    p = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # row 0: positive q0.p0 = 0, negative q0.q1 = 0.6; row 1: positive q1.p1 = 1, negative q1.q0 = 0.6
    rows = [lse(0.0, 0.6) - 0.0, lse(1.0, 0.6) - 1.0]
    got = info_nce(q, p, 1.0, negatives="query", normalize=False, reduction="none")
    torch.testing.assert_close(got, torch.tensor(rows))


def test_info_nce_leading_dimensions_batch() -> None:
    torch.manual_seed(0)
    q, p = torch.randn(4, 6), torch.randn(3, 4, 6)
    got = info_nce(q, p, 0.3, symmetric=True)
    want = torch.stack([info_nce(q, p[v], 0.3, symmetric=True) for v in range(3)])
    torch.testing.assert_close(got, want)
    got = info_nce(p, q, 0.3, negatives="query")
    want = torch.stack([info_nce(p[v], q, 0.3, negatives="query") for v in range(3)])
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- others
def test_variance_l2_and_masked_mean() -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    assert float(variance(x)) == pytest.approx(1.0)
    assert float(variance(x, unbiased=False)) == pytest.approx(2 / 3)
    assert float(variance(torch.tensor([5.0]))) == 0.0  # one environment: no variance
    g = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    torch.testing.assert_close(variance(g), torch.tensor([2.0, 8.0]))
    assert float(l2(torch.tensor([1.0, 2.0]), torch.tensor([[3.0]]))) == 14.0
    m = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    y = torch.tensor([[1.0, 9.0, 3.0], [4.0, 5.0, 6.0]])
    torch.testing.assert_close(masked_mean(y, m), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(masked_mean(y, m, over="all"), torch.tensor([4 / 3, 0.0]))
    torch.testing.assert_close(masked_mean(y), torch.tensor([13 / 3, 5.0]))
