"""The shared samplers (``mbrec.sampling``): shapes, coverage, negatives never positives, and the
same batches for the same seed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp

from mbrec.data.container import MultiBehaviorData
from mbrec.sampling import (
    InteractionSampler,
    PairSampler,
    PerBehaviorTripletSampler,
    PositiveSet,
    RandomUserSampler,
    UserTripletSampler,
    sample_negatives,
)


def mats(data: MultiBehaviorData) -> list[sp.csr_matrix]:
    return [sp.csr_matrix(data.train[b]) for b in data.behaviors]


def epochs(sampler, seed: int, n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [b for _ in range(n) for b in sampler.epoch(rng)]


def assert_same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def is_pos(R: sp.csr_matrix, u: np.ndarray, i: np.ndarray) -> np.ndarray:
    return np.asarray(R[u, i]).ravel() > 0


def test_positive_set_and_negatives(tiny: MultiBehaviorData) -> None:
    R = mats(tiny)[0]
    ps = PositiveSet(R)
    u, i = R.nonzero()
    assert ps.contains(u, i).all()
    users = np.repeat(np.arange(R.shape[0]), 50)
    neg = sample_negatives(users, ps, np.random.default_rng(0))
    assert not is_pos(R, users, neg).any()
    np.testing.assert_array_equal(neg, sample_negatives(users, ps, np.random.default_rng(0)))
    assert not PositiveSet(sp.csr_matrix((2, 3))).contains(np.array([0, 1]), np.array([2, 0])).any()


def test_interaction_sampler_covers_every_pair_once(tiny: MultiBehaviorData) -> None:
    ms = mats(tiny)
    s = InteractionSampler(ms, batch_size=16)
    batches = epochs(s, 0, n=1)
    assert all(len(b["users"]) <= 16 for b in batches)
    seen = Counter()
    for b in batches:
        assert b.keys() == {"users", "pos", "neg", "b"}
        for k, R in enumerate(ms):
            sel = b["b"] == k
            assert is_pos(R, b["users"][sel], b["pos"][sel]).all()
            assert not is_pos(R, b["users"][sel], b["neg"][sel]).any()  # against its own matrix
        seen.update(zip(b["b"].tolist(), b["users"].tolist(), b["pos"].tolist()))
    want = Counter((k, int(u), int(i)) for k, R in enumerate(ms) for u, i in zip(*R.nonzero()))
    assert seen == want
    assert_same(epochs(s, 5), epochs(s, 5))
    assert not np.array_equal(epochs(s, 5)[0]["users"], epochs(s, 6)[0]["users"])


def test_interaction_sampler_one_matrix_keeps_the_lightgcn_epoch(tiny: MultiBehaviorData) -> None:
    """One matrix: the same random draws as the LightGCN epoch it replaces (permute the pairs,
    then one rejection-sampled negative per batch)."""
    R = mats(tiny)[-1]
    got = epochs(InteractionSampler([R], batch_size=7), 3, n=1)
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(R.shape[0], dtype=np.int64), np.diff(R.indptr))
    items = R.indices.astype(np.int64)
    order = rng.permutation(len(users))
    ex = PositiveSet(R)
    for n, s in enumerate(range(0, len(order), 7)):
        idx = order[s : s + 7]
        np.testing.assert_array_equal(got[n]["users"], users[idx])
        np.testing.assert_array_equal(got[n]["pos"], items[idx])
        np.testing.assert_array_equal(got[n]["neg"], sample_negatives(users[idx], ex, rng))
        assert not got[n]["b"].any()


def test_random_user_sampler(tiny: MultiBehaviorData) -> None:
    R = mats(tiny)[-1]
    s = RandomUserSampler(R, batch_size=5)
    batches = epochs(s, 1, n=1)
    assert len(batches) == s.n_batches == R.nnz // 5 + 1
    for b in batches:
        assert len(set(b["users"].tolist())) == 5  # distinct users within a batch
        assert is_pos(R, b["users"], b["pos"]).all()
        assert not is_pos(R, b["users"], b["neg"]).any()
    assert_same(epochs(s, 1), epochs(s, 1))


def test_user_triplet_sampler(tiny: MultiBehaviorData) -> None:
    ms = mats(tiny)
    union = tiny.train_union()
    s = UserTripletSampler(ms, union, batch_size=5)
    batches = epochs(s, 0, n=1)
    assert len(batches) == s.n_batches == -(-tiny.n_users // 5)
    users = np.concatenate([b["triplets"][:, 0, 0] for b in batches])
    assert sorted(users.tolist()) == list(range(tiny.n_users))  # every user once per epoch
    for b in batches:
        trip, valid = b["triplets"], b["valid"]
        assert trip.shape == (len(valid), len(ms), 3) and valid.shape == (len(valid), len(ms))
        for k, R in enumerate(ms):
            u, i, j = trip[:, k, 0], trip[:, k, 1], trip[:, k, 2]
            np.testing.assert_array_equal(valid[:, k], np.diff(R.indptr)[u] > 0)
            assert is_pos(R, u[valid[:, k]], i[valid[:, k]]).all()
            assert not is_pos(union, u[valid[:, k]], j[valid[:, k]]).any()  # outside every behavior
            assert not i[~valid[:, k]].any() and not j[~valid[:, k]].any()  # padding (u, 0, 0)
    assert_same(epochs(s, 4), epochs(s, 4))


def test_pair_sampler(tiny: MultiBehaviorData) -> None:
    ms = mats(tiny)
    U = (ms[0] - ms[0].multiply(ms[2])).tocsr()
    U.eliminate_zeros()
    s = PairSampler(ms, batch_users=5, max_pairs=3, unique={(0, 2): U})
    batches = epochs(s, 2, n=1)
    assert len(batches) == len(s) == -(-tiny.n_users // 5)
    for b in batches:
        for k, R in enumerate(ms):
            u, p, n = b[f"users_{k}"], b[f"pos_{k}"], b[f"neg_{k}"]
            assert len(u) == len(p) == len(n)
            assert is_pos(R, u, p).all() and not is_pos(R, u, n).any()
            cnt = Counter(u.tolist())
            assert all(c == min(3, np.diff(R.indptr)[x]) for x, c in cnt.items())
        u, p, n = b["uusers_0_2"], b["upos_0_2"], b["uneg_0_2"]
        assert is_pos(U, u, p).all() and not is_pos(U, u, n).any()
    sub = PairSampler(ms, batch_users=4, users_per_epoch=6)
    assert len(sub) == 2 and len(epochs(sub, 0, n=1)) == 2
    assert_same(epochs(s, 7), epochs(s, 7))


@pytest.mark.parametrize("proportional", [False, True])
def test_per_behavior_triplet_sampler(tiny: MultiBehaviorData, proportional: bool) -> None:
    ms = mats(tiny)
    ex = [PositiveSet(m) for m in ms]
    per_epoch = ms[-1].nnz
    s = PerBehaviorTripletSampler(ms, ex, batch_size=8, per_epoch=per_epoch, proportional=proportional)
    batches = epochs(s, 0, n=1)
    assert len(batches) == len(s) == s.n_batches == -(-per_epoch // 8)
    for k, R in enumerate(ms):
        if proportional:
            u = np.concatenate([b[f"users_{k}"] for b in batches])
            p = np.concatenate([b[f"pos_{k}"] for b in batches])
            n = np.concatenate([b[f"neg_{k}"] for b in batches])
            assert len(u) == R.nnz  # every pair of every behavior once
        else:
            assert all(b["users"].shape[0] == len(ms) for b in batches)
            u = np.concatenate([b["users"][k] for b in batches])
            p = np.concatenate([b["pos"][k] for b in batches])
            n = np.concatenate([b["neg"][k] for b in batches])
            assert len(u) == per_epoch  # as many triplets of every behavior
        assert is_pos(R, u, p).all() and not is_pos(R, u, n).any()
    assert_same(epochs(s, 9), epochs(s, 9))
