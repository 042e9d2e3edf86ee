"""CRGCN/RMBRec text layout: one ``user item`` pair per line, 1-based ids, one file per behavior.

Files: ``{behavior}.txt`` for each behavior (``view``/``ipv``/``pv``/``click``, ``collect``,
``cart``, ``buy``), held-out purchases in ``validation.txt`` (or ``valid.txt``) and ``test.txt``,
optionally ``train.txt`` (training purchases) and ``count.txt`` (``{"user": U, "item": I}``).

* Target training pairs: ``train.txt`` when present, else ``buy.txt``. In ``crgcn-beibei``
  ``buy.txt`` = train ∪ validation; reading ``train.txt`` avoids counting validation twice.
* Id universe: ``1..count`` from ``count.txt``, else ``1..max id`` over all files. Users and
  items without interactions still exist. External ids are the file's ids (strings).
* ``valid_policy`` (when validation pairs overlap the training purchases, as in
  ``mule-taobao`` where ``valid.txt`` ⊂ ``train.txt``): ``"carve"`` (default) removes them from the
  training purchases; ``"ignore"`` drops the validation file and keeps training intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mbrec.data.formats.common import (
    KNOWN_BEHAVIORS,
    TARGET_NAMES,
    assemble,
    order_behaviors,
    pair_set_diff,
)
from mbrec.data.io import check_id_range, check_options, read_int_pairs
from mbrec.data.container import MultiBehaviorData
from mbrec.errors import DataError

RESERVED = ("train", "validation", "valid", "test", "count")
OPTIONS = ("valid_policy",)


def matches(files: set[str]) -> bool:
    stems = {f[:-4] for f in files if f.endswith(".txt")}
    has_target = bool(stems & set(TARGET_NAMES)) or "train" in stems
    return has_target and "test" in stems


def _read_count(path: Path) -> tuple[int, int]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        n_users, n_items = int(obj["user"]), int(obj["item"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"count.txt must be JSON like {{\"user\": U, \"item\": I}} ({e})", path=path,
            line=1, value=path.read_text(encoding="utf-8", errors="replace")[:80],
        ) from None
    if n_users <= 0 or n_items <= 0:
        raise DataError("counts must be positive", path=path, line=1, value=(n_users, n_items))
    return n_users, n_items


def load(path: Path, *, name: str, seed: int = 0, **options: Any) -> MultiBehaviorData:
    check_options(options, OPTIONS, "the CRGCN/RMBRec text layout")
    policy = str(options.get("valid_policy", "carve"))
    if policy not in ("carve", "ignore"):
        raise DataError("option 'valid_policy' must be 'carve' or 'ignore'", value=policy)
    files = {p.name for p in path.iterdir() if p.is_file()}
    behaviors, target, ignored = _behaviors(path, files)
    notes: list[str] = []
    raw, tfile = _read_training(path, files, behaviors, target, notes)
    vfile = next((f for f in ("validation.txt", "valid.txt") if f in files), None)
    heldout = {"test": read_int_pairs(path / "test.txt")}
    if vfile is not None:
        heldout["valid"] = read_int_pairs(path / vfile)
    n_users, n_items, universe = _universe(path, files, raw, heldout)
    for b in behaviors:
        check_id_range(raw[b], path / (tfile if b == target else f"{b}.txt"), n_users, n_items, base=1)
    for split, pairs in heldout.items():
        check_id_range(pairs, path / ("test.txt" if split == "test" else str(vfile)), n_users, n_items, base=1)
    valid: dict[str, np.ndarray] = {}
    if "valid" in heldout:
        raw[target] = _apply_valid_policy(raw[target], heldout["valid"], policy, str(vfile), target, n_items,
                                          valid, notes)
    else:
        notes.append("No validation file.")
    if ignored:
        notes.append(f"Ignored files: {ignored}.")
    desc = (
        f"CRGCN/RMBRec text layout, 1-based ids kept as external ids; universe {universe}; "
        f"behaviors {behaviors} (target {target!r}). " + " ".join(notes)
    )
    return assemble(
        name=name, behaviors=behaviors, train=raw, valid=valid,
        test={target: heldout["test"]}, n_users=n_users, n_items=n_items, base=1,
        description=desc, source=path,
    )


def _behaviors(path: Path, files: set[str]) -> tuple[list[str], str, list[str]]:
    """``(behaviors upstream first with the target last, target, files that are not read)``."""
    stems = sorted(f[:-4] for f in files if f.endswith(".txt") and not f.endswith("_dict.txt"))
    beh_stems = [s for s in stems if s in KNOWN_BEHAVIORS]
    ignored = [s + ".txt" for s in stems if s not in KNOWN_BEHAVIORS and s not in RESERVED]
    targets = [s for s in beh_stems if s in TARGET_NAMES]
    if len(targets) > 1:
        raise DataError(f"several target files {targets}; keep one", path=path)
    target = targets[0] if targets else "buy"
    return order_behaviors([s for s in beh_stems if s not in TARGET_NAMES]) + [target], target, ignored


def _read_training(path: Path, files: set[str], behaviors: list[str], target: str,
                   notes: list[str]) -> tuple[dict[str, np.ndarray], str]:
    """Training pairs per behavior, and the file the target's came from (``train.txt`` wins)."""
    raw = {b: read_int_pairs(path / f"{b}.txt") for b in behaviors[:-1]}
    if "train.txt" in files:
        tfile = "train.txt"
        if f"{target}.txt" in files:
            notes.append(
                f"Training {target} pairs read from train.txt; {target}.txt is not read "
                "(in this lineage it repeats train.txt, plus the validation pairs in CRGCN's Beibei)."
            )
    else:
        tfile = f"{target}.txt"
    raw[target] = read_int_pairs(path / tfile)
    if len(raw[target]) == 0:
        raise DataError("the target behavior has no training pairs", path=path / tfile)
    return raw, tfile


def _universe(path: Path, files: set[str], raw: dict[str, np.ndarray],
              heldout: dict[str, np.ndarray]) -> tuple[int, int, str]:
    """``(n_users, n_items, how)``: from count.txt, else the largest id in any file."""
    if "count.txt" in files:
        n_users, n_items = _read_count(path / "count.txt")
        return n_users, n_items, "1..count from count.txt"
    allp = [p for p in list(raw.values()) + list(heldout.values()) if len(p)]
    n_users = int(max(p[:, 0].max() for p in allp))
    n_items = int(max(p[:, 1].max() for p in allp))
    return n_users, n_items, "1..max id over all files (no count.txt)"


def _apply_valid_policy(train_t: np.ndarray, vp: np.ndarray, policy: str, vfile: str, target: str,
                        n_items: int, valid: dict[str, np.ndarray], notes: list[str]) -> np.ndarray:
    """The target's training pairs after ``valid_policy``; fills ``valid`` unless ignored."""
    rest, _ = pair_set_diff(train_t, vp, n_items)
    n_over = int(len(train_t) - len(rest))
    if policy == "ignore":
        notes.append(f"Validation file {vfile} ignored (valid_policy='ignore'); no validation split.")
        return train_t
    valid[target] = vp
    if not n_over:
        notes.append(f"Validation from {vfile} (disjoint from training).")
        return train_t
    notes.append(
        f"{n_over:,} training {target} pairs that are also in {vfile} were removed "
        "from training (valid_policy='carve')."
    )
    return rest
