"""The serving artifact: what ``mbrec export`` writes and ``mbrec serve`` loads.

Layout (contract, ``format_version`` 1)::

    OUT_DIR/manifest.json      model, dataset, behaviors, target, protocol, metrics, created,
                               mbrec version, the scorer of each behavior, and the SHA-256 of
                               every other file
    OUT_DIR/users.npy          user ids (the dataset's own strings); row k = user index k
    OUT_DIR/items.npy          item ids, likewise
    OUT_DIR/popularity.npy     int64 [n_behaviors, n_items]: training interactions per item,
                               rows in the manifest's ``behaviors`` order
    OUT_DIR/arrays/<h>.npy     every other array, named by the first 16 hex digits of its
                               SHA-256 (an array used twice is stored once): the scorers' user
                               and item representations, the exclusion lists (CSR ``indptr`` /
                               ``indices`` per behavior: the protocol's mask)

Every array is a plain ``.npy`` read with ``allow_pickle=False``; loading needs numpy only
(no torch, no model code, no dataset). :func:`load_artifact` refuses a folder whose manifest
is missing or damaged, whose files do not match their checksums, or whose arrays have the
wrong shape, type or non-finite values, with an :class:`ArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

from mbrec.errors import MbrecError

FORMAT = "mbrec-serving-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the arrays each scorer kind holds (see :mod:`mbrec.serving.scorers`)
SCORER_ARRAYS: dict[str, tuple[str, ...]] = {
    "dot": ("user", "item"),
    "gated": ("gate_user", "gate_item", "gate_w_user", "gate_w_item", "gate_b", "expert_user", "expert_item"),
    "dense": ("scores",),
}
_REQUIRED = ("format", "format_version", "model", "dataset", "behaviors", "target", "scored_behaviors",
             "n_users", "n_items", "users", "items", "popularity", "exclude", "scorers", "files")


class ArtifactError(MbrecError):
    """A serving artifact that cannot be written or loaded (missing, damaged, inconsistent)."""


@dataclass(frozen=True)
class ScorerSpec:
    """What one behavior's scorer needs: ``kind`` (``dot``, ``gated``, ``dense``), its named
    arrays (user-indexed arrays first dimension ``n_users``, item-indexed ``n_items``) and
    scalar ``params`` (``scale`` for ``gated``)."""

    kind: str
    arrays: Mapping[str, np.ndarray]
    params: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Artifact:
    """A loaded artifact: every array in memory, the manifest as read, and its id (the first 16
    hex digits of the manifest's SHA-256: two loads of one artifact have the same id)."""

    path: Path
    manifest: dict[str, Any]
    artifact_id: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    popularity: dict[str, np.ndarray]
    exclude: dict[str, sp.csr_matrix | None]
    scorers: dict[str, ScorerSpec]


# ----------------------------------------------------------------------------- writing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class _Writer:
    """Writes arrays into a folder, each once (by content), recording their checksums."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, str] = {}

    def put(self, arr: np.ndarray, name: str | None = None) -> str:
        """Store ``arr`` as ``name`` or ``arrays/<hash>.npy``; returns its relative path."""
        data = _npy_bytes(arr)
        digest = sha256_bytes(data)
        rel = name or f"arrays/{digest[:16]}.npy"
        if rel not in self.files:
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)
            self.files[rel] = digest
        return rel


def write_artifact(
    out_dir: str | Path,
    manifest: dict[str, Any],
    *,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    popularity: np.ndarray,
    exclude: Mapping[str, sp.csr_matrix | None],
    scorers: Mapping[str, ScorerSpec],
) -> Path:
    """Write an artifact into ``out_dir`` (which must not exist, or be an empty folder).

    ``manifest`` holds the descriptive keys (model, dataset, behaviors, ...); this adds the
    format, the file references and the checksums. The folder is written beside its final
    name and renamed into place, so a reader never sees half an artifact."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out} already exists and is not an empty folder; export into a new folder "
                            "(artifacts are never overwritten in place)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create the folder {out.parent} for {out}: {e.strerror or e}") from None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        w = _Writer(tmp)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
               "users": w.put(np.asarray(user_ids).astype(str), "users.npy"),
               "items": w.put(np.asarray(item_ids).astype(str), "items.npy"),
               "popularity": w.put(np.asarray(popularity, dtype=np.int64), "popularity.npy")}
        doc["exclude"] = {b: None if m is None else {"indptr": w.put(m.indptr.astype(np.int64)),
                                                      "indices": w.put(m.indices.astype(np.int32))}
                          for b, m in exclude.items()}
        doc["scorers"] = {b: {**(doc.get("scorers") or {}).get(b, {}), "kind": s.kind,
                              "params": {k: float(v) for k, v in s.params.items()},
                              "arrays": {k: w.put(v) for k, v in s.arrays.items()}}
                          for b, s in scorers.items()}
        doc["files"] = dict(sorted(w.files.items()))
        (tmp / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the artifact in ``path``, checked for format and required keys."""
    root = Path(path)
    f = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a serving artifact (no such folder)")
    if not f.is_file():
        raise ArtifactError(f"{root} is not a serving artifact (no {MANIFEST}); create one with `mbrec export`")
    try:
        doc = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{f} is damaged (not JSON: {e}); export the run again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(f"{f} is not an mbrec serving manifest (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{f} has format_version {version!r}; this mbrec reads versions up to {FORMAT_VERSION}: "
                            "upgrade mbrec or export the run with this version")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ArtifactError(f"{f} lacks {', '.join(missing)}: damaged or edited; export the run again")
    return doc


def _safe_rel(root: Path, rel: Any) -> Path:
    """``root/rel`` for a relative path that stays inside ``root``."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{root / MANIFEST} names a file {rel!r}, not a relative path")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ArtifactError(f"{root / MANIFEST} names the file {rel!r} outside the artifact")
    return root / p


