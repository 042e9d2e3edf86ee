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
    if stats.get("description"):
        lines += ["", "notes: " + stats["description"]]
    return "\n".join(lines)
