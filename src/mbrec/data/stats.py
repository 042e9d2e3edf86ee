"""Dataset diagnostics: sizes, densities, behavior alignment (BAR), direct-target share (DT),
and behavior-combination patterns over user-item pairs (COPF Fig. 6).

* ``BAR(b) = |R_b ∩ R_target| / |R_target|`` and ``DT`` = share of target pairs with no pair of
  any auxiliary behavior (RMBRec Table 1). Reported twice: over training target pairs
  (``train``) and over all target pairs, train + valid + test (``all``, RMBRec's convention).
  ``R_b`` is b's **training** graph (what a model sees; the CRGCN and HKUDS lineages never
  split auxiliary behaviors, and for JD this reproduces the README reference values).
* Patterns: each user-item pair that occurs under any behavior gets a bit string over the
  behaviors in order (``101`` = view and buy, no cart). ``train`` uses the training matrices,
  ``all`` the union of all splits.
* Held-out cold start (``heldout``), per split and behavior: held-out rows and users, and how
  many of them are cold: the user has no training row of the target (``cold_target``) or of any
  behavior (``cold_any``), or the item has no training row of any behavior (``new_item``).
  :func:`cold_start_line` sums it up in one line (the training log prints it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from mbrec.data.container import SPLITS, MultiBehaviorData


def _binary(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m, copy=True)
    m.data[:] = 1.0
    return m


def _union_splits(data: MultiBehaviorData, b: str) -> sp.csr_matrix:
    return _binary(data.train[b] + data.valid[b] + data.test[b])


def _patterns(mats: list[sp.csr_matrix]) -> dict[str, int]:
    k = len(mats)
    code = sp.csr_matrix(mats[0].shape, dtype=np.float64)
    for j, m in enumerate(mats):
        code = code + _binary(m).astype(np.float64) * float(2 ** (k - 1 - j))
    values = code.data.astype(np.int64)
    values = values[values > 0]
    counts = np.bincount(values, minlength=2**k)
    return {
        format(c, f"0{k}b"): int(n)
        for c, n in sorted(enumerate(counts.tolist()), key=lambda t: -t[1])
        if n > 0
    }


def _alignment(target: sp.csr_matrix, aux: dict[str, sp.csr_matrix]) -> tuple[dict[str, float], float]:
    n = target.nnz
    bar = {b: float(target.multiply(m).nnz / n) if n else 0.0 for b, m in aux.items()}
    if not aux or n == 0:
        return bar, 1.0 if n else 0.0
    any_aux = _binary(sum(aux.values()))  # type: ignore[arg-type]
    dt = float((n - target.multiply(any_aux).nnz) / n)
    return bar, dt


def training_bar(data: MultiBehaviorData, behaviors: tuple[str, ...] | list[str] | None = None) -> dict[str, float]:
    """``BAR(b)`` over the **training** target pairs for each auxiliary behavior in ``behaviors``
    (default: all), from ``data.train`` only (what a model sees; no held-out pair is read)."""
    names = [b for b in (data.auxiliary if behaviors is None else behaviors) if b != data.target]
    return _alignment(_binary(data.train[data.target]), {b: _binary(data.train[b]) for b in names})[0]


def item_counts(data: MultiBehaviorData, behavior: str) -> np.ndarray:
    """Training pairs per item of ``behavior`` (``[n_items]``, int64; stored zeros not counted):
    the popularity that the most-popular baseline (:mod:`mbrec.baselines`) and the serving
    fallback (:func:`mbrec.serving.export.popularity`) rank by."""
    m = data.train[behavior]
    return np.bincount(m.indices[m.data != 0], minlength=data.n_items).astype(np.int64)


def _has_rows(m: sp.csr_matrix) -> np.ndarray:
    return np.diff(m.indptr) > 0


def heldout_stats(data: MultiBehaviorData) -> dict[str, dict[str, dict[str, int]]]:
    """``{split: {behavior: counts}}`` for valid and test, behaviors with held-out rows only.

    Counts: ``rows``, ``users``; ``cold_target_rows``/``_users`` (user without a training row of
    the target), ``cold_any_rows``/``_users`` (user without any training row), ``new_item_rows``
    and ``new_items`` (item without any training row).
    """
    union = data.train_union()
    warm_t = _has_rows(data.train[data.target])
    warm_any = _has_rows(union)
    item_warm = np.bincount(union.indices, minlength=data.n_items) > 0
    out: dict[str, dict[str, dict[str, int]]] = {}
    for split in ("valid", "test"):
        per: dict[str, dict[str, int]] = {}
        for b in data.behaviors:
            m = data.split(split)[b]
            if m.nnz == 0:
                continue
            n_rows = np.diff(m.indptr)
            users = n_rows > 0
            new = ~item_warm[m.indices]
            per[b] = {
                "rows": int(m.nnz), "users": int(users.sum()),
                "cold_target_rows": int(n_rows[~warm_t].sum()),
                "cold_target_users": int((users & ~warm_t).sum()),
                "cold_any_rows": int(n_rows[~warm_any].sum()),
                "cold_any_users": int((users & ~warm_any).sum()),
                "new_item_rows": int(new.sum()),
                "new_items": len(np.unique(m.indices[new])),
            }
        out[split] = per
    return out


def cold_start_line(data: MultiBehaviorData) -> str:
    """One line on the target's held-out users and items that have no training rows."""
    t = data.target
    held = heldout_stats(data)
    parts = []
    for split, per in held.items():
        c = per.get(t)
        if c is None:
            continue
        parts.append(
            f"{split} {c['cold_target_rows']:,} of {c['rows']:,} rows ({c['cold_target_users']:,} of "
            f"{c['users']:,} users) have no training {t!r} row, {c['cold_any_rows']:,} rows "
            f"({c['cold_any_users']:,} users) no training row at all; {c['new_item_rows']:,} rows name "
            f"an item with no training row ({c['new_items']:,} items)"
        )
    if not parts:
        return f"held-out cold start: no held-out {t!r} rows"
    return "held-out cold start: " + "; ".join(parts) + (
        " (cold users are scored like everyone, with nothing to mask)"
        if any(c.get(t, {}).get("cold_any_users") for c in held.values()) else "")


