"""``mbrec fetch``: download a catalog dataset, verify every file's SHA-256, lay it out for the loaders.

``fetch_dataset(name, root)`` puts the files of catalog entry ``name`` into ``root/name`` (see
``mbrec.data.catalog`` for the entries and their sources):

* each file is downloaded into ``FILE.part`` and renamed into place only once its size and SHA-256
  match the catalog; an interrupted download leaves the ``.part`` file, and the next run resumes
  it with an HTTP ``Range`` request (``file://`` URLs resume by seeking);
* a download whose checksum differs is kept aside as ``FILE.bad`` and reported as an error
  (:class:`ChecksumError`); so is a file already in place that differs (it is moved to
  ``FILE.bad`` and fetched again, so nothing is lost);
* files already present and verified are skipped, so running it again is a no-op;
* ``zip`` members are read with :mod:`zipfile`; ``rar`` members need an external tool (``unrar``,
  ``unar``, ``7z`` or ``bsdtar``), since Python's standard library cannot read RAR; without one
  the archive is downloaded and the error says which members to extract where;
* ``derive`` files are converted here from another catalog file (itself fetched and verified
  first): ``csr_pickle_to_pairs_text`` (a pickled CSR matrix to sorted ``user item`` lines,
  ids + ``offset``) and ``pairs_text_to_csr_pickle`` (the reverse). A derived pickle's bytes
  depend on the numpy/scipy versions, so it is also accepted when its matrix matches the
  catalog's ``content_sha256``; the accepted checksum is recorded in ``.mbrec-fetch.json``.

``base_url`` (``--base-url`` or ``$MBREC_MIRROR``) replaces every upstream source with
``{base_url}/{dataset}/{file}``: any copy of a datasets folder served over HTTP(S) or
``file://`` is a mirror, and nothing is converted.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlparse
from urllib.request import Request, url2pathname, urlopen

import numpy as np

from mbrec import __version__
from mbrec.data.catalog import Catalog, Dataset, FileEntry, Source, load_catalog, sha256_file
from mbrec.errors import MbrecError

MIRROR_ENV = "MBREC_MIRROR"
SIDECAR = ".mbrec-fetch.json"
DOWNLOADS = ".download"
CHUNK = 1 << 16
#: external RAR extractors, tried in order: (executable, argv builder)
RAR_TOOLS: tuple[tuple[str, Callable[[str, Path, Path], list[str]]], ...] = (
    ("unrar", lambda exe, a, d: [exe, "x", "-o+", "-y", str(a), str(d) + os.sep]),
    ("unar", lambda exe, a, d: [exe, "-f", "-q", "-o", str(d), str(a)]),
    ("7z", lambda exe, a, d: [exe, "x", "-y", f"-o{d}", str(a)]),
    ("7zz", lambda exe, a, d: [exe, "x", "-y", f"-o{d}", str(a)]),
    ("bsdtar", lambda exe, a, d: [exe, "-xf", str(a), "-C", str(d)]),
)


class FetchError(MbrecError):
    """A dataset could not be fetched (network, missing tool, missing input...)."""


class ChecksumError(FetchError):
    """A file's size or SHA-256 differs from the catalog."""


def default_root() -> Path:
    """Where ``mbrec fetch`` puts datasets without ``DIR``: ``$MBREC_DATASETS``, else ``./datasets``."""
    env = os.environ.get("MBREC_DATASETS")
    return Path(env).expanduser() if env else Path("datasets")


def mirror_url(base_url: str, dataset: str, name: str) -> str:
    """URL of ``dataset/name`` on a mirror laid out like a datasets folder."""
    return f"{base_url.rstrip('/')}/{quote(dataset)}/{quote(name)}"


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# downloads


def _progress_bar(total: int | None, initial: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=label, disable=not enabled, leave=False, file=sys.stderr)


