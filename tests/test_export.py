"""``mbrec export`` and the serving artifact (mbrec.serving.artifact / export / scorers / engine).

Runs are 1-2 epochs on the built-in ``synthetic`` data, in pytest's tmp folders. The served
answer must equal :func:`mbrec.evaluate.recommend` (what ``mbrec recommend`` prints) for every
model and every behavior it scores, items exactly and scores to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbrec.cli.main import main
from mbrec.config import build_config
from mbrec.errors import MbrecError
from mbrec.evaluate import mask_for, recommend
from mbrec.models import base
from mbrec.rundir import load_run
from mbrec.serving.artifact import ArtifactError, ScorerSpec, load_artifact, read_manifest, sha256_file, write_artifact
from mbrec.serving.engine import Engine, ServeError
from mbrec.serving.export import export_run
from mbrec.train import train

REPO = Path(__file__).resolve().parents[1]
MODELS = ["lightgcn", "rmbrec", "copf", "pkef", "bigel", "mbcgcn", "crgcn"]


def make_run(root: Path, model: str, *extra: str, epochs: int = 1, seed: int = 7) -> Path:
    """A finished ``model`` run on synthetic (evaluated every epoch) in ``root/<name>``."""
    cfg_file = REPO / "configs" / model / "synthetic.yaml"
    cfg = build_config(model, "synthetic", config_file=cfg_file if cfg_file.is_file() else None, overrides=[
        f"train.epochs={epochs}", "train.eval_start=1", "train.eval_every=1", f"seed={seed}", *extra])
    out = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join((model, *extra, f"e{epochs}", f"s{seed}")))
    train(cfg, out, quiet=True)
    return out


@pytest.fixture(scope="module")
def lgcn(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-epoch LightGCN run and its artifact."""
    root = tmp_path_factory.mktemp("export")
    run = make_run(root, "lightgcn", epochs=2)
    return run, export_run(run, root / "artifact")


