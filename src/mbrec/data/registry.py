"""Resolve a dataset spec (built-in name, directory, or folder under the datasets root) and load it.

``load_dataset(spec, seed=0, **options)``:

* ``spec``: ``synthetic`` / ``synthetic-large`` (built-in generators), a directory, or a folder
  name under :func:`datasets_root` (``crgcn-beibei``, ``mule-taobao/pkef_pickles``...).
* ``options``: layout-specific (see ``docs/data.md``) plus, for every layout:
  ``behaviors`` (keep only these, target last) and ``carve_valid`` (carve a validation split
  with :func:`mbrec.data.split.carve_validation` when the layout has none). Unknown names are an
  error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mbrec.data.container import MultiBehaviorData
from mbrec.data.formats import crgcn_text, generic, pickles, split_files
from mbrec.data.io import as_bool, suggest
from mbrec.errors import DataError, UnknownNameError

# Order matters: the first layout whose files are present wins.
LAYOUTS: dict[str, Any] = {
    "generic": generic,
    "hkuds-pickle": pickles,
    "split-files": split_files,
    "crgcn-text": crgcn_text,
}
COMMON_OPTIONS = ("behaviors", "carve_valid")


def builtin_names() -> list[str]:
    from mbrec.data.synthetic import BUILTINS

    return sorted(BUILTINS)


def datasets_root() -> Path:
    """``$MBREC_DATASETS``, else ``../shared/datasets`` from the cwd, else next to the checkout."""
    env = os.environ.get("MBREC_DATASETS")
    if env:
        return Path(env).expanduser()
    cwd = Path.cwd().parent / "shared" / "datasets"
    if cwd.is_dir():
        return cwd
    return Path(__file__).resolve().parents[3].parent / "shared" / "datasets"


def detect_layout(path: str | Path) -> str:
    """Name of the layout whose files are present in ``path`` (a :class:`DataError` if none)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError("not a directory", path=path)
    files = {p.name for p in path.iterdir() if p.is_file()}
    for name, mod in LAYOUTS.items():
        if mod.matches(files):
            return name
    shown = sorted(files)[:20]
    raise DataError(
        "no known dataset layout here. Found files: "
        f"{shown}{' ...' if len(files) > 20 else ''}. Expected one of: generic "
        "(interactions.csv|tsv|parquet + dataset.yaml), CRGCN text (buy.txt or train.txt, "
        "test.txt, optional count.txt/validation.txt/view.txt/cart.txt), HKUDS pickles "
        "(trn_buy, trn_*, tst_int), per-behavior split files ({behavior}_{train,valid,test})",
        path=path,
    )


def _resolve(spec: str | Path) -> Path:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    root = datasets_root()
    if not p.is_absolute() and (root / p).is_dir():
        return root / p
    if p.exists():
        raise DataError("not a directory", path=p)
    known = builtin_names()
    if root.is_dir():
        known += sorted(q.name for q in root.iterdir() if q.is_dir())
    raise UnknownNameError(
        f"unknown dataset {str(spec)!r}{suggest(str(spec), known)}: not a built-in name, a "
        f"directory, or a folder under {root}. Known: {known}"
    )


def load_dataset(spec: str | Path, *, seed: int = 0, **options: Any) -> MultiBehaviorData:
    """Load ``spec`` into a validated :class:`MultiBehaviorData` (see the module docstring)."""
    common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
    if isinstance(spec, str) and spec in builtin_names():
        from mbrec.data.synthetic import load_builtin

        data = load_builtin(spec, seed=seed, **options)
    else:
        path = _resolve(spec)
        layout = detect_layout(path)
        root = datasets_root()
        try:
            name = str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            name = path.resolve().name
        data = LAYOUTS[layout].load(path, name=name, seed=seed, **options)
    if as_bool(common.get("carve_valid", False), "carve_valid"):
        from mbrec.data.split import carve_validation

        data = carve_validation(data, seed)
    if "behaviors" in common:
        bs = common["behaviors"]
        if isinstance(bs, str):
            bs = [b.strip() for b in bs.split(",") if b.strip()]
        for b in bs:
            if b not in data.behaviors:
                raise DataError(
                    f"option 'behaviors' names unknown behavior {b!r}"
                    f"{suggest(b, data.behaviors)}; this dataset has {list(data.behaviors)}"
                )
        data = data.select_behaviors(list(bs))
    return data