def _open_http(url: str, offset: int, timeout: float) -> tuple[Any, int, int | None]:
    """Open ``url`` from byte ``offset``: (response or ``None`` when nothing is left, the offset
    the body really starts at, the full length when known)."""
    headers = {"User-Agent": f"mbrec/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # nothing left to send: the part file is complete (or too long)
            return None, offset, None
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(
            f"cannot download {url}: {reason}. Check the network, or point --base-url (or "
            f"${MIRROR_ENV}) at a mirror"
        ) from None
    length = resp.headers.get("Content-Length")
    if offset and resp.status == 206:
        content_range = str(resp.headers.get("Content-Range", ""))  # "bytes START-END/TOTAL"
        start = content_range.split(" ")[-1].split("-")[0]
        if start != str(offset):
            resp.close()
            return _open_http(url, 0, timeout)
        full = content_range.rpartition("/")[2]
        return resp, offset, int(full) if full.isdigit() else None
    return resp, 0, int(length) if length is not None and length.isdigit() else None


def _open_file_url(url: str, offset: int) -> tuple[Any, int, int]:
    path = Path(url2pathname(urlparse(url).path))
    if not path.is_file():
        raise FetchError(f"cannot download {url}: no such file {path}")
    total = path.stat().st_size
    fh = open(path, "rb")  # noqa: SIM115 (closed by download())
    start = min(offset, total)
    fh.seek(start)
    return fh, start, total


def download(url: str, part: Path, size: int | None, *, label: str = "", progress: bool = False,
             timeout: float = 60.0) -> None:
    """Download ``url`` into ``part``, resuming from its current length (HTTP ``Range``).

    Stops early when ``part`` already has ``size`` bytes. An interrupted transfer keeps what was
    received and raises a :class:`FetchError` that says to run the command again."""
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and size > 0 and offset == size:
        return
    if urlparse(url).scheme == "file":
        resp, start, total = _open_file_url(url, offset)
    else:
        resp, start, total = _open_http(url, offset, timeout)
    if resp is None:
        return
    total = total if total is not None else size
    got = start
    try:
        with resp, open(part, "ab" if start else "wb") as out, _progress_bar(total, start, label, progress) as bar:
            while block := resp.read(CHUNK):
                out.write(block)
                got += len(block)
                bar.update(len(block))
    except (http.client.HTTPException, OSError) as e:
        raise FetchError(
            f"download of {url} interrupted after {got:,} of {total if total is not None else '?'} bytes "
            f"({type(e).__name__}); run the same command again to resume from {part}"
        ) from None
    if total is not None and got < total:
        raise FetchError(
            f"download of {url} stopped after {got:,} of {total:,} bytes; run the same command again "
            f"to resume from {part}"
        )


# ---------------------------------------------------------------------------------------------
# conversions


def csr_content_sha256(matrix: Any) -> str:
    """SHA-256 of a sparse matrix's shape and canonical CSR arrays (independent of how it was pickled)."""
    import scipy.sparse as sp

    m = sp.csr_matrix(matrix, copy=True)
    m.sum_duplicates()
    m.sort_indices()
    h = hashlib.sha256(f"csr {m.shape[0]} {m.shape[1]}\n".encode())
    for arr, dtype in ((m.indptr, "<i8"), (m.indices, "<i8"), (m.data, "<f8")):
        h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return h.hexdigest()


def _unpickle_verified(path: Path) -> Any:
    """Unpickle a file whose SHA-256 was just checked against the catalog (never anything else)."""
    with open(path, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pickle.load(fh)


def _read_pairs(path: Path) -> np.ndarray:
    import pandas as pd

    if path.stat().st_size == 0:
        return np.empty((0, 2), dtype=np.int64)
    df = pd.read_csv(path, sep=r"\s+", header=None, usecols=[0, 1], dtype=np.int64, engine="c")
    return df.to_numpy(dtype=np.int64).reshape(-1, 2)


def csr_pickle_to_pairs_text(src: Path, out: Path, *, offset: int = 0) -> None:
    """A pickled sparse matrix -> ``"user item\\n"`` lines sorted by (user, item), ids + ``offset``."""
    import pandas as pd
    import scipy.sparse as sp

    m = sp.csr_matrix(_unpickle_verified(src))
    m.eliminate_zeros()
    m.sum_duplicates()
    m.sort_indices()
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    frame = pd.DataFrame({"u": rows + offset, "i": m.indices.astype(np.int64) + offset})
    frame.to_csv(out, sep=" ", header=False, index=False, lineterminator="\n")


def pairs_text_to_csr_pickle(src: Path, out: Path, *, offset: int = 0, shape: list[int] | None = None,
                             dtype: str = "int64", protocol: int = 4) -> str:
    """``user item`` lines -> a pickled CSR matrix of ones (ids + ``offset``); returns its content SHA-256."""
    import scipy.sparse as sp

    pairs = _read_pairs(src) + offset
    if shape is None:
        shape = [int(pairs[:, 0].max()) + 1, int(pairs[:, 1].max()) + 1] if len(pairs) else [0, 0]
    m = sp.csr_matrix((np.ones(len(pairs), dtype=np.dtype(dtype)), (pairs[:, 0], pairs[:, 1])),
                      shape=tuple(shape))
    out.write_bytes(pickle.dumps(m, protocol=int(protocol)))
    return csr_content_sha256(m)


# ---------------------------------------------------------------------------------------------
# the fetcher


@dataclass
class FetchOptions:
    """How :func:`fetch_dataset` works: mirror, progress bars, archive cache, messages."""

    base_url: str | None = None
    progress: bool = False
    keep_archives: bool = False
    timeout: float = 60.0
    log: Callable[[str], None] = field(default=lambda msg: print(msg))


@dataclass
class FetchReport:
    """What happened to each file: ``(dataset/file, action)`` in order."""

    dataset: str
    folder: Path
    actions: list[tuple[str, str]] = field(default_factory=list)

    def count(self, action_prefix: str) -> int:
        return sum(1 for _, a in self.actions if a.startswith(action_prefix))


def _read_sidecar(folder: Path) -> dict[str, str]:
    try:
        return dict(json.loads((folder / SIDECAR).read_text(encoding="utf-8")).get("accepted", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _write_sidecar(folder: Path, name: str, sha256: str) -> None:
    accepted = _read_sidecar(folder)
    accepted[name] = sha256
    (folder / SIDECAR).write_text(json.dumps({"accepted": accepted}, indent=1) + "\n", encoding="utf-8")


def file_verified(folder: Path, entry: FileEntry) -> bool:
    """True when ``folder/entry.name`` exists with the catalog's size and SHA-256 (or the SHA-256
    recorded when a derived file was accepted on content)."""
    path = folder / entry.name
    if not path.is_file() or entry.sha256 is None:
        return False
    accepted = _read_sidecar(folder).get(entry.name)
    if entry.size is not None and path.stat().st_size != entry.size and accepted is None:
        return False
    digest = sha256_file(path)
    return digest == entry.sha256 or (accepted is not None and digest == accepted)


def _set_aside(path: Path) -> Path:
    """Rename ``FILE`` or ``FILE.part`` to ``FILE.bad`` (replacing an older one)."""
    stem = path.name.removesuffix(".part")
    bad = path.with_name(stem + ".bad")
    if bad.exists():
        bad.unlink()
    os.replace(path, bad)
    return bad


def _match_members(folder: Path) -> dict[str, Path]:
    """Extracted files by base name (RAR names may keep Windows ``\\`` separators)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "__MACOSX" not in p.parts:
            found.setdefault(p.name.replace("\\", "/").split("/")[-1], p)
    return found


class _Fetcher:
    """Ensures verified files under ``root``; remembers archives and failures within one run."""

    def __init__(self, catalog: Catalog, root: Path, options: FetchOptions) -> None:
        self.catalog = catalog
        self.root = root
        self.opt = options
        self.done: dict[str, str] = {}
        self.failed: dict[str, FetchError] = {}
        self.archives: dict[str, Path | FetchError] = {}
        self.extracted: dict[str, Path] = {}
        self.download_dirs: set[Path] = set()

    # -- entry points ------------------------------------------------------------------------
    def ensure_ref(self, ref: str) -> Path:
        """``dataset/file`` -> the verified file's path (fetching it first)."""
        ds_name, _, fname = ref.partition("/")
        ds = self.catalog.get(ds_name)
        entry = ds.file(fname)
        self.ensure(ds, entry)
        return self.root / ds.name / entry.name

    def ensure(self, ds: Dataset, entry: FileEntry) -> str:
        key = f"{ds.name}/{entry.name}"
        if key in self.done:
            return self.done[key]
        if key in self.failed:
            raise self.failed[key]
        try:
            action = self._ensure(ds, entry)
        except FetchError as e:
            self.failed[key] = e
            raise
        self.done[key] = action
        return action

    # -- one file ----------------------------------------------------------------------------
    def _ensure(self, ds: Dataset, entry: FileEntry) -> str:
        if not entry.sha256:
            raise FetchError(f"the catalog has no checksum for {ds.name}/{entry.name}: cannot verify it")
        folder = self.root / ds.name
        target = folder / entry.name
        if target.is_file():
            if file_verified(folder, entry):
                return "already verified"
            bad = _set_aside(target)
            self.opt.log(f"  {entry.name}: the file in place differs from the catalog; moved to {bad.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        src = entry.source
        if self.opt.base_url:
            url = mirror_url(self.opt.base_url, ds.name, entry.name)
            download(url, part, entry.size, label=entry.name, progress=self.opt.progress, timeout=self.opt.timeout)
            action = f"downloaded from {url}"
        elif src.kind == "url":
            assert src.url is not None
            download(src.url, part, entry.size, label=entry.name, progress=self.opt.progress,
                     timeout=self.opt.timeout)
            action = f"downloaded from {src.url}"
        elif src.kind in ("zip", "rar"):
            self._extract(ds, entry, part)
            action = f"extracted from {src.url}"
        else:
            content = self._derive(ds, entry, part)
            self._accept_derived(folder, entry, part, content)
            os.replace(part, target)
            return f"converted from {src.input}"
        self._check(entry, part, ds.name)
        os.replace(part, target)
        return action

    def _check(self, entry: FileEntry, part: Path, ds_name: str) -> None:
        size = part.stat().st_size
        digest = sha256_file(part)
        if digest == entry.sha256 and (entry.size is None or size == entry.size):
            return
        bad = _set_aside(part)
        raise ChecksumError(
            f"{ds_name}/{entry.name}: checksum mismatch, refused (sha256 {digest}, {size:,} bytes; the catalog "
            f"has {entry.sha256}, {entry.size if entry.size is not None else '?'} bytes). The file is kept "
            f"as {bad}; delete it, check the source or mirror, and run the command again"
        )

    def _accept_derived(self, folder: Path, entry: FileEntry, part: Path, content: str | None) -> None:
        digest = sha256_file(part)
        if digest == entry.sha256:
            return
        if content is not None and entry.content_sha256 and content == entry.content_sha256:
            _write_sidecar(folder, entry.name, digest)
            self.opt.log(f"  {entry.name}: bytes differ from the catalog copy (another numpy/scipy pickled it), "
                         "matrix identical: accepted")
            return
        self._check(entry, part, folder.name)

    # -- archives ----------------------------------------------------------------------------
    def _archive(self, ds: Dataset, src: Source) -> Path:
        url = src.url
        assert url is not None
        if url in self.archives:  # each archive is downloaded (or fails) once per run
            known = self.archives[url]
            if isinstance(known, FetchError):
                raise known
            return known
        try:
            path = self._download_archive(ds, src, url)
        except FetchError as e:
            self.archives[url] = e
            raise
        self.archives[url] = path
        return path

    def _download_archive(self, ds: Dataset, src: Source, url: str) -> Path:
        cache = self.root / ds.name / DOWNLOADS
        self.download_dirs.add(cache)
        base = Path(urlparse(url).path).name or "archive"
        name = f"{src.repo.replace('/', '_')}-{(src.commit or '')[:8]}-{base}" if src.repo else base
        final = cache / name
        if not (final.is_file() and (src.archive_size is None or final.stat().st_size == src.archive_size)):
            part = final.with_name(final.name + ".part")
            download(url, part, src.archive_size, label=base, progress=self.opt.progress,
                     timeout=self.opt.timeout)
            if src.archive_size is not None and part.stat().st_size != src.archive_size:
                bad = _set_aside(part)
                raise ChecksumError(f"archive {url} has {bad.stat().st_size:,} bytes, the catalog says "
                                    f"{src.archive_size:,}; kept as {bad}")
            os.replace(part, final)
        return final

    def _extract(self, ds: Dataset, entry: FileEntry, part: Path) -> None:
        src = entry.source
        archive = self._archive(ds, src)
        if src.kind == "zip":
            self._extract_zip(archive, src, part)
            return
        members = _match_members(self._unrar(ds, archive, src))
        if src.member not in members:
            raise FetchError(f"archive {src.url} has no member {src.member!r}; it holds {sorted(members)}")
        shutil.copyfile(members[str(src.member)], part)

    @staticmethod
    def _extract_zip(archive: Path, src: Source, part: Path) -> None:
        try:
            with zipfile.ZipFile(archive) as zf:
                names = {n.split("/")[-1]: n for n in zf.namelist()
                         if not n.endswith("/") and not n.startswith("__MACOSX/")}
                if src.member not in names:
                    raise FetchError(f"archive {src.url} has no member {src.member!r}; it holds {sorted(names)}")
                with zf.open(names[str(src.member)]) as fin, open(part, "wb") as fout:
                    shutil.copyfileobj(fin, fout, CHUNK)
        except zipfile.BadZipFile as e:
            bad = _set_aside(archive)
            raise FetchError(f"archive {src.url} is not a valid zip file ({e}); kept as {bad}") from None

    def _unrar(self, ds: Dataset, archive: Path, src: Source) -> Path:
        if str(archive) in self.extracted:
            return self.extracted[str(archive)]
        tool = next(((exe, build) for name, build in RAR_TOOLS if (exe := shutil.which(name))), None)
        if tool is None:
            rar_members = [f for f in ds.files if f.source.kind == "rar" and f.source.url == src.url]
            listing = "; ".join(f"{f.source.member} -> {self.root / ds.name / f.name} (sha256 {f.sha256})"
                                for f in rar_members)
            raise FetchError(
                f"{src.url} is a RAR archive, which Python's standard library cannot unpack, and none of "
                f"{', '.join(n for n, _ in RAR_TOOLS)} is installed. Install one (e.g. the 'unar' or "
                f"'libarchive-tools' package) and run the same command again, or extract the archive "
                f"(downloaded to {archive}) yourself and place: {listing}; the same command then verifies "
                "them. A mirror with the extracted files (--base-url) works too"
            )
        out = Path(tempfile.mkdtemp(prefix="unpack-", dir=archive.parent))
        exe, build = tool
        try:
            subprocess.run(build(exe, archive, out), check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            tail = detail.decode(errors="replace")[-300:]
            raise FetchError(f"{exe} could not unpack {archive}: {e} {tail}") from None
        self.extracted[str(archive)] = out
        return out

    # -- conversions -------------------------------------------------------------------------
    def _derive(self, ds: Dataset, entry: FileEntry, part: Path) -> str | None:
        src = entry.source
        assert src.input is not None
        try:
            inp = self.ensure_ref(src.input)
        except FetchError as e:
            raise FetchError(f"{ds.name}/{entry.name} is converted from {src.input}, which could not be "
                             f"fetched: {e}") from None
        opts = dict(src.options)
        self.opt.log(f"  {entry.name}: converting from {src.input} ({src.recipe})")
        if src.recipe == "csr_pickle_to_pairs_text":
            csr_pickle_to_pairs_text(inp, part, offset=int(opts.get("offset", 0)))
            return None
        return pairs_text_to_csr_pickle(inp, part, offset=int(opts.get("offset", 0)), shape=opts.get("shape"),
                                        dtype=str(opts.get("dtype", "int64")),
                                        protocol=int(opts.get("protocol", 4)))

    def cleanup(self) -> None:
        """Remove the downloaded archives and unpacked folders (after a complete fetch)."""
        if self.opt.keep_archives:
            return
        for d in self.download_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _not_fetchable(ds: Dataset) -> FetchError:
    where = "; ".join(f"{s.get('repo')} {s.get('path', '')}".strip() for s in ds.sources)
    return FetchError(
        f"dataset {ds.name!r} cannot be fetched: {ds.missing or 'no verified copy'} Known sources: {where}"
    )


def fetch_dataset(name: str, root: str | Path | None = None, *, catalog: Catalog | None = None,
                  options: FetchOptions | None = None) -> FetchReport:
    """Fetch and verify every file of catalog entry ``name`` into ``root/name`` (see the module
    docstring). Raises a :class:`FetchError` listing every file that failed."""
    catalog = catalog or load_catalog()
    options = options or FetchOptions(base_url=os.environ.get(MIRROR_ENV) or None)
    ds = catalog.get(name)
    if not ds.fetchable:
        raise _not_fetchable(ds)
    root = Path(root) if root is not None else default_root()
    folder = root / ds.name
    report = FetchReport(ds.name, folder)
    fetcher = _Fetcher(catalog, root, options)
    failures: list[str] = []
    for entry in ds.files:
        try:
            action = fetcher.ensure(ds, entry)
        except FetchError as e:
            failures.append(f"{entry.name}: {e}")
            report.actions.append((entry.name, "failed"))
            options.log(f"  {entry.name}: FAILED")
            continue
        report.actions.append((entry.name, action))
        options.log(f"  {entry.name} ({human_size(entry.size)}): {action}")
    extra = sorted(k for k in fetcher.done if not k.startswith(ds.name + "/"))
    for key in extra:
        report.actions.append((key, fetcher.done[key]))
    if failures:
        raise FetchError(f"{len(failures)} of {len(ds.files)} files of {ds.name} failed:\n  " + "\n  ".join(failures))
    fetcher.cleanup()
    return report


def verify_dataset(name: str, root: str | Path | None = None, *, catalog: Catalog | None = None) -> list[str]:
    """Check the files of ``root/name`` against the catalog without downloading; returns the
    verified file names and raises a :class:`FetchError` listing missing or differing files."""
    catalog = catalog or load_catalog()
    ds = catalog.get(name)
    if not ds.fetchable:
        raise _not_fetchable(ds)
    folder = (Path(root) if root is not None else default_root()) / ds.name
    problems = []
    for entry in ds.files:
        if not (folder / entry.name).is_file():
            problems.append(f"{entry.name}: missing")
        elif not file_verified(folder, entry):
            digest = sha256_file(folder / entry.name)
            problems.append(f"{entry.name}: differs (sha256 {digest}, catalog {entry.sha256})")
    if problems:
        raise ChecksumError(
            f"{folder}: {len(problems)} of {len(ds.files)} files not verified:\n  " + "\n  ".join(problems)
        )
    return [e.name for e in ds.files]