class _Reader:
    """Reads the manifest's files, each verified against its checksum once."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root, self.files = root, files
        self.cache: dict[str, np.ndarray] = {}

    def verify_all(self) -> None:
        for rel in self.files:
            self.get(rel)

    def get(self, rel: Any) -> np.ndarray:
        if rel in self.cache:
            return self.cache[rel]
        path = _safe_rel(self.root, rel)
        if rel not in self.files:
            raise ArtifactError(f"{self.root / MANIFEST} uses {rel} but records no checksum for it")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the artifact is incomplete (export the run again)")
        data = path.read_bytes()
        if sha256_bytes(data) != self.files[rel]:
            raise ArtifactError(f"{path} does not match its SHA-256 in {MANIFEST}: the file was changed or damaged")
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ArtifactError(f"{path} is not a numpy array file ({e})") from None
        self.cache[rel] = arr
        return arr


def _check(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ArtifactError(f"{path}: {what}; export the run again")


def _check_ids(arr: np.ndarray, n: int, path: Path, what: str) -> np.ndarray:
    _check(arr.ndim == 1 and arr.dtype.kind == "U", path, f"{what} must be a 1-D array of strings, got {arr.dtype} {arr.shape}")
    _check(len(arr) == n, path, f"{len(arr):,} {what} where the manifest says {n:,}")
    return arr


def _load_csr(reader: _Reader, ref: Any, n_users: int, n_items: int, where: Path) -> sp.csr_matrix:
    _check(isinstance(ref, dict) and {"indptr", "indices"} <= set(ref), where, f"exclusion entry {ref!r} is not {{indptr, indices}}")
    indptr, indices = reader.get(ref["indptr"]), reader.get(ref["indices"])
    ok = (indptr.ndim == 1 and indices.ndim == 1 and indptr.dtype.kind == "i" and indices.dtype.kind == "i"
          and len(indptr) == n_users + 1 and indptr[0] == 0 and indptr[-1] == len(indices)
          and bool(np.all(np.diff(indptr) >= 0)) and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < n_items)))
    _check(ok, where, "an exclusion list is not a valid CSR matrix of users x items")
    m = sp.csr_matrix((np.ones(len(indices), dtype=bool), indices, indptr), shape=(n_users, n_items))
    m.sort_indices()
    return m


def _load_scorer(reader: _Reader, behavior: str, entry: Any, n_users: int, n_items: int, where: Path) -> ScorerSpec:
    _check(isinstance(entry, dict) and entry.get("kind") in SCORER_ARRAYS, where,
           f"the scorer of {behavior!r} has kind {entry.get('kind') if isinstance(entry, dict) else entry!r}; "
           f"known: {sorted(SCORER_ARRAYS)}")
    names = SCORER_ARRAYS[entry["kind"]]
    refs = entry.get("arrays") or {}
    _check(isinstance(refs, dict) and set(names) <= set(refs), where, f"the {entry['kind']} scorer of {behavior!r} needs arrays {list(names)}")
    arrays = {k: reader.get(refs[k]) for k in names}
    for k, a in arrays.items():
        _check(a.dtype == np.float32, where, f"{behavior!r} scorer array {k} is {a.dtype}, not float32")
        _check(bool(np.isfinite(a).all()), where, f"{behavior!r} scorer array {k} holds non-finite values")
    params = entry.get("params") or {}
    _check(isinstance(params, dict) and all(isinstance(v, (int, float)) for v in params.values()), where,
           f"{behavior!r} scorer params {params!r} are not numbers")
    _check_scorer_shapes(entry["kind"], arrays, n_users, n_items, where, behavior)
    if entry["kind"] == "gated":
        _check("scale" in params, where, f"the gated scorer of {behavior!r} lacks params.scale")
    return ScorerSpec(entry["kind"], arrays, {k: float(v) for k, v in params.items()})


def _check_scorer_shapes(kind: str, a: Mapping[str, np.ndarray], U: int, n_i: int, where: Path, b: str) -> None:
    if kind == "dot":
        ok = (a["user"].ndim == 2 and a["item"].ndim == 2 and a["user"].shape[0] == U and a["item"].shape[0] == n_i
              and a["user"].shape[1] == a["item"].shape[1])
        _check(ok, where, f"{b!r} dot scorer: user {a['user'].shape} and item {a['item'].shape} do not fit {U:,} users x {n_i:,} items")
    elif kind == "dense":
        _check(a["scores"].shape == (U, n_i), where, f"{b!r} dense scorer: scores {a['scores'].shape} is not ({U}, {n_i})")
    else:
        gu, gi, wu, wv, bias, eu, ei = (a[k] for k in SCORER_ARRAYS["gated"])
        d = gu.shape[1] if gu.ndim == 2 else -1
        m = bias.shape[0] if bias.ndim == 1 else -1
        ok = (gu.shape == (U, d) and gi.shape == (n_i, d) and wu.shape == (d, m) and wv.shape == (d, m)
              and eu.ndim == 3 and eu.shape[:2] == (U, m) and ei.ndim == 3 and ei.shape[:2] == (n_i, m)
              and eu.shape[2] == ei.shape[2])
        _check(ok, where, f"{b!r} gated scorer: the array shapes do not fit {U:,} users x {n_i:,} items")


def load_artifact(path: str | Path) -> Artifact:
    """Load and verify an artifact (checksums of every file, shapes, types, finiteness)."""
    root = Path(path)
    doc = read_manifest(root)
    where = root / MANIFEST
    files = doc["files"]
    _check(isinstance(files, dict) and all(isinstance(v, str) for v in files.values()), where, "files is not {path: sha256}")
    reader = _Reader(root, files)
    reader.verify_all()
    U, n_i = doc["n_users"], doc["n_items"]
    behaviors, scored = doc["behaviors"], doc["scored_behaviors"]
    _check(isinstance(U, int) and isinstance(n_i, int) and U > 0 and n_i > 0, where, "n_users and n_items must be positive")
    _check(isinstance(behaviors, list) and all(isinstance(b, str) for b in behaviors) and doc["target"] in behaviors,
           where, "behaviors must list the target")
    _check(isinstance(scored, list) and scored and set(scored) <= set(behaviors), where, "scored_behaviors must be behaviors")
    user_ids = _check_ids(reader.get(doc["users"]), U, root / doc["users"], "user ids")
    item_ids = _check_ids(reader.get(doc["items"]), n_i, root / doc["items"], "item ids")
    pop = reader.get(doc["popularity"])
    _check(pop.dtype.kind == "i" and pop.shape == (len(behaviors), n_i), root / doc["popularity"],
           f"popularity must be integer [{len(behaviors)}, {n_i}], got {pop.dtype} {pop.shape}")
    scorers = doc["scorers"]
    _check(isinstance(scorers, dict) and set(scored) <= set(scorers), where, "every scored behavior needs a scorer")
    exclude = doc["exclude"]
    _check(isinstance(exclude, dict) and set(scored) <= set(exclude), where, "every scored behavior needs an exclusion entry")
    return Artifact(
        path=root,
        manifest=doc,
        artifact_id=sha256_file(where)[:16],
        user_ids=user_ids,
        item_ids=item_ids,
        popularity={b: pop[k] for k, b in enumerate(behaviors)},
        exclude={b: None if exclude[b] is None else _load_csr(reader, exclude[b], U, n_i, where) for b in scored},
        scorers={b: _load_scorer(reader, b, scorers[b], U, n_i, where) for b in scored},
    )


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (``2025-01-31T12:00:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
