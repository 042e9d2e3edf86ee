"""Write any loaded dataset in the generic format (``mbrec convert``, ``mbrec perturb``).

Output: ``interactions.csv`` (``user,item,behavior,split``), ``users.txt`` / ``items.txt`` (the id
universe in index order, so users and items without interactions and the index order survive a
round trip) and ``dataset.yaml``. Files are written to a temporary folder beside ``out_dir`` and
renamed into place at the end: nothing appears at ``out_dir`` on failure.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mbrec.data.container import SPLITS, MultiBehaviorData
from mbrec.errors import DataError


def write_generic(data: MultiBehaviorData, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``out_dir`` in the generic format and return the path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a directory", path=out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError("output directory is not empty (use --overwrite, or overwrite=True, to replace it)",
                        path=out)
    for b in data.behaviors:
        if not any(data.split(s)[b].nnz for s in SPLITS):
            raise DataError(
                f"behavior {b!r} has no pairs in any split, which the generic format cannot "
                "represent; drop it first (data.select_behaviors / option behaviors)"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        frames = []
        for s in SPLITS:
            for b in data.behaviors:
                m = data.split(s)[b].tocoo()
                if m.nnz == 0:
                    continue
                order = np.lexsort((m.col, m.row))
                frames.append(pd.DataFrame({
                    "user": data.user_ids[m.row[order]],
                    "item": data.item_ids[m.col[order]],
                    "behavior": b,
                    "split": s,
                }))
        pd.concat(frames, ignore_index=True).to_csv(tmp / "interactions.csv", index=False)
        (tmp / "users.txt").write_text("\n".join(data.user_ids.tolist()) + "\n", encoding="utf-8")
        (tmp / "items.txt").write_text("\n".join(data.item_ids.tolist()) + "\n", encoding="utf-8")
        meta = {
            "name": data.name,
            "behaviors": list(data.behaviors),
            "target": data.target,
            "users": "users.txt",
            "items": "items.txt",
            "n_users": data.n_users,
            "n_items": data.n_items,
            "description": f"Converted by mbrec from {data.source or data.name}. {data.description}",
        }
        (tmp / "dataset.yaml").write_text(
            yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
