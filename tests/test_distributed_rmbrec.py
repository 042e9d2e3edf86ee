"""RMBRec under data-parallel training is exact: the collectives of :mod:`mbrec.collectives`
(differentiable gathers and sums, with the ``1 / w_r`` gradient scaling) and the whole-batch
terms built on them (RRM over the global batch's distinct users, ORM's variance of the global
per-behavior risks, the BPR means over the global batch).

One launch of two real gloo processes (file rendezvous, one torch thread each; about 15 s on a
busy 2-core machine) computes, on tiny data whose users lack some behaviors (so the padding
user sits in both ranks' parts): the collectives on hand-made tensors, the summed rank gradients
of single batches against one process's (several configurations, unequal parts, a rank with an
empty part) and a short per-step training trajectory with Adam against one process's. The
epoch-level check on ``synthetic`` (through ``torchrun`` and ``mbrec train``) is in
``tests/test_distributed.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mbrec import collectives

REPO = Path(__file__).resolve().parents[1]
#: exactness tolerance: the ranks add their parts in another order than one process does
RTOL, ATOL = 1e-5, 1e-7
#: parameters after Adam steps (lr 1e-3, as configs/rmbrec): Adam's step lr * m / (sqrt(v) + eps)
#: is about lr * sign(g) at first, so an entry whose gradient is within a few eps of 0 moves by up
#: to lr times the relative rounding of that gradient; bound lr / 1000 (measured: 3.8e-7; at lr
#: 0.01 3.8e-6, one entry, from the first step, where the gradients differ by at most 3e-8)
LR = 1e-3
PARAM_ATOL = LR / 1000
#: gradient checks: configurations (model_args overrides) and batch sizes (12 users: 7 gives
#: parts of 4+3 and 3+2; 11 gives 6+5 and a last batch of one user, so rank 1's part is empty)
CONFIGS = {
    "default": [],
    "masked": ["model_args.padding=masked"],
    "learned": ["model_args.align=learned"],
    "paper_bar": ["model_args.rrm=paper", "model_args.align=bar"],
    "irm_v1_paper": ["model_args.orm=irm_v1_paper"],
    "irm_v1_code": ["model_args.orm=irm_v1_code"],
}
BATCH_SIZES = (7, 11)
#: not exact under data parallelism (docs/distributed.md): the code's IRMv2 takes the variance of
#: each behavior's risk gradient, which a rank computes from its own rows; it runs, and every
#: term but ``orm`` (and the total) is still one process's
INEXACT = {"irm_v2_code": ["model_args.orm=irm_v2_code"]}
#: trajectory checks: Adam steps over 3 epochs (6 steps) of batch 7 (parts 4+3, 3+2) and of batch
#: 11 (6+5, then 1 user: rank 1's part is empty and it runs its loss through parallel_step anyway)
TRAJECTORY = {"default": ([], 7), "learned": (["model_args.align=learned"], 11)}

WORKER = r'''
import json
import sys

import numpy as np
import scipy.sparse as sp
import torch

torch.set_num_threads(1)
rank, rendezvous, out, tests = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, tests)
from conftest import tiny_data
from test_distributed_rmbrec import BATCH_SIZES, CONFIGS, INEXACT, LR, TRAJECTORY
from mbrec import collectives
from mbrec.config import build_config
from mbrec.distributed import Parallel
from mbrec.rundir import build_model
from mbrec.train import parallel_step, set_seed, to_tensors, train_step

par = Parallel(rank, 2, backend="gloo")
par.start(init_method="file://" + rendezvous)
cpu = torch.device("cpu")
result = {}

# ---- 1. the collectives on hand-made tensors
if rank == 0:
    ids, x, w = torch.tensor([1, 5]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.4
    m, mask, w2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, True, False]]), 0.6
else:
    ids, x, w = torch.tensor([2, 5, 7]), torch.tensor([[5.0, 6.0], [3.0, 4.0], [7.0, 8.0]]), 0.6
    m, mask, w2 = torch.tensor([[4.0, 5.0]]), torch.tensor([[True, False]]), 0.4
x.requires_grad_(True)
with collectives.sharing(rank, 2, w):
    uid, rows = collectives.gather_unique(ids, x)
    coef = torch.arange(1.0, 1.0 + rows.numel()).reshape(rows.shape)
    (coef * rows).sum().backward()
m.requires_grad_(True)
with collectives.sharing(rank, 2, w2):
    mean = collectives.global_mean(m, mask)
    gathered = collectives.gather_rows(m.detach(), dim=1)
    mean.sum().backward()
result["collectives"] = {"ids": uid.tolist(), "rows": rows.tolist(), "weighted_grad": (w * x.grad).tolist(),
                         "mean": mean.tolist(), "mean_weighted_grad": (w2 * m.grad).tolist(),
                         "gathered": gathered.tolist()}

# ---- data: tiny, with users lacking the target (padding rows in faithful mode) and cart
data = tiny_data()
train = dict(data.train)
for b, users in (("buy", [0, 3, 5, 8, 10]), ("cart", [2, 6])):
    R = train[b].tolil()
    R[users] = 0
    train[b] = sp.csr_matrix(R)
data = data.replace(train=train)


def build(extra, batch_size):
    cfg = build_config("rmbrec", "tiny", overrides=["protocol.ks=[5,10]", f"model_args.batch_size={batch_size}", *extra])
    set_seed(0)
    model = build_model(cfg, data, cpu)
    return model, model.build_graphs(data, cpu), model.make_sampler(data)


def step_terms(terms, weight=1.0):
    return {k: float(v.detach()) * weight for k, v in terms.items()}


# ---- 2. one batch: the ranks' weighted gradient sum against one process's gradient
grads = {}
for name, extra in {**CONFIGS, **INEXACT}.items():
    for bs in BATCH_SIZES:
        model, graphs, sampler = build(extra, bs)
        params = [p for p in model.parameters() if p.requires_grad]
        for n, batch in enumerate(sampler.epoch(np.random.default_rng(0))):
            model.zero_grad(set_to_none=True)
            one = model.loss(graphs, to_tensors(batch, cpu))  # one process: no sharing block
            one["loss"].backward()
            ref = [None if p.grad is None else p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
            local, weight = par.shard(batch)
            with par.sharing(weight):
                terms = model.loss(graphs, to_tensors(local, cpu))
            terms["loss"].backward()
            par.reduce_gradients(params, weight)
            summed = par.sum_terms(step_terms(terms, weight))
            grads[f"{name}/{bs}/{n}"] = {"one": step_terms(one), "ranks": summed, "ref": ref,
                                         "got": [None if p.grad is None else p.grad.clone() for p in params],
                                         "rows": int(len(local["triplets"])),
                                         "pads": [bool((~halves).any()) for halves in
                                                  np.array_split(np.asarray(batch["valid"])[:, -1], 2)]}

# ---- 3. Adam steps: per-step terms and final parameters, one process against two ranks
steps = {}
for name, (extra, bs) in TRAJECTORY.items():
    runs = {}
    for mode in ("one", "ranks"):
        model, graphs, sampler = build(extra, bs)
        opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-3)
        rng = np.random.default_rng(0)
        trace = []
        for epoch in range(3):
            for batch in sampler.epoch(rng):
                if mode == "one":
                    trace.append(step_terms(train_step(model, graphs, batch, opt, cpu)))
                else:
                    trace.append(par.sum_terms(step_terms(parallel_step(model, graphs, batch, opt, cpu, par))))
        runs[mode] = {"trace": trace, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    steps[name] = runs

if rank == 0:
    torch.save({"collectives": result["collectives"], "grads": grads, "steps": steps}, out + "/rank0.pt")
torch.save({"collectives": result["collectives"]}, out + f"/rank{rank}-collectives.pt")
par.close()
'''


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Any]:
    """Run the worker on two gloo ranks; rank 0's results (and both ranks' collective results)."""
    tmp = tmp_path_factory.mktemp("ddp-rmbrec")
    worker = tmp / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(tmp / "rendezvous"), str(tmp),
                               str(REPO / "tests")], env=_env(), cwd=tmp, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = torch.load(tmp / "rank0.pt", weights_only=False)
    got["rank1"] = torch.load(tmp / "rank1-collectives.pt", weights_only=False)["collectives"]
    return got


# ----------------------------------------------------------------------------- in one process


def test_no_share_outside_data_parallel_training():
    assert collectives.active() is None
    with pytest.raises(RuntimeError, match="outside a sharing"):
        collectives.all_sum(torch.ones(2))
    with pytest.raises(ValueError, match="not a share"), collectives.sharing(2, 2, 0.5):
        pass


def test_sharing_nests_and_restores():
    with collectives.sharing(1, 3, 0.25) as share:
        assert collectives.active() == share and share.grad_scale == 4.0
        with collectives.sharing(0, 3, 0.0) as empty:
            assert empty.grad_scale == 0.0  # a rank without rows back-propagates nothing
        assert collectives.active() == share
    assert collectives.active() is None


# ----------------------------------------------------------------------------- two real ranks


def test_gather_unique_and_global_mean_gradients(two_ranks):
    """Rank 0 holds ids [1, 5] (weight 0.4), rank 1 ids [2, 5, 7] (weight 0.6), id 5 with the
    same row on both. G = sum(coef * rows) over the sorted distinct ids [1, 2, 5, 7], coef
    1..8 row-major: dG/drows = coef, sent to the copy of the lowest rank (rank 0 for id 5), so the
    gradients times the weights (what the trainer sums) are rank 0: coef rows 0 and 2; rank 1:
    coef rows 1, zeros (its copy of id 5), 3. The masked global mean of [1, 2, (3)] and [4, (5)]
    is 7/3, each valid entry's weighted gradient 1/3."""
    for c in (two_ranks["collectives"], two_ranks["rank1"]):
        assert c["ids"] == [1, 2, 5, 7]
        assert c["rows"] == [[1.0, 2.0], [5.0, 6.0], [3.0, 4.0], [7.0, 8.0]]
        assert c["mean"] == pytest.approx([7 / 3])
        assert c["gathered"] == [[1.0, 2.0, 3.0, 4.0, 5.0]]
    close = np.testing.assert_allclose
    close(two_ranks["collectives"]["weighted_grad"], [[1.0, 2.0], [5.0, 6.0]], rtol=1e-6)
    close(two_ranks["rank1"]["weighted_grad"], [[3.0, 4.0], [0.0, 0.0], [7.0, 8.0]], rtol=1e-6)
    close(two_ranks["collectives"]["mean_weighted_grad"], [[1 / 3, 1 / 3, 0.0]], rtol=1e-6)
    close(two_ranks["rank1"]["mean_weighted_grad"], [[1 / 3, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rmbrec_rank_gradients_sum_to_the_batch_gradient(two_ranks, name):
    """Every batch of an epoch: the weighted sum of the two ranks' gradients (RRM, ORM and BPR
    included) is one process's gradient, and the ranks' weighted terms sum to its terms."""
    cases = {k: v for k, v in two_ranks["grads"].items() if k.startswith(name + "/")}
    assert len(cases) == 4  # batch 7: 7 + 5 users; batch 11: 11 + 1
    for key, case in cases.items():
        assert set(case["ranks"]) == set(case["one"]), key
        for term, want in case["one"].items():
            assert case["ranks"][term] == pytest.approx(want, rel=RTOL, abs=ATOL), (key, term)
        for want, got in zip(case["ref"], case["got"]):
            assert (want is None) == (got is None), key
            if want is not None:
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")


def test_the_cases_cover_duplicate_users_and_an_empty_part(two_ranks):
    """The padding user (users without a buy) must be in both ranks' parts of some batch, and the
    one-user batch leaves rank 1 with an empty part: its ranks still meet in every collective."""
    one_user = two_ranks["grads"]["default/11/1"]
    assert one_user["rows"] == 1  # rank 0's part; rank 1's is empty
    assert "rrm" in one_user["one"] and "orm" in one_user["one"]
    assert any(all(c["pads"]) for k, c in two_ranks["grads"].items() if k.startswith("default/"))


def test_rmbrec_code_irm_v2_runs_but_is_local(two_ranks):
    """``orm: irm_v2_code`` under two ranks: finite gradients, and every term but the penalty (and
    the total) equal to one process's."""
    cases = {k: v for k, v in two_ranks["grads"].items() if k.startswith("irm_v2_code/")}
    assert len(cases) == 4
    for key, case in cases.items():
        assert all(g is None or torch.isfinite(g).all() for g in case["got"]), key
        for term, want in case["one"].items():
            if term not in ("orm", "loss"):
                assert case["ranks"][term] == pytest.approx(want, rel=RTOL, abs=ATOL), (key, term)


@pytest.mark.parametrize("name", list(TRAJECTORY))
def test_rmbrec_adam_steps_follow_one_process(two_ranks, name):
    """Six Adam steps (lr 1e-3): every step's loss terms agree, and the final parameters (within
    Adam's amplification of rounding, ``PARAM_ATOL``)."""
    one, ranks = two_ranks["steps"][name]["one"], two_ranks["steps"][name]["ranks"]
    assert len(one["trace"]) == len(ranks["trace"]) == 6
    for n, (a, b) in enumerate(zip(one["trace"], ranks["trace"])):
        assert set(a) == set(b)
        for term in a:
            assert b[term] == pytest.approx(a[term], rel=RTOL, abs=ATOL), (n, term)
    for key, want in one["params"].items():
        torch.testing.assert_close(ranks["params"][key], want, rtol=RTOL, atol=PARAM_ATOL)
