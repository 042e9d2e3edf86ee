"""Recompute the size, SHA-256 and git blob SHA-1 of every file of the fetchable catalog entries
from a datasets folder, and write them into ``src/mbrec/data/catalog.yaml``.

    python scripts/catalog_checksums.py [DATASETS_DIR]          # rewrite the catalog's checksums
    python scripts/catalog_checksums.py [DATASETS_DIR] --check  # exit 1 if a stored value differs

``DATASETS_DIR`` defaults to ``$MBREC_DATASETS``, else ``../shared/datasets`` beside the checkout.
Derived pickles (recipe ``pairs_text_to_csr_pickle``) also get ``content_sha256``, the hash of
the matrix itself (``mbrec.data.fetch.csr_content_sha256``), which does not depend on the numpy
or scipy version that pickled it. Only run it on files you trust: it unpickles those.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mbrec.data.catalog import CATALOG_PATH, git_blob_sha1, sha256_file
from mbrec.data.fetch import csr_content_sha256

FIELDS = ("size", "sha256", "git_blob", "content_sha256")


def default_datasets_dir() -> Path:
    env = os.environ.get("MBREC_DATASETS")
    return Path(env) if env else ROOT.parent / "shared" / "datasets"


def file_sums(path: Path, source: dict[str, Any]) -> dict[str, Any]:
    """The stored fields of one file."""
    sums: dict[str, Any] = {"size": path.stat().st_size, "sha256": sha256_file(path), "git_blob": git_blob_sha1(path)}
    if source.get("kind") == "derive" and source.get("recipe") == "pairs_text_to_csr_pickle":
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sums["content_sha256"] = csr_content_sha256(pickle.load(fh))
    return sums


def with_sums(entry: dict[str, Any], sums: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with the fields of ``sums`` placed right after ``name``."""
    out: dict[str, Any] = {"name": entry["name"]}
    out.update(sums)
    out.update({k: v for k, v in entry.items() if k not in out and k not in FIELDS})
    return out


def update(catalog: dict[str, Any], datasets_dir: Path) -> list[str]:
    """Fill in the sums in place; returns one line per changed or missing value."""
    changes: list[str] = []
    for name, ds in catalog["datasets"].items():
        if not ds.get("fetchable"):
            continue
        for i, entry in enumerate(ds["files"]):
            path = datasets_dir / name / entry["name"]
            if not path.is_file():
                changes.append(f"{name}/{entry['name']}: missing in {datasets_dir}")
                continue
            sums = file_sums(path, entry["source"])
            for key, value in sums.items():
                if entry.get(key) != value:
                    changes.append(f"{name}/{entry['name']}: {key} {entry.get(key)} -> {value}")
            ds["files"][i] = with_sums(entry, sums)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets_dir", nargs="?", type=Path, default=None)
    parser.add_argument("--catalog", type=Path, default=CATALOG_PATH)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on any difference")
    args = parser.parse_args(argv)
    datasets_dir = args.datasets_dir or default_datasets_dir()
    if not datasets_dir.is_dir():
        print(f"catalog_checksums: no datasets folder at {datasets_dir}", file=sys.stderr)
        return 2
    catalog = yaml.safe_load(args.catalog.read_text(encoding="utf-8"))
    changes = update(catalog, datasets_dir)
    for line in changes:
        print(line)
    if args.check:
        print("up to date" if not changes else f"{len(changes)} difference(s)")
        return 1 if changes else 0
    if any("missing in" in c for c in changes):
        print("not written: some files are missing", file=sys.stderr)
        return 1
    args.catalog.write_text(
        yaml.safe_dump(catalog, sort_keys=False, allow_unicode=True, width=110, default_flow_style=False),
        encoding="utf-8",
    )
    print(f"wrote {args.catalog} ({len(changes)} value(s) changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