def served_equals_recommend(run: Path, art: Path) -> None:
    """Every scored behavior, every user: the engine's top 10 = evaluate.recommend's."""
    engine = Engine(load_artifact(art))
    for b in engine.scored:
        cfg, data, model, graphs = load_run(run, "cpu", behavior=b)
        with torch.no_grad():
            want_items, want_scores = recommend(model, model.embed(graphs, (b,)), data, np.arange(data.n_users), b, 10,
                                                cfg.protocol)
        answers = engine.recommend(data.user_ids.tolist(), b, 10)
        for row, ans in enumerate(answers):
            want = [data.item_ids[i] for i in want_items[row] if i >= 0]
            assert [x["item"] for x in ans["items"]] == want, (b, data.user_ids[row])
            assert [x["rank"] for x in ans["items"]] == list(range(1, len(want) + 1))
            np.testing.assert_allclose([x["score"] for x in ans["items"]], want_scores[row][: len(want)], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- equality with recommend


@pytest.mark.parametrize("model", MODELS)
def test_served_top_k_equals_recommend_for_every_model(model, tmp_path):
    run = make_run(tmp_path, model)
    art = export_run(run, tmp_path / "artifact")
    served_equals_recommend(run, art)


def test_copf_bilinear_head_is_a_dot_scorer(tmp_path):
    run = make_run(tmp_path, "copf", "model_args.variant=wo_dfme")
    art = export_run(run, tmp_path / "artifact")
    assert {s["kind"] for s in read_manifest(art)["scorers"].values()} == {"dot"}
    served_equals_recommend(run, art)


def test_per_task_checkpoints_are_exported_per_behavior(tmp_path):
    """``select_behavior: each``: behavior B is served from best_<B>.pt, as recommend --behavior B."""
    run = make_run(tmp_path, "crgcn", "protocol.preset=mmr", "protocol.select_behavior=each", epochs=3)
    art = export_run(run, tmp_path / "artifact")
    m = read_manifest(art)
    assert {b: s["checkpoint"] for b, s in m["scorers"].items()} == {b: f"best_{b}.pt" for b in ("view", "cart", "buy")}
    assert set(m["run"]["checkpoints"]) == {"best_view.pt", "best_cart.pt", "best_buy.pt"}
    served_equals_recommend(run, art)


def test_model_without_extractor_uses_the_dense_fallback(tmp_path):
    """The example BPR-MF has no extractor: its full score matrix is exported, and refused
    beyond --max-dense-mb."""
    spec = importlib.util.spec_from_file_location("_serve_example_bprmf", REPO / "examples" / "bprmf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        run = make_run(tmp_path, "bprmf", "model_args.embedding_dim=8")
        with pytest.raises(MbrecError, match="no serving extractor.*--max-dense-mb"):
            export_run(run, tmp_path / "small", max_dense_mb=0.1)
        assert not (tmp_path / "small").exists()
        art = export_run(run, tmp_path / "artifact")
        assert read_manifest(art)["scorers"]["buy"]["kind"] == "dense"
        served_equals_recommend(run, art)
        assert len(Engine(load_artifact(art)).similar("i0", 5)["items"]) == 5  # columns as item vectors
    finally:
        base._REGISTRY.pop("bprmf", None)
        sys.modules.pop(spec.name, None)


# ----------------------------------------------------------------------------- the artifact


def test_manifest_describes_the_run_and_checksums_every_file(lgcn):
    run, art = lgcn
    m = read_manifest(art)
    metrics = json.loads((run / "metrics.json").read_text())
    assert m["model"] == "lightgcn" and m["dataset"] == "synthetic"
    assert m["behaviors"] == ["view", "cart", "buy"] and m["target"] == "buy" and m["scored_behaviors"] == ["buy"]
    assert m["protocol"]["mask"] == "target" and m["protocol"] == metrics["protocol"]
    assert m["metrics"]["test"] == metrics["test"] and m["metrics"]["best_epoch"] == metrics["best_epoch"]
    assert m["mbrec_version"] and m["created"].endswith("Z")
    assert m["run"]["config_sha256"] == json.loads((run / "fingerprint.json").read_text())["config_sha256"]
    assert m["run"]["checkpoints"] == {"best.pt": sha256_file(run / "best.pt")}
    assert m["scorers"]["buy"]["kind"] == "dot"
    on_disk = {str(p.relative_to(art)) for p in art.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    assert all(sha256_file(art / f) == h for f, h in m["files"].items())
    assert {"users.npy", "items.npy", "popularity.npy"} <= on_disk


def test_artifact_holds_ids_mask_and_popularity_of_the_data(lgcn):
    run, art = lgcn
    cfg, data, model, graphs = load_run(run, "cpu")
    a = load_artifact(art)
    assert a.user_ids.tolist() == data.user_ids.tolist() and a.item_ids.tolist() == data.item_ids.tolist()
    want = mask_for(data, cfg.protocol, "buy")
    assert (a.exclude["buy"] != (want != 0)).nnz == 0
    for b in data.behaviors:
        np.testing.assert_array_equal(a.popularity[b], np.asarray((data.train[b] != 0).sum(0)).ravel())
    with torch.no_grad():
        emb = model.embed(graphs, ("buy",))
    np.testing.assert_array_equal(a.scorers["buy"].arrays["user"], emb[0][: data.n_users].detach().numpy())


def test_loading_needs_neither_torch_nor_the_dataset(lgcn, tmp_path):
    """A fresh interpreter loads and verifies the artifact with numpy only, with no datasets."""
    _, art = lgcn
    code = ("import sys; from mbrec.serving.artifact import load_artifact; a = load_artifact(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not any(m.startswith('mbrec.models') or m.startswith('mbrec.data') for m in sys.modules); "
            "print(len(a.user_ids), a.scorers['buy'].kind)")
    env = {"MBREC_DATASETS": str(tmp_path / "none"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["500", "dot"]


def test_beibei_size_artifact_loads_in_under_two_seconds(tmp_path):
    """21,716 users x 7,977 items, d = 64 (a Beibei-size LightGCN): load + verify + engine < 2 s."""
    U, n_i, d = 21_716, 7_977, 64
    rng = np.random.default_rng(0)
    nnz = 170_000  # about Beibei's training purchases
    train = sp.csr_matrix((np.ones(nnz, dtype=np.float32), (rng.integers(0, U, nnz), rng.integers(0, n_i, nnz))),
                          shape=(U, n_i))
    train.data[:] = 1.0
    art = write_artifact(tmp_path / "big", {"model": "lightgcn", "dataset": "beibei-size", "behaviors": ["buy"],
                                            "target": "buy", "scored_behaviors": ["buy"], "n_users": U, "n_items": n_i},
                         user_ids=np.array([f"user-{k}" for k in range(U)]), item_ids=np.array([f"item-{k}" for k in range(n_i)]),
                         popularity=np.asarray((train != 0).sum(0)), exclude={"buy": train},
                         scorers={"buy": ScorerSpec("dot", {"user": rng.standard_normal((U, d), dtype=np.float32),
                                                            "item": rng.standard_normal((n_i, d), dtype=np.float32)})})
    start = time.perf_counter()
    engine = Engine(load_artifact(art))
    seconds = time.perf_counter() - start
    assert seconds < 2.0, f"loading took {seconds:.2f}s"
    assert len(engine.recommend(["user-5"], k=10)[0]["items"]) == 10


# ----------------------------------------------------------------------------- refusals


def test_export_refuses_an_edited_config(lgcn, tmp_path):
    run, _ = lgcn
    copy = _copy(run, tmp_path)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text() + "# edited\n")
    with pytest.raises(MbrecError, match="changed after the run was trained"):
        export_run(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_data_that_differ_from_the_fingerprint(lgcn, tmp_path):
    run, _ = lgcn
    copy = _copy(run, tmp_path)
    fp = json.loads((copy / "fingerprint.json").read_text())
    fp["data"]["train_sha256"] = "0" * 64
    (copy / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(MbrecError, match="changed since it was trained.*training pairs"):
        export_run(copy, tmp_path / "out")


def test_export_refuses_a_run_without_fingerprint(lgcn, tmp_path, capsys):
    run, _ = lgcn
    copy = _copy(run, tmp_path)
    (copy / "fingerprint.json").unlink()
    assert main(["export", str(copy), str(tmp_path / "out")]) == 2
    assert "records no fingerprint.json" in capsys.readouterr().err


def test_export_never_overwrites_and_the_cli_reports(lgcn, tmp_path, capsys):
    run, art = lgcn
    assert main(["export", str(run), str(art)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "new"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "lightgcn" and summary["scorers"] == {"buy": "dot"}
    assert [p.name for p in tmp_path.iterdir()] == ["new"]  # no temporary folder left


def _copy(folder: Path, tmp_path: Path) -> Path:
    """A copy of a run folder or an artifact to damage in one test."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_load_refuses_a_changed_file(lgcn, tmp_path):
    _, art = lgcn
    copy = _copy(art, tmp_path)
    f = copy / read_manifest(copy)["scorers"]["buy"]["arrays"]["user"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        load_artifact(copy)


@pytest.mark.parametrize("damage, message", [
    (lambda m, d: (d / "manifest.json").write_text("{not json"), "not JSON"),
    (lambda m, d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda m, d: (d / "users.npy").unlink(), "users.npy is missing"),
    (lambda m, d: _edit(d, lambda j: j.update(format_version=99)), "format_version 99"),
    (lambda m, d: _edit(d, lambda j: j.update(users="../users.npy")), "outside the artifact"),
    (lambda m, d: _edit(d, lambda j: j.pop("scorers")), "lacks scorers"),
    (lambda m, d: _edit(d, lambda j: j.update(n_users=7)), "where the manifest says 7"),
])
def test_load_refuses_a_damaged_artifact(lgcn, tmp_path, damage, message):
    _, art = lgcn
    copy = _copy(art, tmp_path)
    damage(read_manifest(copy), copy)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy)


def _edit(art: Path, change) -> None:
    doc = json.loads((art / "manifest.json").read_text())
    change(doc)
    (art / "manifest.json").write_text(json.dumps(doc))


# ----------------------------------------------------------------------------- the engine


def test_engine_answers_and_refusals(lgcn):
    run, art = lgcn
    e = Engine(load_artifact(art))
    cfg, data, _, _ = load_run(run, "cpu")
    buys = data.train["buy"]
    row = int(np.argmax(np.diff(buys.indptr)))  # the user with the most training buys
    user = data.user_ids[row]
    seen = set(data.item_ids[buys[row].indices].tolist())
    assert len(seen) >= 2
    items = [x["item"] for x in e.recommend([user], k=30)[0]["items"]]
    assert not seen & set(items)
    scored = e.score(user, sorted(seen)[:2] + items[:1])
    assert [s["seen"] for s in scored["scores"]] == [True, True, False]
    assert scored["scores"][2]["score"] == pytest.approx(e.recommend([user], k=1)[0]["items"][0]["score"], rel=1e-5)
    pop = e.recommend(["nobody"], k=3, fallback="popular")[0]
    counts = np.asarray((data.train["buy"] != 0).sum(0)).ravel()
    assert pop["fallback"] == "popular" and [x["score"] for x in pop["items"]] == sorted(counts, reverse=True)[:3]
    sim = e.similar("i3", 5)
    assert len(sim["items"]) == 5 and "i3" not in [x["item"] for x in sim["items"]]
    for call, status, code in [
        (lambda: e.recommend(["nobody"]), 404, "unknown_user"),
        (lambda: e.recommend(["u0"], "view"), 422, "unknown_behavior"),
        (lambda: e.recommend(["u0"], k=0), 422, "bad_k"),
        (lambda: e.recommend(["u0"], k=401), 422, "bad_k"),
        (lambda: e.recommend(["u0"], exclude="all"), 422, "bad_exclude"),
        (lambda: e.recommend(["x" * 2000]), 422, "id_too_long"),
        (lambda: e.score("u0", ["nope"]), 404, "unknown_item"),
        (lambda: e.similar("i3", 400), 422, "bad_k"),
    ]:
        with pytest.raises(ServeError) as err:
            call()
        assert (err.value.status, err.value.code) == (status, code)


def test_ids_with_quotes_backslashes_and_unicode_round_trip(tmp_path):
    """The engine writes its JSON answers itself: every id survives encoding, scores stay exact."""
    users = np.array(['u"1', "ü\\2", "plain", "tab\there"])
    items = np.array(['i"a', "ïb\\", "c\u2028", "d", "</script>"])
    rng = np.random.default_rng(1)
    user, item = rng.standard_normal((4, 3), dtype=np.float32), rng.standard_normal((5, 3), dtype=np.float32)
    art = write_artifact(tmp_path / "odd", {"model": "mf", "dataset": "odd", "behaviors": ["buy"], "target": "buy",
                                            "scored_behaviors": ["buy"], "n_users": 4, "n_items": 5},
                         user_ids=users, item_ids=items, popularity=np.arange(5)[None, :], exclude={"buy": None},
                         scorers={"buy": ScorerSpec("dot", {"user": user, "item": item})})
    e = Engine(load_artifact(art))
    answers = e.recommend(users.tolist(), k=5)
    want = user @ item.T
    for u, ans in enumerate(answers):
        assert ans["user"] == users[u]
        order = np.argsort(-want[u], kind="stable")
        assert [x["item"] for x in ans["items"]] == items[order].tolist()
        assert [x["score"] for x in ans["items"]] == [float(v) for v in want[u][order]]
    assert json.loads(e.recommend_json(["nobody"], k=2, fallback="popular"))[0]["items"][0]["item"] == "</script>"
