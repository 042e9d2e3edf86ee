"""The catalog of public multi-behavior datasets (``catalog.yaml`` beside this module).

Each entry says where a dataset comes from (GitHub repository, commit, path), its license note,
its counts, the papers that use it and, for the fetchable ones, every file with its size, SHA-256
and git blob SHA-1 (those of the verified offline copies; ``scripts/catalog_checksums.py``
recomputes them) and how ``mbrec fetch`` obtains it:

* ``url``: the file itself, ``https://raw.githubusercontent.com/{repo}/{commit}/{path}`` (or the
  source's own ``url:``, for a catalog of files hosted elsewhere);
* ``zip`` / ``rar``: the member ``member`` of the archive at that URL;
* ``derive``: converted by ``mbrec.data.fetch`` from another catalog file (``input``, as
  ``dataset/file``) with the named ``recipe``.

Entries with ``fetchable: false`` are listed with their sources and what is missing from the
public copies. ``load_catalog(path)`` reads another catalog in the same format (a private
mirror's, or a test's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mbrec.data.io import suggest
from mbrec.errors import ConfigError, UnknownNameError

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
SOURCE_KINDS = ("url", "zip", "rar", "derive")
RECIPES = ("csr_pickle_to_pairs_text", "pairs_text_to_csr_pickle")
RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
PAGE = "https://github.com/{repo}/tree/{commit}/{path}"
REPO_PAGE = "https://github.com/{repo}"


def raw_url(repo: str, commit: str, path: str) -> str:
    """Download URL of ``path`` in GitHub repository ``repo`` at ``commit``."""
    return RAW.format(repo=repo, commit=commit, path=path)


def page_url(repo: str, commit: str | None = None, path: str | None = None) -> str:
    """Browsable GitHub URL of a repository, or of ``path`` at ``commit``."""
    if not commit:
        return REPO_PAGE.format(repo=repo) + (f" ({path})" if path else "")
    return PAGE.format(repo=repo, commit=commit, path=path or "")


@dataclass(frozen=True)
class Source:
    """How one file is obtained (see the module docstring for the kinds)."""

    kind: str
    repo: str | None = None
    explicit_url: str | None = None
    commit: str | None = None
    path: str | None = None
    member: str | None = None
    archive_size: int | None = None
    recipe: str | None = None
    input: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str | None:
        """Upstream download URL (of the archive for ``zip``/``rar``); ``None`` for ``derive``."""
        if self.kind == "derive":
            return None
        if self.explicit_url:
            return self.explicit_url
        if not (self.repo and self.commit and self.path):
            return None
        return raw_url(self.repo, self.commit, self.path)

    def describe(self) -> str:
        """One line: where the bytes come from."""
        if self.kind == "derive":
            return f"converted from {self.input} ({self.recipe})"
        where = self.explicit_url if self.explicit_url else f"{self.repo}@{(self.commit or '')[:8]} {self.path}"
        if self.kind in ("zip", "rar"):
            return f"member {self.member} of {self.kind.upper()} archive {where}"
        return where


@dataclass(frozen=True)
class FileEntry:
    """One file of a fetchable dataset, relative to the dataset folder."""

    name: str
    size: int | None
    sha256: str | None
    source: Source
    git_blob: str | None = None
    content_sha256: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Dataset:
    """One catalog entry."""

    name: str
    title: str
    fetchable: bool
    description: str
    papers: tuple[str, ...]
    counts: dict[str, Any]
    license: str
    sources: tuple[dict[str, Any], ...]
    files: tuple[FileEntry, ...] = ()
    layout: str | None = None
    missing: str | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise UnknownNameError(f"dataset {self.name!r} has no file {name!r}{suggest(name, self.file_names())}")

    def file_names(self) -> list[str]:
        return [f.name for f in self.files]


@dataclass(frozen=True)
class Catalog:
    """All entries of one catalog file, in file order."""

    datasets: dict[str, Dataset]
    path: Path

    def get(self, name: str) -> Dataset:
        """The entry ``name``; an :class:`UnknownNameError` with a suggestion otherwise."""
        if name not in self.datasets:
            names = list(self.datasets)
            raise UnknownNameError(
                f"unknown dataset {name!r}{suggest(name, names)}; the catalog lists: {', '.join(names)} "
                "(`mbrec datasets` shows them)"
            )
        return self.datasets[name]

    def names(self, fetchable: bool | None = None) -> list[str]:
        return [n for n, d in self.datasets.items() if fetchable is None or d.fetchable == fetchable]


def _require(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ConfigError(f"catalog {where}: missing key {key!r}")
    return obj[key]


def _source(raw: dict[str, Any], where: str) -> Source:
    if not isinstance(raw, dict):
        raise ConfigError(f"catalog {where}: 'source' must be a mapping, got {raw!r}")
    kind = _require(raw, "kind", where)
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"catalog {where}: unknown source kind {kind!r}{suggest(kind, SOURCE_KINDS)}")
    known = {"kind", "url", "repo", "commit", "path", "member", "archive_size", "recipe", "input"}
    if kind == "derive":
        recipe = _require(raw, "recipe", where)
        if recipe not in RECIPES:
            raise ConfigError(f"catalog {where}: unknown recipe {recipe!r}{suggest(recipe, RECIPES)}")
        if "/" not in str(_require(raw, "input", where)):
            raise ConfigError(f"catalog {where}: 'input' must be 'dataset/file', got {raw['input']!r}")
    elif "url" not in raw:
        for key in ("repo", "commit", "path"):
            _require(raw, key, where)
    if kind in ("zip", "rar"):
        _require(raw, "member", where)
    return Source(
        kind=kind, repo=raw.get("repo"), explicit_url=raw.get("url"),
        commit=None if raw.get("commit") is None else str(raw["commit"]), path=raw.get("path"),
        member=raw.get("member"), archive_size=raw.get("archive_size"),
        recipe=raw.get("recipe"), input=raw.get("input"),
        options={k: v for k, v in raw.items() if k not in known},
    )


def _file(raw: dict[str, Any], where: str) -> FileEntry:
    name = str(_require(raw, "name", where))
    where = f"{where} file {name!r}"
    return FileEntry(
        name=name, size=raw.get("size"), sha256=raw.get("sha256"),
        source=_source(_require(raw, "source", where), where), git_blob=raw.get("git_blob"),
        content_sha256=raw.get("content_sha256"), note=raw.get("note"),
    )


def _dataset(name: str, raw: dict[str, Any]) -> Dataset:
    where = f"dataset {name!r}"
    fetchable = bool(raw.get("fetchable", False))
    files = tuple(_file(f, where) for f in raw.get("files") or [])
    if fetchable and not files:
        raise ConfigError(f"catalog {where}: a fetchable dataset needs 'files'")
    return Dataset(
        name=name, title=str(raw.get("title", name)), fetchable=fetchable,
        description=str(raw.get("description", "")), papers=tuple(raw.get("papers") or ()),
        counts=dict(raw.get("counts") or {}), license=str(raw.get("license", "not stated")),
        sources=tuple(raw.get("sources") or ()), files=files, layout=raw.get("layout"),
        missing=raw.get("missing"),
    )


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and check a catalog file (default: the packaged ``catalog.yaml``)."""
    path = Path(path) if path is not None else CATALOG_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"catalog file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"catalog {path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict):
        raise ConfigError(f"catalog {path}: expected a mapping with a 'datasets' mapping")
    return Catalog({str(n): _dataset(str(n), d or {}) for n, d in raw["datasets"].items()}, path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: str | Path, chunk: int = 1 << 20) -> str:
    """``git hash-object FILE``: SHA-1 of ``b"blob <size>\\0" + bytes`` (matches upstream blobs)."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class LocalStatus:
    """What of a dataset is present in a folder: ``present`` / ``partial`` / ``absent``
    (and, when checksums were verified, ``verified`` / ``differs``)."""

    state: str
    path: Path
    present: int
    total: int
    bad: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.state in ("present", "verified"):
            return f"{self.state} ({self.path})"
        if self.state == "absent":
            return "absent"
        if self.state == "differs":
            return f"differs: {', '.join(self.bad)} ({self.path})"
        return f"partial, {self.present}/{self.total} files ({self.path})"


def local_status(ds: Dataset, root: str | Path, verify: bool = False) -> LocalStatus:
    """Whether ``root/<name>`` holds the dataset's files (sizes; SHA-256 too with ``verify``).

    A non-fetchable entry is ``present`` when its folder exists (no file list to compare)."""
    folder = Path(root) / ds.name
    if not folder.is_dir():
        return LocalStatus("absent", folder, 0, len(ds.files))
    if not ds.files:
        return LocalStatus("present", folder, 0, 0)
    present, bad = 0, []
    for f in ds.files:
        p = folder / f.name
        if not p.is_file():
            continue
        present += 1
        if f.size is not None and p.stat().st_size != f.size or verify and f.sha256 and sha256_file(p) != f.sha256:
            bad.append(f.name)
    if bad:
        return LocalStatus("differs", folder, present, len(ds.files), tuple(bad))
    if present < len(ds.files):
        return LocalStatus("absent" if present == 0 else "partial", folder, present, len(ds.files))
    return LocalStatus("verified" if verify else "present", folder, present, len(ds.files))


def format_counts(counts: dict[str, Any]) -> str:
    """``view 2,412,586 · buy 261,144/21,716/21,716`` (train/valid/test)."""
    parts = []
    for b, c in (counts.get("behaviors") or {}).items():
        split = [c.get(s) for s in ("train", "valid", "test")]
        if split[1] is None and split[2] is None:
            parts.append(f"{b} {split[0]:,}")
        else:
            parts.append(f"{b} " + "/".join("-" if v is None else f"{v:,}" for v in split))
    return " · ".join(parts) if parts else "-"


def source_urls(ds: Dataset) -> list[str]:
    """Browsable URLs of a dataset's upstream sources, in catalog order."""
    return [page_url(s["repo"], s.get("commit"), s.get("path")) for s in ds.sources if "repo" in s]


def dataset_record(ds: Dataset, root: str | Path, verify: bool = False) -> dict[str, Any]:
    """A JSON-ready description of one entry, with its local status under ``root``."""
    status = local_status(ds, root, verify)
    return {
        "name": ds.name, "title": ds.title, "fetchable": ds.fetchable, "layout": ds.layout,
        "description": ds.description, "papers": list(ds.papers), "counts": ds.counts,
        "license": ds.license, "missing": ds.missing,
        "sources": [dict(s, url=page_url(s["repo"], s.get("commit"), s.get("path"))) for s in ds.sources],
        "files": [
            {"name": f.name, "size": f.size, "sha256": f.sha256, "git_blob": f.git_blob,
             "content_sha256": f.content_sha256, "source": f.source.describe(), "url": f.source.url,
             "note": f.note}
            for f in ds.files
        ],
        "total_size": ds.total_size,
        "local": {"state": status.state, "path": str(status.path), "files_present": status.present,
                  "files_total": status.total, "differs": list(status.bad)},
    }


def iter_inputs(ds: Dataset) -> Iterable[str]:
    """``dataset/file`` inputs that the derived files of ``ds`` need."""
    for f in ds.files:
        if f.source.kind == "derive" and f.source.input:
            yield f.source.input
