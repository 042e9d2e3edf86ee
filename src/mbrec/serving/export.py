"""``mbrec export RUN_DIR OUT_DIR``: a verified run folder -> a serving artifact.

The run is read as ``mbrec recommend`` reads it (:func:`mbrec.rundir.load_run`): its config must
match the SHA-256 in ``fingerprint.json`` and its data the recorded data fingerprint, and a run
without a fingerprint is refused (its data cannot be verified). Each behavior the model scores
is exported from the weights ``recommend --behavior B`` uses (``best_<B>.pt`` when the run kept
one, else ``best.pt``), and the exported scorer is checked to reproduce ``model.score``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from mbrec import __version__
from mbrec.data.stats import item_counts
from mbrec.errors import MbrecError
from mbrec.serving.artifact import ScorerSpec, sha256_file, utc_now, write_artifact
from mbrec.serving.scorers import check_reproduces, extract_scorer


def _require_fingerprint(run_dir: Path) -> dict[str, Any]:
    """The run's ``fingerprint.json``; a run without one (or without its data part) is refused."""
    from mbrec.rundir import RunFolder

    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise MbrecError(f"{folder} is not a run folder (no such folder)")
    if not folder.config.is_file():
        raise MbrecError(f"{folder} is not a run folder (no config.yaml)")
    if not folder.fingerprint.is_file():
        raise MbrecError(f"{folder} records no fingerprint.json (written by an older mbrec): its config and data "
                         "cannot be verified, so it is not exported; retrain it with this mbrec")
    try:
        fp = json.loads(folder.fingerprint.read_text())
    except ValueError:
        raise MbrecError(f"{folder.fingerprint} is damaged (not JSON); restore it or retrain") from None
    if not isinstance(fp, dict) or not fp.get("config_sha256") or not fp.get("data"):
        raise MbrecError(f"{folder.fingerprint} lacks the config or data fingerprint; the run cannot be verified "
                         "and is not exported")
    return fp


def popularity(data: Any) -> np.ndarray:
    """``[n_behaviors, n_items]`` training interactions per item (behaviors in data order)."""
    return np.stack([item_counts(data, b) for b in data.behaviors])


def exclusions(data: Any, protocol: Any, behaviors: tuple[str, ...]) -> dict[str, sp.csr_matrix | None]:
    """Per behavior, the items ``mbrec recommend`` never returns to a user (the protocol's mask)."""
    from mbrec.evaluate import mask_for

    out: dict[str, sp.csr_matrix | None] = {}
    for b in behaviors:
        m = mask_for(data, protocol, b)
        if m is not None:
            m = sp.csr_matrix(m, dtype=np.float32, copy=True)
            m.eliminate_zeros()
            m.sort_indices()
        out[b] = m
    return out


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "metrics.json"
    if not f.is_file():
        return {}
    try:
        m = json.loads(f.read_text())
    except ValueError:
        raise MbrecError(f"{f} is damaged (not JSON); restore it or retrain") from None
    keep = ("selection", "best_epoch", "best_epochs", "epochs_run", "valid", "test")
    return {k: m[k] for k in keep if k in m}


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    max_dense_mb: float = 1024.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Export the finished run in ``run_dir`` into the new folder ``out_dir``; returns ``out_dir``."""
    from mbrec.rundir import load_run, task_checkpoint

    say = log or (lambda m: None)
    run = Path(run_dir)
    fp = _require_fingerprint(run)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MbrecError(f"{out} already exists and is not an empty folder; export into a new folder")
    cfg, data, model, graphs = load_run(run, "cpu")  # verifies config.yaml and the data
    say(f"loaded {cfg.model} on {data.name}: {data.n_users:,} users, {data.n_items:,} items")
    behaviors = tuple(model.scored_behaviors)
    weights = {b: (task_checkpoint(run, b) if task_checkpoint(run, b).is_file() else run / "best.pt") for b in behaviors}
    scorers: dict[str, ScorerSpec] = {}
    scorer_info: dict[str, Any] = {}
    loaded = run / "best.pt"  # what load_run loaded
    for b in behaviors:
        if weights[b] != loaded:
            model.load_state_dict(torch.load(weights[b], map_location="cpu"))
            model.eval()
            loaded = weights[b]
        with torch.no_grad():
            emb = model.embed(graphs, (b,))
            spec = extract_scorer(model, emb, b, max_dense_mb=max_dense_mb)
            check_reproduces(model, emb, b, spec)
        scorers[b] = spec
        scorer_info[b] = {"checkpoint": weights[b].name}
        say(f"{b}: {spec.kind} scorer from {weights[b].name}")
    manifest = {
        "model": cfg.model,
        "dataset": data.name,
        "behaviors": list(data.behaviors),
        "target": data.target,
        "scored_behaviors": list(behaviors),
        "n_users": data.n_users,
        "n_items": data.n_items,
        "protocol": cfg.protocol.as_dict(),
        "exclusion": f"protocol.mask = {cfg.protocol.mask!r}: the items `mbrec recommend` masks",
        "metrics": _final_metrics(run),
        "created": utc_now(),
        "mbrec_version": __version__,
        "torch_version": torch.__version__,
        "run": {
            "folder": str(run.resolve()),
            "config": cfg.to_dict(),
            "config_sha256": fp["config_sha256"],
            "data_fingerprint": fp["data"],
            "checkpoints": {w.name: sha256_file(w) for w in sorted(set(weights.values()))},
        },
        "scorers": scorer_info,
    }
    return write_artifact(out, manifest, user_ids=data.user_ids, item_ids=data.item_ids,
                          popularity=popularity(data), exclude=exclusions(data, cfg.protocol, behaviors),
                          scorers=scorers)
