"""Public-dataset subcommands: ``mbrec datasets`` (the catalog) and ``mbrec fetch`` (download + verify)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mbrec.data.catalog import Catalog, Dataset, dataset_record, format_counts, load_catalog, local_status, source_urls
from mbrec.data.fetch import MIRROR_ENV, FetchOptions, default_root, fetch_dataset, human_size, verify_dataset


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("datasets", help="the public multi-behavior datasets: sources, licenses, checksums, counts, "
                                        "papers, and whether each is present locally")
    p.add_argument("name", nargs="?", help="show one dataset in full (files, checksums, sources)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dir", metavar="DIR",
                   help="folder to look for local copies (default: $MBREC_DATASETS, else ../shared/datasets)")
    p.add_argument("--verify", action="store_true", help="check local files' SHA-256, not only their sizes")
    p.add_argument("--catalog", metavar="FILE", help="another catalog YAML in the same format")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("fetch", help="download a public dataset, verify its checksums, lay it out for the loaders")
    p.add_argument("name", help="catalog name (see `mbrec datasets`)")
    p.add_argument("dir", nargs="?", metavar="DIR",
                   help="datasets folder; the files go to DIR/NAME (default: $MBREC_DATASETS, else ./datasets)")
    p.add_argument("--base-url", metavar="URL", default=None,
                   help=f"mirror laid out as DATASET/FILE (http(s):// or file://) instead of the upstream "
                        f"sources (default: ${MIRROR_ENV})")
    p.add_argument("--verify-only", action="store_true", help="only check the files already in DIR/NAME")
    p.add_argument("--keep-archives", action="store_true",
                   help="keep downloaded zip/rar archives in DIR/NAME/.download")
    p.add_argument("--quiet", action="store_true", help="no per-file lines and no progress bar")
    p.add_argument("--catalog", metavar="FILE", help="another catalog YAML in the same format")
    p.set_defaults(func=cmd_fetch)


def _catalog(args: argparse.Namespace) -> Catalog:
    return load_catalog(getattr(args, "catalog", None))


def _local_root(args: argparse.Namespace) -> Path:
    if getattr(args, "dir", None):
        return Path(args.dir)
    from mbrec.data.registry import datasets_root

    return datasets_root()


def cmd_datasets(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    root = _local_root(args)
    names = [catalog.get(args.name).name] if getattr(args, "name", None) else list(catalog.datasets)
    verify = bool(getattr(args, "verify", False))
    if getattr(args, "json", False):
        out = {"catalog": str(catalog.path), "local_root": str(root),
               "datasets": [dataset_record(catalog.get(n), root, verify) for n in names]}
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    if getattr(args, "name", None):
        print(format_one(catalog.get(args.name), root, verify))
        return 0
    print(format_table(catalog, root, verify))
    return 0


def format_table(catalog: Catalog, root: Path, verify: bool = False) -> str:
    """The overview of every catalog entry (one block each) under a summary table."""
    rows = [("name", "fetch", "users x items", "size", "local")]
    for ds in catalog.datasets.values():
        c = ds.counts
        shape = f"{c['users']:,} x {c['items']:,}" if "users" in c and "items" in c else "?"
        rows.append((ds.name, "yes" if ds.fetchable else "no", shape,
                     human_size(ds.total_size) if ds.files else "-", local_status(ds, root, verify).describe()))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"Public multi-behavior datasets (local folder: {root})", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    hint = "`mbrec fetch NAME [DIR]` downloads a fetchable one; `mbrec datasets NAME` lists its files and checksums."
    lines += ["", hint, ""]
    for ds in catalog.datasets.values():
        lines += _block(ds)
    return "\n".join(lines).rstrip()


def _block(ds: Dataset) -> list[str]:
    lines = [f"{ds.name}: {ds.title}",
             f"  counts:  {format_counts(ds.counts)}" + (f"  ({ds.counts['note']})" if ds.counts.get("note") else ""),
             f"  papers:  {', '.join(ds.papers) or '-'}",
             f"  sources: {', '.join(source_urls(ds)) or '-'}",
             f"  license: {ds.license}"]
    if ds.missing:
        lines.append(f"  missing: {ds.missing}")
    lines.append("")
    return lines


def format_one(ds: Dataset, root: Path, verify: bool = False) -> str:
    """Everything about one entry: description, counts, sources, license, files with checksums."""
    status = local_status(ds, root, verify)
    lines = _block(ds)[:1] + [f"  {ds.description}", ""] + _block(ds)[1:-1]
    lines.append(f"  fetch:   {'yes' if ds.fetchable else 'no'}" + (f" (layout {ds.layout})" if ds.layout else ""))
    lines.append(f"  local:   {status.describe()}")
    if ds.files:
        lines += ["", f"  files ({len(ds.files)}, {human_size(ds.total_size)}):"]
        for f in ds.files:
            lines.append(f"    {f.name}  {f.size if f.size is not None else '?'} bytes  sha256 {f.sha256 or '?'}")
            lines.append(f"      source: {f.source.describe()}" + (f" ({f.source.url})" if f.source.url else ""))
            if f.note:
                lines.append(f"      note: {f.note}")
    return "\n".join(lines)


def cmd_fetch(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    root = Path(args.dir) if getattr(args, "dir", None) else default_root()
    quiet = bool(getattr(args, "quiet", False))
    if getattr(args, "verify_only", False):
        names = verify_dataset(args.name, root, catalog=catalog)
        print(f"{root / args.name}: all {len(names)} files verified")
        return 0
    base_url = getattr(args, "base_url", None) or os.environ.get(MIRROR_ENV) or None
    options = FetchOptions(base_url=base_url, progress=not quiet and sys.stderr.isatty(),
                           keep_archives=bool(getattr(args, "keep_archives", False)),
                           log=(lambda msg: None) if quiet else (lambda msg: print(msg, flush=True)))
    ds = catalog.get(args.name)
    if not quiet and ds.fetchable:
        print(f"fetching {ds.name} ({len(ds.files)} files, {human_size(ds.total_size)}) into {root / ds.name}"
              + (f" from mirror {base_url}" if base_url else ""), flush=True)
    report = fetch_dataset(args.name, root, catalog=catalog, options=options)
    skipped = report.count("already verified")
    print(f"{report.folder}: {len(ds.files)} files verified ({skipped} already there). "
          f"Load it with `mbrec stats {report.folder}`")
    return 0