def compute_stats(data: MultiBehaviorData) -> dict[str, Any]:
    """All diagnostics as a JSON-ready dict (see the module docstring)."""
    cells = data.n_users * data.n_items
    beh: dict[str, Any] = {}
    for b in data.behaviors:
        c = {s: int(data.split(s)[b].nnz) for s in SPLITS}
        users = int((np.diff(data.train[b].indptr) > 0).sum())
        beh[b] = {**c, "density": c["train"] / cells, "users_with_train": users}
    t = data.target
    aux_all = {b: _binary(data.train[b]) for b in data.auxiliary}
    bar_train, dt_train = _alignment(_binary(data.train[t]), aux_all)
    bar_all, dt_all = _alignment(_union_splits(data, t), aux_all)
    return {
        "name": data.name,
        "users": data.n_users,
        "items": data.n_items,
        "behaviors": list(data.behaviors),
        "target": t,
        "counts": beh,
        "bar": {"train": bar_train, "all": bar_all},
        "dt": {"train": dt_train, "all": dt_all},
        "patterns": {
            "order": " ".join(data.behaviors),
            "train": _patterns([data.train[b] for b in data.behaviors]),
            "all": _patterns([_union_splits(data, b) for b in data.behaviors]),
        },
        "heldout": heldout_stats(data),
        "description": data.description,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """A readable multi-line table of :func:`compute_stats` output."""
    lines = [
        f"dataset {stats['name']}: {stats['users']:,} users x {stats['items']:,} items; "
        f"target {stats['target']!r}",
        "",
        f"{'behavior':<12}{'train':>12}{'valid':>10}{'test':>10}{'density':>11}{'users':>9}",
    ]
    for b, c in stats["counts"].items():
        lines.append(
            f"{b:<12}{c['train']:>12,}{c['valid']:>10,}{c['test']:>10,}"
            f"{c['density']:>11.2e}{c['users_with_train']:>9,}"
        )
    lines += ["", f"{'alignment':<22}{'train target':>14}{'all target':>12}"]
    for b in stats["bar"]["all"]:
        lines.append(
            f"{'BAR(' + b + ')':<22}{stats['bar']['train'][b]:>14.4f}{stats['bar']['all'][b]:>12.4f}"
        )
    lines.append(f"{'DT':<22}{stats['dt']['train']:>14.4f}{stats['dt']['all']:>12.4f}")
    pt, pa = stats["patterns"]["train"], stats["patterns"]["all"]
    nt, na = max(1, sum(pt.values())), max(1, sum(pa.values()))
    lines += ["", f"patterns over user-item pairs (bits: {stats['patterns']['order']})",
              f"{'pattern':<10}{'train pairs':>14}{'share':>8}{'all pairs':>14}{'share':>8}"]
    for p in sorted(set(pt) | set(pa), key=lambda p: -pa.get(p, 0)):
        lines.append(
            f"{p:<10}{pt.get(p, 0):>14,}{pt.get(p, 0) / nt:>8.2%}{pa.get(p, 0):>14,}{pa.get(p, 0) / na:>8.2%}"
        )
    lines += _format_heldout(stats)
    if stats.get("description"):
        lines += ["", "notes: " + stats["description"]]
    return "\n".join(lines)


def _format_heldout(stats: dict[str, Any]) -> list[str]:
    """The held-out cold-start table of :func:`format_stats`."""
    held = stats.get("heldout") or {}
    if not any(held.values()):
        return []
    t = stats["target"]
    title = (f"held-out rows and cold start (cold: the user has no training {t!r} row / no training "
             "row at all; new: the item has no training row)")
    header = (f"{'split':<7}{'behavior':<12}{'rows':>10}{'users':>9}{'cold rows':>11}{'users':>8}"
              f"{'no-train rows':>15}{'users':>8}{'new-item rows':>15}{'items':>8}")
    lines = ["", title, header]
    for split, per in held.items():
        for b, c in per.items():
            lines.append(
                f"{split:<7}{b:<12}{c['rows']:>10,}{c['users']:>9,}{c['cold_target_rows']:>11,}"
                f"{c['cold_target_users']:>8,}{c['cold_any_rows']:>15,}{c['cold_any_users']:>8,}"
                f"{c['new_item_rows']:>15,}{c['new_items']:>8,}"
            )
    aux = sorted({b for per in held.values() for b in per if b != t})
    if aux:
        lines.append(f"held-out rows of {', '.join(aux)} are evaluated only by protocols with tasks=all "
                     "(mmr); they are never training pairs")
    return lines
