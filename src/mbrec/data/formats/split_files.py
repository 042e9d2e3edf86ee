"""Per-behavior split files (BVAE/BiGEL ``JD``): ``{behavior}_{train,valid,test}`` (``.txt`` optional).

Each file holds ``user item`` lines with 1-based ids; empty files are allowed. ``target`` is
renamed ``purchase``. Behaviors are ordered click, favourite, cart, purchase. The id universe is
``1..max id`` over all files. A behavior whose training file is empty (JD's ``cart``) is dropped
from the behavior list (noted in the description) unless option ``keep_empty=True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from mbrec.data.container import MultiBehaviorData
from mbrec.data.formats.common import TARGET_NAMES, assemble, order_behaviors, stage_of
from mbrec.data.io import as_bool, check_id_range, check_options, read_int_pairs
from mbrec.errors import DataError

OPTIONS = ("keep_empty",)
PATTERN = re.compile(r"^(?P<b>[A-Za-z][A-Za-z0-9]*)_(?P<s>train|valid|test)(\.txt)?$")
RENAME = {"target": "purchase"}


def matches(files: set[str]) -> bool:
    found = [PATTERN.match(f) for f in files]
    return any(m is not None and m.group("s") == "train" for m in found)


def load(path: Path, *, name: str, seed: int = 0, **options: Any) -> MultiBehaviorData:
    check_options(options, OPTIONS, "the per-behavior split-file layout")
    keep_empty = as_bool(options.get("keep_empty", False), "keep_empty")
    files: dict[tuple[str, str], Path] = {}
    for p in sorted(path.iterdir()):
        m = PATTERN.match(p.name)
        if p.is_file() and m is not None:
            b = RENAME.get(m.group("b"), m.group("b"))
            files[(b, m.group("s"))] = p
    names = sorted({b for b, _ in files})
    unknown = [b for b in names if stage_of(b) < 0]
    if unknown:
        raise DataError(
            f"unknown behavior name(s) {unknown} in split files; known: click/view, "
            "favourite/collect, cart, target/purchase/buy", path=path,
        )
    targets = [b for b in names if b in TARGET_NAMES]
    if len(targets) != 1:
        raise DataError(f"expected one target behavior (target_*), found {targets}", path=path)
    target = targets[0]
    if (target, "train") not in files:
        raise DataError("no training file for the target behavior", path=path)
    behaviors = order_behaviors([b for b in names if b != target]) + [target]
    pairs = {key: read_int_pairs(p) for key, p in files.items()}
    nonempty = [p for p in pairs.values() if len(p)]
    if not len(pairs[(target, "train")]):
        raise DataError("the target behavior has no training pairs", path=files[(target, "train")])
    n_users = int(max(p[:, 0].max() for p in nonempty))
    n_items = int(max(p[:, 1].max() for p in nonempty))
    for key, p in pairs.items():
        check_id_range(p, files[key], n_users, n_items, base=1)
    empty = np.empty((0, 2), dtype=np.int64)
    notes = []
    dropped = [b for b in behaviors if b != target and not len(pairs.get((b, "train"), empty))]
    if dropped and not keep_empty:
        behaviors = [b for b in behaviors if b not in dropped]
        notes.append(f"Dropped behavior(s) {dropped}: empty training file (keep_empty=True keeps them).")
    elif dropped:
        notes.append(f"Kept behavior(s) {dropped} with an empty training file (keep_empty=True).")
    split = {s: {b: pairs.get((b, s), empty) for b in behaviors} for s in ("train", "valid", "test")}
    desc = (
        "Per-behavior split files (BVAE/JD layout), 1-based ids kept as external ids; universe "
        f"1..max id over all files; behaviors {behaviors} ('target' read as 'purchase'); "
        "valid/test pairs for every behavior. " + " ".join(notes)
    )
    return assemble(
        name=name, behaviors=behaviors, train=split["train"], valid=split["valid"],
        test=split["test"], n_users=n_users, n_items=n_items, base=1, description=desc,
        source=path,
    )
