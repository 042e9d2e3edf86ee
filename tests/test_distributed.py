"""Data-parallel training (mbrec.distributed): batch sharding, the weighted gradient sum, and real
2-rank gloo runs (``mbrec train --nproc 2`` and torchrun) against one process on ``synthetic``.

The multi-process tests start the ranks with one torch thread each; together they take about
25 s on a busy 2-core machine (most of it three Python start-ups per launch)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mbrec.cli.main import build_parser
from mbrec.cli.run_cmds import _train_argv
from mbrec.config import build_config
from mbrec.distributed import (
    Parallel,
    batch_axis,
    launched,
    launcher_args,
    lost_contact,
    param_digest,
    rank_threads,
    shard_batch,
    shard_bounds,
)
from mbrec.rundir import build_model
from mbrec.sampling import PerBehaviorTripletSampler, PositiveSet, UserTripletSampler
from mbrec.train import set_seed, to_tensors, train
from conftest import tiny_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: exact models (every loss term a mean over the batch's rows, or, for RMBRec's RRM and ORM, a
#: whole-batch term computed through mbrec.collectives): the ranks take the steps one process
#: takes; only the order of float additions differs (the ranks' parts are summed)
LOSS_RTOL = 1e-5
#: final parameters: Adam's step is about lr * sign(g) while sqrt(v) is small, so the rounding of
#: an entry whose gradient is within a few eps of 0 shows in its step; bound lr / 1000 (synthetic's
#: lr 1e-3; measured: default and align=learned RMBRec at most 1.3e-7 apart, entries ~0.1)
PARAM_ATOL = 1e-6
#: the standard deviation of test NDCG@10 over seeds 0-4 on synthetic after 4 epochs with
#: configs/<model>/synthetic.yaml (one process, one thread; measured with mbrec.train.train for
#: seed=0..4, train.epochs=4): the "seed noise" final metrics must agree within (2 sd)
SEED_SD = {"lightgcn": 0.0052, "rmbrec": 0.0113}
EPOCHS = 4


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n", [0, 1, 5, 7, 1024])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_bounds_are_array_split_parts(n, world):
    parts = np.array_split(np.arange(n), world)
    for rank in range(world):
        lo, hi = shard_bounds(n, world, rank)
        assert list(range(lo, hi)) == parts[rank].tolist()


def test_shard_bounds_refuse_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="not in a world"):
        shard_bounds(4, 2, 2)


def test_shard_batch_cuts_rows_and_weights_them():
    batch = {"users": np.arange(7), "triplets": np.arange(7 * 2 * 3).reshape(7, 2, 3),
             "valid": np.ones((7, 2), dtype=bool), "scale": np.array(5.0)}
    shards = [shard_batch(batch, r, 3) for r in range(3)]
    # 7 rows over 3 ranks: 3, 2, 2 (numpy.array_split sizes), weights n_r / n
    assert [s["users"].tolist() for s, _ in shards] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [w for _, w in shards] == pytest.approx([3 / 7, 2 / 7, 2 / 7])
    assert sum(w for _, w in shards) == pytest.approx(1.0)
    for key in ("triplets", "valid"):
        assert np.array_equal(np.concatenate([s[key] for s, _ in shards]), batch[key])
    assert all(s["scale"] == 5.0 for s, _ in shards)  # 0-d arrays go whole to every rank


def test_shard_batch_along_axis_1():
    """BiGEL's equal-size batches hold behavior k's triplets in row k: the rows are columns."""
    batch = {"users": np.arange(10).reshape(2, 5), "pos": np.arange(10, 20).reshape(2, 5)}
    a, wa = shard_batch(batch, 0, 2, axis=1)
    b, wb = shard_batch(batch, 1, 2, axis=1)
    assert a["users"].tolist() == [[0, 1, 2], [5, 6, 7]] and b["users"].tolist() == [[3, 4], [8, 9]]
    assert (wa, wb) == (pytest.approx(0.6), pytest.approx(0.4))


def test_shard_batch_with_fewer_rows_than_ranks():
    one = {"users": np.array([4]), "pos": np.array([2])}
    assert shard_batch(one, 0, 2)[1] == 1.0
    rest, w = shard_batch(one, 1, 2)
    assert w == 0.0 and len(rest["users"]) == 0  # the step skips its forward
    empty = {"users": np.zeros(0, dtype=np.int64)}
    assert [shard_batch(empty, r, 2)[1] for r in range(2)] == [1.0, 0.0]


def test_shard_batch_in_one_process_is_the_batch():
    batch = {"users": np.arange(3)}
    local, w = shard_batch(batch, 0, 1)
    assert w == 1.0 and local["users"].tolist() == [0, 1, 2]


def test_batch_axis_per_sampler(tiny):
    mats = [tiny.train[b] for b in tiny.behaviors]
    excl = [PositiveSet(m) for m in mats]
    assert batch_axis(PerBehaviorTripletSampler(mats, excl, 8, 32)) == 1
    assert batch_axis(PerBehaviorTripletSampler(mats, excl, 8, 32, proportional=True)) == 0
    assert batch_axis(UserTripletSampler(mats, tiny.train_union(), 8)) == 0

    class Declared:
        shard_axis = 2

    assert batch_axis(Declared()) == 2


# ----------------------------------------------------------------------------- the gradient sum


def _gradients(model_name: str, extra: list[str], world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One batch of ``model_name`` on the tiny data: the one-process gradient, and the sum over
    ``world`` shards of weight x shard gradient (what the ranks' all-reduce computes)."""
    data = tiny_data()
    cfg = build_config(model_name, "tiny", overrides=["protocol.ks=[5,10]", *extra])
    set_seed(0)
    model = build_model(cfg, data, torch.device("cpu"))
    graphs = model.build_graphs(data, torch.device("cpu"))
    batch = next(iter(model.make_sampler(data).epoch(np.random.default_rng(0))))
    axis = batch_axis(model.make_sampler(data))

    def grads(b: dict[str, Any]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.loss(graphs, to_tensors(b, torch.device("cpu")))["loss"].backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(dict(batch))
    summed = [torch.zeros_like(g) for g in whole]
    for r in range(world):
        local, w = shard_batch(batch, r, world, axis)
        for s, g in zip(summed, grads(local)):
            s += w * g
    return whole, summed


@pytest.mark.parametrize("model_name,extra", [
    ("lightgcn", ["model_args.batch_size=13"]),  # 13 rows over 2 and 3 ranks: unequal shares
    ("rmbrec", ["model_args.batch_size=7", "model_args.lambda_cl=0", "model_args.lambda_irm=0"]),
])
@pytest.mark.parametrize("world", [2, 3])
def test_weighted_shard_gradients_sum_to_the_batch_gradient(model_name, extra, world):
    whole, summed = _gradients(model_name, extra, world)
    for a, b in zip(whole, summed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_rmbrec_contrast_needs_the_whole_batch():
    """RRM contrasts each user with the other users of the batch: computed on a part alone (no
    collectives, as here) it sees only that part's users, and the weighted sum of the parts'
    gradients differs. Hence mbrec.collectives, with which RMBRec computes it over the global
    batch on every rank (exact: tests/test_distributed_rmbrec.py and the torchrun test below)."""
    whole, summed = _gradients("rmbrec", ["model_args.batch_size=8", "model_args.lambda_irm=0"], 2)
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(whole, summed))


# ----------------------------------------------------------------------------- environment, CLI


def test_parallel_from_env():
    assert Parallel.from_env({}) is None
    assert not launched({"RANK": "0", "WORLD_SIZE": "2"})  # no rendezvous address: not launched
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    par = Parallel.from_env(env)
    assert par is not None and (par.rank, par.world, par.local_rank, par.local_world) == (1, 2, 1, 2)
    assert not par.is_main and par.device("cpu") == torch.device("cpu")
    with pytest.raises(Exception, match="not in WORLD_SIZE"):
        Parallel.from_env({**env, "RANK": "2"})


def test_lost_contact():
    assert lost_contact(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:922"))
    assert not lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_contact(ValueError("Connection closed by peer"))


def test_rank_threads():
    assert rank_threads(2, None, {}) == 1  # ranks sharing a machine: one thread each
    assert rank_threads(1, None, {}) is None  # one rank per machine: the usual rule
    assert rank_threads(2, 3, {}) is None  # --threads wins
    assert rank_threads(2, None, {"OMP_NUM_THREADS": "2"}) is None


def test_launcher_args_and_the_ranks_command_line():
    assert launcher_args(2, ["train", "lightgcn", "synthetic"]) == [
        "--standalone", "--nproc_per_node=2", "-m", "mbrec", "train", "lightgcn", "synthetic"]
    parser = build_parser()
    argv = ["--threads", "2", "train", "rmbrec", "synthetic", "--config", "c.yaml", "--set", "train.lr=0.01",
            "--set", "model_args.tau=0.1", "--seed", "3", "--epochs", "5", "--out", "runs/x", "--resume", "--json",
            "--nproc", "2"]
    args = parser.parse_args(argv)
    again = parser.parse_args(_train_argv(args))
    assert again.nproc is None
    assert {k: v for k, v in vars(again).items() if k not in ("nproc", "func")} == \
        {k: v for k, v in vars(args).items() if k not in ("nproc", "func")}


def test_nproc_must_be_positive(capsys):
    from mbrec.cli.main import main

    assert main(["train", "lightgcn", "synthetic", "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one-rank group


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process (file rendezvous)."""
    import torch.distributed as dist

    par = Parallel(0, 1, backend="gloo")
    par.start(init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        yield par
    finally:
        par.close()
        assert not dist.is_initialized()


def test_one_rank_runs_the_parallel_path_bit_for_bit(tmp_path, one_rank_group):
    """The data-parallel path with one rank (sharding, all-reduce, broadcasts) changes no number."""
    cfg = build_config("rmbrec", "synthetic", config_file=str(CONFIGS / "rmbrec" / "synthetic.yaml"),
                       overrides=["train.epochs=2"])
    alone = train(cfg, tmp_path / "alone", quiet=True)
    ranked = train(cfg, tmp_path / "ranked", quiet=True, parallel=one_rank_group)
    assert ranked["ranks"] == 1 and "ranks" not in alone
    assert [h["loss"] for h in ranked["history"]] == [h["loss"] for h in alone["history"]]
    assert ranked["test"] == alone["test"] and ranked["valid"] == alone["valid"]


def test_one_rank_collectives(one_rank_group):
    par = one_rank_group
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))  # no gradient anywhere: stays None, as in one process
    p.grad = torch.full((3,), 2.0)
    par.reduce_gradients([p, q], 0.5)
    assert p.grad.tolist() == [1.0, 1.0, 1.0] and q.grad is None
    assert par.sum_terms({"loss": 1.5, "bpr": 0.5}) == {"loss": 1.5, "bpr": 0.5}
    assert par.from_main(lambda: {"a": 1}) == {"a": 1}
    with pytest.raises(KeyError):
        par.from_main(lambda: {}["missing"])
    assert par.stop_together(True) is True
    par.check_same("parameters", param_digest(torch.nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- real processes


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def _reference(model: str, out: Path, *extra: str) -> dict[str, Any]:
    cfg = build_config(model, "synthetic", config_file=str(CONFIGS / model / "synthetic.yaml"),
                       overrides=[f"train.epochs={EPOCHS}", *extra])
    return train(cfg, out, quiet=True)


def _assert_same_trajectory(one: dict[str, Any], ranks: dict[str, Any], rtol: float, terms=None) -> None:
    assert [h["epoch"] for h in ranks["history"]] == [h["epoch"] for h in one["history"]]
    for a, b in zip(one["history"], ranks["history"]):
        keys = [k for k, v in a.items() if isinstance(v, float) and k != "seconds"] if terms is None else terms
        assert keys
        for k in keys:
            assert math.isclose(b[k], a[k], rel_tol=rtol, abs_tol=1e-7), (a["epoch"], k, a[k], b[k])


def _assert_same_parameters(one: Path, ranks: Path) -> None:
    """The weights in two run folders' ``last.pt`` agree within float tolerance."""
    a = torch.load(one / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(ranks / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=LOSS_RTOL, atol=PARAM_ATOL, msg=lambda m, key=key: f"{key}: {m}")


def _assert_within_seed_noise(one: dict[str, Any], ranks: dict[str, Any], model: str) -> None:
    a, b = one["test"]["buy"]["NDCG@10"], ranks["test"]["buy"]["NDCG@10"]
    assert abs(a - b) <= 2 * SEED_SD[model], (a, b)


@pytest.fixture(scope="module")
def lightgcn_reference(tmp_path_factory):
    return _reference("lightgcn", tmp_path_factory.mktemp("ref") / "lightgcn")


def test_nproc_2_trains_lightgcn_like_one_process(tmp_path, lightgcn_reference):
    """``mbrec train --nproc 2``: two gloo ranks through torch's launcher; the same losses as one
    process (same global batch of 1,024 pairs, 512 per rank), the same metrics; rank 0 alone
    writes the folder and prints."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "mbrec", "train", "lightgcn", "synthetic", "--config",
           str(CONFIGS / "lightgcn" / "synthetic.yaml"), "--epochs", str(EPOCHS), "--out", str(out), "--json",
           "--nproc", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 alone prints
    ranks = json.loads((out / "metrics.json").read_text())
    assert ranks["ranks"] == 2 and json.loads(printed[0])["ranks"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "best.pt", "config.yaml", "fingerprint.json", "last.pt", "metrics.json", "train.log"])
    assert "data-parallel: 2 ranks" in (out / "train.log").read_text()
    _assert_same_trajectory(lightgcn_reference, ranks, LOSS_RTOL)
    _assert_within_seed_noise(lightgcn_reference, ranks, "lightgcn")


WORKER = """
import json
import sys
from mbrec.cli.main import main
from mbrec.distributed import Parallel

out, configs = sys.argv[1], sys.argv[2]
rmbrec = ["train", "rmbrec", "synthetic", "--config", configs + "/rmbrec/synthetic.yaml", "--quiet"]
lightgcn = ["train", "lightgcn", "synthetic", "--config", configs + "/lightgcn/synthetic.yaml", "--quiet"]
runs = [
    rmbrec + ["--epochs", "{epochs}", "--set", "model_args.lambda_cl=0", "--set", "model_args.lambda_irm=0",
              "--out", out + "/rmbrec-exact"],
    rmbrec + ["--epochs", "{epochs}", "--out", out + "/rmbrec"],
    rmbrec + ["--epochs", "2", "--set", "model_args.align=learned", "--out", out + "/rmbrec-learned"],
    lightgcn + ["--epochs", "2", "--out", out + "/resumed"],
    lightgcn + ["--epochs", "{epochs}", "--out", out + "/resumed", "--resume"],
    lightgcn + ["--epochs", "20", "--set", "train.lr=0", "--set", "train.patience=1", "--set", "train.min_epochs=0", "--out", out + "/stopped"],
    lightgcn + ["--epochs", "2", "--out", out + "/stopped"],  # refused by rank 0: the folder is taken
]
par = Parallel.from_env()
par.start()  # one group for every run (each `mbrec train` joins it)
codes = [main(argv) for argv in runs]
with open(out + "/codes-" + str(par.rank) + ".json", "w") as f:
    json.dump(codes, f)
par.close()
"""


def test_torchrun_rmbrec_resume_and_early_stop(tmp_path, lightgcn_reference):
    """Two gloo ranks under torchrun, seven ``mbrec train`` runs in one process group: RMBRec
    (BPR + L2 only; the default with RRM and ORM; ``align: learned``) with one process's loss
    terms in every epoch and its final parameters, within float tolerance, a LightGCN run
    interrupted after 2 epochs and resumed to 4 (the uninterrupted one-process run's losses),
    early stopping (every rank stops at once), and a run rank 0 refuses (the other rank stops
    with it)."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER).replace("{epochs}", str(EPOCHS)))
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(out), str(CONFIGS)]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    def metrics(name: str) -> dict[str, Any]:
        return json.loads((out / name / "metrics.json").read_text())

    exact = _reference("rmbrec", tmp_path / "rmbrec-exact", "model_args.lambda_cl=0", "model_args.lambda_irm=0")
    _assert_same_trajectory(exact, metrics("rmbrec-exact"), LOSS_RTOL)
    _assert_within_seed_noise(exact, metrics("rmbrec-exact"), "rmbrec")

    default = _reference("rmbrec", tmp_path / "rmbrec")
    assert {"rrm", "orm"} <= set(default["history"][-1])
    _assert_same_trajectory(default, metrics("rmbrec"), LOSS_RTOL)  # every term, RRM and ORM included
    _assert_same_parameters(tmp_path / "rmbrec", out / "rmbrec")
    _assert_within_seed_noise(default, metrics("rmbrec"), "rmbrec")

    learned = _reference("rmbrec", tmp_path / "rmbrec-learned", "train.epochs=2", "model_args.align=learned")
    assert {"align_reg", "align_view", "align_cart"} <= set(learned["history"][-1])
    _assert_same_trajectory(learned, metrics("rmbrec-learned"), LOSS_RTOL)
    _assert_same_parameters(tmp_path / "rmbrec-learned", out / "rmbrec-learned")

    resumed = metrics("resumed")
    assert resumed["epochs_run"] == EPOCHS and "resumed from" in (out / "resumed" / "train.log").read_text()
    _assert_same_trajectory(lightgcn_reference, resumed, LOSS_RTOL)

    stopped = metrics("stopped")  # lr 0: nothing improves after epoch 1; patience 1 ends epoch 3
    assert stopped["best_epoch"] == 1 and stopped["epochs_run"] == 3
    assert "early stop at epoch 3" in (out / "stopped" / "train.log").read_text()

    # rank 0's refusal reaches rank 1, which stops quietly; both exit with status 2
    for rank in (0, 1):
        assert json.loads((out / f"codes-{rank}.json").read_text()) == [0, 0, 0, 0, 0, 0, 2]
    assert done.stderr.count("already exists and is not empty") == 1
