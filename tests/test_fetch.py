"""`mbrec datasets` and `mbrec fetch`: a local HTTP server on 127.0.0.1 (with Range support) and
file:// URLs stand in for the network, with a tiny catalog; the packaged catalog is checked
against ../shared/datasets when present."""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import stat
import sys
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from mbrec.cli import fetch_cmds
from mbrec.cli.main import main as mbrec_main
from mbrec.data import fetch as fetch_mod
from mbrec.data.catalog import load_catalog, local_status, sha256_file
from mbrec.data.fetch import (
    ChecksumError,
    FetchError,
    FetchOptions,
    csr_content_sha256,
    download,
    fetch_dataset,
    verify_dataset,
)
from mbrec.data.registry import load_dataset
from mbrec.errors import UnknownNameError

SHARED_FETCHABLE = ("hkuds-beibei", "crgcn-beibei", "mule-taobao", "bvae-jd")

# --------------------------------------------------------------------------------------------
# a tiny dataset in the CRGCN text layout (1-based `user item` lines)

TINY = {
    "view.txt": b"1 1\n1 2\n1 3\n2 2\n2 4\n3 1\n3 5\n4 3\n4 4\n",
    "buy.txt": b"1 1\n1 2\n2 2\n3 1\n3 5\n4 3\n",
    "test.txt": b"1 3\n2 4\n3 2\n4 4\n",
    "count.txt": b'{"user": 4, "item": 5}',
}


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a folder with `Range: bytes=N-` support; ``server.state`` can corrupt a file,
    cut a response short, or ignore Range, and records every request."""

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        state["requests"].append((self.path, rng))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "File not found")
            return
        data = path.read_bytes()
        name = path.name
        if name in state["corrupt"]:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if rng and not state["ignore_range"]:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1)) if m else 0
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in state["truncate"]:
            state["truncate"].discard(name)  # only the first response is cut short
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(base URL, served folder, state) of a server on 127.0.0.1 with an ephemeral port."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    state: dict[str, Any] = {"requests": [], "corrupt": set(), "truncate": set(), "ignore_range": False}
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _entry(name: str, data: bytes, source: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "source": source}


def write_catalog(path: Path, datasets: dict[str, dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "datasets": datasets}, sort_keys=False), encoding="utf-8")
    return path


def tiny_catalog(tmp_path: Path, base: str = "https://example.invalid/up") -> Path:
    """Catalog with dataset ``tiny`` (url sources that must not be used when a mirror is given)."""
    files = [_entry(n, d, {"kind": "url", "url": f"{base}/{n}"}) for n, d in TINY.items()]
    return write_catalog(tmp_path / "catalog.yaml", {
        "tiny": {"title": "tiny", "fetchable": True, "layout": "crgcn-text", "license": "none stated",
                 "counts": {"users": 4, "items": 5,
                            "behaviors": {"view": {"train": 9}, "buy": {"train": 6, "test": 4}}},
                 "papers": ["none"], "sources": [{"repo": "someone/tiny", "commit": "abc", "path": "data"}],
                 "files": files},
        "gone": {"title": "gone", "fetchable": False, "missing": "the view file is not published.",
                 "sources": [{"repo": "someone/gone", "path": "data"}]},
    })


def serve_tiny(root: Path, sub: str = "tiny") -> None:
    (root / sub).mkdir(parents=True, exist_ok=True)
    for n, d in TINY.items():
        (root / sub / n).write_bytes(d)


def quiet() -> FetchOptions:
    return FetchOptions(log=lambda msg: None)


def mirror(url: str) -> FetchOptions:
    return FetchOptions(base_url=url, log=lambda msg: None)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    fetch_cmds.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# --------------------------------------------------------------------------------------------
# fetching


def test_fetch_from_mirror_verifies_and_loads(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, state = server
    serve_tiny(served)
    cat = load_catalog(tiny_catalog(tmp_path))
    report = fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=mirror(url))
    folder = tmp_path / "out" / "tiny"
    assert report.folder == folder
    assert {n: (folder / n).read_bytes() for n in TINY} == TINY
    assert not list(folder.glob("*.part")) and not list(folder.glob("*.bad"))
    assert all(a.startswith("downloaded from " + url) for _, a in report.actions)
    assert sorted(p for p, _ in state["requests"]) == sorted(f"/tiny/{n}" for n in TINY)
    data = load_dataset(folder)  # laid out as the loader expects
    assert (data.n_users, data.n_items) == (4, 5)
    assert data.counts()["train"] == {"view": 9, "buy": 6}
    assert local_status(cat.get("tiny"), tmp_path / "out", verify=True).state == "verified"


def test_rerun_is_idempotent_and_offline(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, state = server
    serve_tiny(served)
    cat = load_catalog(tiny_catalog(tmp_path))
    fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=mirror(url))
    state["requests"].clear()
    report = fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=mirror(url))
    assert [a for _, a in report.actions] == ["already verified"] * len(TINY)
    assert state["requests"] == []
    # the upstream URLs (example.invalid) are never contacted for verified files either
    report = fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=quiet())
    assert report.count("already verified") == len(TINY)


def test_resume_partial_file_with_range(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, state = server
    serve_tiny(served)
    cat = load_catalog(tiny_catalog(tmp_path))
    folder = tmp_path / "out" / "tiny"
    folder.mkdir(parents=True)
    half = len(TINY["view.txt"]) // 2
    (folder / "view.txt.part").write_bytes(TINY["view.txt"][:half])
    fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=mirror(url))
    assert ("/tiny/view.txt", f"bytes={half}-") in state["requests"]
    assert (folder / "view.txt").read_bytes() == TINY["view.txt"]
    assert not (folder / "view.txt.part").exists()


def test_interrupted_download_resumes_next_run(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, state = server
    serve_tiny(served)
    state["truncate"].add("view.txt")
    cat = load_catalog(tiny_catalog(tmp_path))
    folder = tmp_path / "out" / "tiny"
    with pytest.raises(FetchError, match="run the same command again to resume"):
        fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=mirror(url))
    part = folder / "view.txt.part"
    got = part.read_bytes()
    assert 0 < len(got) < len(TINY["view.txt"]) and TINY["view.txt"].startswith(got)
    assert not (folder / "view.txt").exists()
    assert (folder / "buy.txt").read_bytes() == TINY["buy.txt"]  # the other files went through
    state["requests"].clear()
    fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=mirror(url))
    assert state["requests"] == [("/tiny/view.txt", f"bytes={len(got)}-")]
    assert (folder / "view.txt").read_bytes() == TINY["view.txt"]


def test_server_ignoring_range_restarts_cleanly(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, state = server
    serve_tiny(served)
    state["ignore_range"] = True
    part = tmp_path / "f.part"
    part.write_bytes(b"garbage!")
    download(f"{url}/tiny/view.txt", part, len(TINY["view.txt"]))
    assert part.read_bytes() == TINY["view.txt"]


def test_complete_part_file_gets_416_or_no_request(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, state = server
    serve_tiny(served)
    part = tmp_path / "f.part"
    part.write_bytes(TINY["buy.txt"])
    download(f"{url}/tiny/buy.txt", part, len(TINY["buy.txt"]))  # size known: no request at all
    assert state["requests"] == []
    download(f"{url}/tiny/buy.txt", part, None)  # size unknown: the server answers 416
    assert state["requests"] == [("/tiny/buy.txt", f"bytes={len(TINY['buy.txt'])}-")]
    assert part.read_bytes() == TINY["buy.txt"]


def test_corrupted_file_is_refused_and_kept_aside(server: tuple[str, Path, dict[str, Any]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url, served, state = server
    serve_tiny(served)
    state["corrupt"].add("buy.txt")
    cat_path = tiny_catalog(tmp_path)
    folder = tmp_path / "out" / "tiny"
    with pytest.raises(FetchError, match=r"buy.txt: .*checksum mismatch, refused"):
        fetch_dataset("tiny", tmp_path / "out", catalog=load_catalog(cat_path), options=mirror(url))
    assert not (folder / "buy.txt").exists()
    assert (folder / "buy.txt.bad").read_bytes()[1:] == TINY["buy.txt"][1:]
    assert (folder / "view.txt").read_bytes() == TINY["view.txt"]
    with pytest.raises(ChecksumError, match="buy.txt: missing"):
        verify_dataset("tiny", tmp_path / "out", catalog=load_catalog(cat_path))
    # through the command line: one error line, exit status 2, no traceback
    code = mbrec_main(["fetch", "tiny", str(tmp_path / "out"), "--base-url", url, "--catalog", str(cat_path),
                       "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "mbrec fetch: error: 1 of 4 files of tiny failed" in err and "Traceback" not in err
    state["corrupt"].clear()
    assert run_cli(["fetch", "tiny", str(tmp_path / "out"), "--base-url", url, "--catalog", str(cat_path)]) == 0
    assert (folder / "buy.txt").read_bytes() == TINY["buy.txt"]


def test_file_in_place_that_differs_is_moved_aside(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, _ = server
    serve_tiny(served)
    folder = tmp_path / "out" / "tiny"
    folder.mkdir(parents=True)
    (folder / "test.txt").write_bytes(b"1 1\n")
    report = fetch_dataset("tiny", tmp_path / "out", catalog=load_catalog(tiny_catalog(tmp_path)), options=mirror(url))
    assert (folder / "test.txt.bad").read_bytes() == b"1 1\n"
    assert (folder / "test.txt").read_bytes() == TINY["test.txt"]
    assert dict(report.actions)["test.txt"].startswith("downloaded")


def test_file_url_mirror_and_resume(tmp_path: Path) -> None:
    served = tmp_path / "mirror"
    serve_tiny(served)
    cat = load_catalog(tiny_catalog(tmp_path))
    folder = tmp_path / "out" / "tiny"
    folder.mkdir(parents=True)
    (folder / "view.txt.part").write_bytes(TINY["view.txt"][:5])
    fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=mirror(served.as_uri()))
    assert {n: (folder / n).read_bytes() for n in TINY} == TINY


def test_missing_file_on_mirror_is_a_clear_error(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    url, served, _ = server
    serve_tiny(served)
    (served / "tiny" / "count.txt").unlink()
    with pytest.raises(FetchError, match=r"count.txt: .*HTTP 404"):
        fetch_dataset("tiny", tmp_path / "out", catalog=load_catalog(tiny_catalog(tmp_path)), options=mirror(url))


def test_unreachable_upstream_suggests_a_mirror(tmp_path: Path) -> None:
    cat = load_catalog(tiny_catalog(tmp_path, base="http://127.0.0.1:9"))  # port 9: nothing listens
    with pytest.raises(FetchError, match="--base-url"):
        fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=quiet())


def test_unknown_name_suggests_the_closest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'crgcn-beibei'"):
        fetch_dataset("crgcn-beibie", tmp_path)
    assert mbrec_main(["fetch", "mule-taobo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'mule-taobo' (did you mean 'mule-taobao'?)" in err and "Traceback" not in err
    assert mbrec_main(["datasets", "bvae-dj"]) == 2
    assert "did you mean 'bvae-jd'" in capsys.readouterr().err


def test_not_fetchable_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"'tmall' cannot be fetched: The click behavior \(1,813,498 pairs\)"):
        fetch_dataset("tmall", tmp_path)
    with pytest.raises(FetchError, match="the view file is not published"):
        fetch_dataset("gone", tmp_path, catalog=load_catalog(tiny_catalog(tmp_path)))


def test_verify_only(server: tuple[str, Path, dict[str, Any]], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    url, served, state = server
    serve_tiny(served)
    cat_path = tiny_catalog(tmp_path)
    with pytest.raises(ChecksumError, match="4 of 4 files not verified"):
        verify_dataset("tiny", tmp_path / "out", catalog=load_catalog(cat_path))
    fetch_dataset("tiny", tmp_path / "out", catalog=load_catalog(cat_path), options=mirror(url))
    state["requests"].clear()
    assert run_cli(["fetch", "tiny", str(tmp_path / "out"), "--verify-only", "--catalog", str(cat_path)]) == 0
    assert "all 4 files verified" in capsys.readouterr().out and state["requests"] == []


def test_default_dir_and_mirror_env(server: tuple[str, Path, dict[str, Any]], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url, served, _ = server
    serve_tiny(served)
    cat_path = tiny_catalog(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MBREC_DATASETS", raising=False)
    monkeypatch.setenv("MBREC_MIRROR", url)
    assert run_cli(["fetch", "tiny", "--catalog", str(cat_path)]) == 0
    assert (tmp_path / "datasets" / "tiny" / "view.txt").read_bytes() == TINY["view.txt"]
    out = capsys.readouterr().out
    assert f"from mirror {url}" in out and "mbrec stats datasets/tiny" in out
    monkeypatch.setenv("MBREC_DATASETS", str(tmp_path / "elsewhere"))
    assert run_cli(["fetch", "tiny", "--catalog", str(cat_path), "--quiet"]) == 0
    assert (tmp_path / "elsewhere" / "tiny" / "count.txt").is_file()


def test_progress_bar_when_enabled(server: tuple[str, Path, dict[str, Any]], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    url, served, _ = server
    serve_tiny(served)
    download(f"{url}/tiny/view.txt", tmp_path / "a.part", None, label="view.txt", progress=True)
    assert "view.txt" in capsys.readouterr().err
    download(f"{url}/tiny/view.txt", tmp_path / "b.part", None, label="view.txt", progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# archives and conversions from upstream sources


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_members_are_extracted_and_archive_removed(server: tuple[str, Path, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    url, served, _ = server
    members = {f"tiny/{n}": d for n, d in TINY.items()} | {"__MACOSX/tiny/._view.txt": b"x", "tiny/.DS_Store": b"y"}
    _zip(served / "tiny.zip", members)
    files = [_entry(n, d, {"kind": "zip", "url": f"{url}/tiny.zip", "member": n}) for n, d in TINY.items()]
    cat = load_catalog(write_catalog(tmp_path / "c.yaml", {"tiny": {"fetchable": True, "files": files}}))
    report = fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=quiet())
    folder = tmp_path / "out" / "tiny"
    assert {n: (folder / n).read_bytes() for n in TINY} == TINY
    assert not (folder / ".download").exists() and not (folder / ".DS_Store").exists()
    assert all(a == f"extracted from {url}/tiny.zip" for _, a in report.actions)


def _fake_unrar(bin_dir: Path) -> None:
    """An ``unrar`` stand-in (``unrar x -o+ -y ARCHIVE OUT/``) that unpacks zip files."""
    bin_dir.mkdir()
    tool = bin_dir / "unrar"
    tool.write_text(f"#!{sys.executable}\nimport sys, zipfile\nzipfile.ZipFile(sys.argv[4]).extractall(sys.argv[5])\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


def _rar_catalog(tmp_path: Path, url: str) -> Path:
    files = [_entry(n, TINY[m], {"kind": "rar", "url": f"{url}/buy.rar", "member": m})
             for n, m in (("buy.txt", "buy.txt"), ("view.txt", "view.txt"))]
    files += [_entry(n, TINY[n], {"kind": "url", "url": f"{url}/plain/{n}"}) for n in ("test.txt", "count.txt")]
    return write_catalog(tmp_path / "c.yaml", {"tiny": {"fetchable": True, "files": files}})


def test_rar_without_a_tool_explains_and_manual_files_verify(server: tuple[str, Path, dict[str, Any]],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, served, _ = server
    serve_tiny(served, "plain")
    _zip(served / "buy.rar", {"buy\\buy.txt": TINY["buy.txt"], "buy\\view.txt": TINY["view.txt"]})
    monkeypatch.setattr(fetch_mod, "RAR_TOOLS", (("no-such-unrar-tool", lambda e, a, d: []),))
    cat = load_catalog(_rar_catalog(tmp_path, url))
    folder = tmp_path / "out" / "tiny"
    with pytest.raises(FetchError, match="standard library cannot unpack") as info:
        fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=quiet())
    msg = str(info.value)
    assert f"buy.txt -> {folder / 'buy.txt'} (sha256 {hashlib.sha256(TINY['buy.txt']).hexdigest()})" in msg
    archive = next((folder / ".download").glob("*buy.rar"))  # downloaded for manual extraction
    assert (folder / "test.txt").is_file()
    with zipfile.ZipFile(archive) as zf:  # the user unpacks it by hand ...
        for n in ("buy.txt", "view.txt"):
            (folder / n).write_bytes(zf.read(f"buy\\{n}"))
    report = fetch_dataset("tiny", tmp_path / "out", catalog=cat, options=quiet())  # ... and runs fetch again
    assert [a for _, a in report.actions] == ["already verified"] * 4


def test_rar_with_an_external_tool(server: tuple[str, Path, dict[str, Any]], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, served, _ = server
    serve_tiny(served, "plain")
    _zip(served / "buy.rar", {"buy/buy.txt": TINY["buy.txt"], "buy/view.txt": TINY["view.txt"]})
    _fake_unrar(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(fetch_mod, "RAR_TOOLS", fetch_mod.RAR_TOOLS[:1])
    report = fetch_dataset("tiny", tmp_path / "out", catalog=load_catalog(_rar_catalog(tmp_path, url)),
                           options=quiet())
    folder = tmp_path / "out" / "tiny"
    assert {n: (folder / n).read_bytes() for n in TINY} == TINY
    assert dict(report.actions)["view.txt"] == f"extracted from {url}/buy.rar"
    assert not (folder / ".download").exists()


def _pairs_text(m: sp.csr_matrix, offset: int) -> bytes:
    coo = m.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return "".join(f"{r + offset} {c + offset}\n" for r, c in zip(coo.row[order], coo.col[order])).encode()


def test_derived_files_from_another_dataset(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    """Like crgcn-beibei view.txt from hkuds-beibei trn_pv: the pickle is fetched into its own
    dataset folder first, then converted (+1, sorted by user then item)."""
    url, served, _ = server
    m = sp.csr_matrix(np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=np.int32))
    raw = pickle.dumps(m, protocol=3)
    (served / "trn_pv").write_bytes(raw)
    text = _pairs_text(m, 1)
    assert text == b"1 2\n1 3\n2 1\n3 3\n4 1\n4 2\n"
    cat = load_catalog(write_catalog(tmp_path / "c.yaml", {
        "pickles": {"fetchable": True, "files": [_entry("trn_pv", raw, {"kind": "url", "url": f"{url}/trn_pv"})]},
        "text": {"fetchable": True, "files": [_entry("view.txt", text, {
            "kind": "derive", "recipe": "csr_pickle_to_pairs_text", "input": "pickles/trn_pv", "offset": 1})]},
    }))
    report = fetch_dataset("text", tmp_path / "out", catalog=cat, options=quiet())
    assert (tmp_path / "out" / "text" / "view.txt").read_bytes() == text
    assert (tmp_path / "out" / "pickles" / "trn_pv").read_bytes() == raw
    assert dict(report.actions) == {"view.txt": "converted from pickles/trn_pv",
                                    "pickles/trn_pv": f"downloaded from {url}/trn_pv"}


def test_derived_pickle_accepted_on_content(server: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    """A derived pickle whose bytes differ (another numpy/scipy) but whose matrix matches is kept,
    and the next run recognises it; a different matrix is refused."""
    url, served, _ = server
    text = b"1 1\n1 3\n2 2\n3 1\n"
    (served / "view.txt").write_bytes(text)
    m = sp.csr_matrix((np.ones(4, dtype=np.int64), ([0, 0, 1, 2], [0, 2, 1, 0])), shape=(3, 4))
    other_bytes = pickle.dumps(m, protocol=2)  # not what protocol 4 writes
    source = {"kind": "derive", "recipe": "pairs_text_to_csr_pickle", "input": "t/view.txt", "offset": -1,
              "shape": [3, 4], "dtype": "int64", "protocol": 4}
    derived = _entry("pk/trn_pv_DERIVED", other_bytes, source) | {"content_sha256": csr_content_sha256(m)}
    files = [_entry("view.txt", text, {"kind": "url", "url": f"{url}/view.txt"}), derived]
    cat = load_catalog(write_catalog(tmp_path / "c.yaml", {"t": {"fetchable": True, "files": files}}))
    fetch_dataset("t", tmp_path / "out", catalog=cat, options=quiet())
    out = tmp_path / "out" / "t" / "pk" / "trn_pv_DERIVED"
    assert (pickle.loads(out.read_bytes()) != m).nnz == 0
    report = fetch_dataset("t", tmp_path / "out", catalog=cat, options=quiet())
    assert dict(report.actions)["pk/trn_pv_DERIVED"] == "already verified"
    # a matrix that differs is refused
    bad = dict(derived, content_sha256="0" * 64, sha256="0" * 64)
    cat2 = load_catalog(write_catalog(tmp_path / "c2.yaml", {"t": {"fetchable": True, "files": [files[0], bad]}}))
    out.unlink()
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_dataset("t", tmp_path / "out", catalog=cat2, options=quiet())


# --------------------------------------------------------------------------------------------
# listing


def test_datasets_listing_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(["datasets", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in SHARED_FETCHABLE:
        assert re.search(rf"^{name}\s+yes\s", out, re.MULTILINE), name
    for name in ("tmall", "ub", "ijcai", "taobao-48k"):
        assert re.search(rf"^{name}\s+no\s", out, re.MULTILINE), name
    assert "license: No license stated upstream" in out and "missing: The click behavior" in out
    assert "https://github.com/JingyunLiu663/CRGCN/tree/562430d9/data/beibei" in out
    assert "absent" in out


def test_datasets_one_entry_lists_files_and_checksums(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(["datasets", "bvae-jd", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(" bytes  sha256 ") == 12
    assert "https://raw.githubusercontent.com/WitnessForest/BVAE/5aa296a4/BVAE/Dataset/JD/click_train" in out
    assert "cart_train  0 bytes  sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" in out


def test_datasets_json_is_complete(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(["datasets", "--json", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    records = {d["name"]: d for d in json.loads(out)["datasets"]}
    assert set(SHARED_FETCHABLE) | {"tmall", "ub", "ijcai"} <= set(records)
    for name, d in records.items():
        assert d["license"] and d["papers"] and d["sources"], name
        assert all(s["url"].startswith("https://github.com/") for s in d["sources"])
        assert d["local"]["state"] == "absent"
        if not d["fetchable"]:
            assert d["missing"] and not d["files"], name
            continue
        assert d["counts"]["users"] > 0 and d["counts"]["items"] > 0 and d["counts"]["behaviors"]
        for f in d["files"]:
            assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) and f["size"] >= 0, f
            assert re.fullmatch(r"[0-9a-f]{40}", f["git_blob"]), f
            assert f["url"] is None or f["url"].startswith("https://raw.githubusercontent.com/"), f
    assert records["crgcn-beibei"]["counts"]["behaviors"]["buy"] == {"train": 261144, "valid": 21716, "test": 21716}


def test_datasets_local_status(server: tuple[str, Path, dict[str, Any]], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    url, served, _ = server
    serve_tiny(served)
    cat_path = tiny_catalog(tmp_path)
    fetch_dataset("tiny", tmp_path / "out", catalog=load_catalog(cat_path), options=mirror(url))
    assert run_cli(["datasets", "--dir", str(tmp_path / "out"), "--catalog", str(cat_path), "--verify"]) == 0
    assert re.search(r"^tiny\s+yes.*verified", capsys.readouterr().out, re.MULTILINE)
    (tmp_path / "out" / "tiny" / "view.txt").unlink()
    (tmp_path / "out" / "tiny" / "buy.txt").write_bytes(b"1 2\n1 1\n2 2\n3 1\n3 5\n4 3\n")  # same size, other bytes
    assert run_cli(["datasets", "--dir", str(tmp_path / "out"), "--catalog", str(cat_path), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)["datasets"][0]["local"]
    assert (local["state"], local["files_present"]) == ("partial", 3)
    assert local_status(load_catalog(cat_path).get("tiny"), tmp_path / "out", verify=True).bad == ("buy.txt",)


def test_packaged_catalog_is_consistent() -> None:
    cat = load_catalog()
    names = set(cat.datasets)
    for ds in cat.datasets.values():
        for f in ds.files:
            if f.source.kind == "derive":
                ref_ds, _, ref_file = str(f.source.input).partition("/")
                assert ref_ds in names and ref_file in cat.get(ref_ds).file_names(), f.name
            assert f.sha256 and f.size is not None, f.name
    assert cat.get("mule-taobao").file("pkef_pickles/trn_pv_DERIVED").content_sha256


def test_docs_list_every_catalog_checksum() -> None:
    """docs/datasets.md shows the catalog's files and checksums; they must not drift apart."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text(encoding="utf-8")
    for ds in load_catalog().datasets.values():
        assert f"`{ds.name}`" in doc
        for f in ds.files:
            assert f"| `{f.name}` | {f.size:,} | `{f.sha256}` |" in doc, f"{ds.name}/{f.name}"


@pytest.mark.parametrize("bad, message", [
    ({"kind": "ftp", "url": "x"}, "unknown source kind 'ftp'"),
    ({"kind": "url", "repo": "a/b", "path": "f"}, "missing key 'commit'"),
    ({"kind": "zip", "url": "http://x/a.zip"}, "missing key 'member'"),
    ({"kind": "derive", "recipe": "pairs_to_pickle", "input": "a/b"}, "unknown recipe 'pairs_to_pickle'"),
    ({"kind": "derive", "recipe": "csr_pickle_to_pairs_text", "input": "b"}, "'input' must be 'dataset/file'"),
])
def test_bad_catalog_entries_are_config_errors(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    from mbrec.errors import ConfigError

    path = write_catalog(tmp_path / "c.yaml", {"x": {"fetchable": True, "files": [{"name": "f", "source": bad}]}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_catalog(path)
    (tmp_path / "d.yaml").write_text("datasets: [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_catalog(tmp_path / "d.yaml")


# --------------------------------------------------------------------------------------------
# the packaged catalog against the offline copies


@pytest.mark.realdata
@pytest.mark.parametrize("name", SHARED_FETCHABLE)
def test_stored_checksums_match_shared_copies(shared_datasets: Path, name: str) -> None:
    ds = load_catalog().get(name)
    if not (shared_datasets / name).is_dir():
        pytest.skip(f"{shared_datasets / name} absent")
    for f in ds.files:
        path = shared_datasets / name / f.name
        assert path.stat().st_size == f.size, f.name
        assert sha256_file(path) == f.sha256, f.name
    assert local_status(ds, shared_datasets, verify=True).state == "verified"


@pytest.mark.realdata
def test_conversions_reproduce_shared_copies(shared_datasets: Path, tmp_path: Path) -> None:
    """The derive recipes rebuild crgcn-beibei/cart.txt and the Taobao trn_pv_DERIVED exactly."""
    if not (shared_datasets / "hkuds-beibei").is_dir() or not (shared_datasets / "mule-taobao").is_dir():
        pytest.skip("hkuds-beibei or mule-taobao absent")
    cat = load_catalog()
    cart = cat.get("crgcn-beibei").file("cart.txt")
    fetch_mod.csr_pickle_to_pairs_text(shared_datasets / "hkuds-beibei" / "trn_cart", tmp_path / "cart.txt", offset=1)
    assert sha256_file(tmp_path / "cart.txt") == cart.sha256
    pv = cat.get("mule-taobao").file("pkef_pickles/trn_pv_DERIVED")
    content = fetch_mod.pairs_text_to_csr_pickle(shared_datasets / "mule-taobao" / "view.txt", tmp_path / "pv",
                                                 **{k: v for k, v in pv.source.options.items()})
    assert content == pv.content_sha256


@pytest.mark.realdata
def test_fetch_real_catalog_from_a_file_mirror(shared_datasets: Path, tmp_path: Path) -> None:
    """``mbrec fetch bvae-jd DIR --base-url file://…/shared/datasets`` then ``load_dataset(DIR/bvae-jd)``."""
    if not (shared_datasets / "bvae-jd").is_dir():
        pytest.skip("bvae-jd absent")
    report = fetch_dataset("bvae-jd", tmp_path, options=mirror(shared_datasets.resolve().as_uri()))
    assert len(report.actions) == 12
    data = load_dataset(tmp_path / "bvae-jd")
    assert (data.n_users, data.n_items) == (10690, 13465)
    assert data.counts()["train"] == {"click": 217977, "favourite": 7380, "purchase": 60967}


def _fake_github(served: Path, shared: Path, monkeypatch: pytest.MonkeyPatch, url: str, tmp_path: Path) -> Path:
    """Lay out the packaged catalog's upstream files under ``served/{repo}/{commit}/{path}`` (from
    the offline copies: archives rebuilt as zip files, the RAR one unpacked by a stand-in tool),
    point the catalog's raw.githubusercontent.com template at the local server, and return a copy
    of the catalog without the archive sizes (the rebuilt archives differ from the originals)."""
    import mbrec.data.catalog as catalog_mod

    archives: dict[Path, dict[str, bytes]] = {}
    for ds in load_catalog().datasets.values():
        for f in ds.files:
            src = f.source
            if src.kind == "derive":
                continue
            target = served / str(src.repo) / str(src.commit) / str(src.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = (shared / ds.name / f.name).read_bytes()
            if src.kind == "url":
                target.write_bytes(data)
            else:
                prefix = "buy\\" if src.kind == "rar" else "taobao/"
                archives.setdefault(target, {})[prefix + str(src.member)] = data
    for target, members in archives.items():
        _zip(target, members)
    monkeypatch.setattr(catalog_mod, "RAW", url + "/{repo}/{commit}/{path}")
    raw = yaml.safe_load(catalog_mod.CATALOG_PATH.read_text(encoding="utf-8"))
    for ds in raw["datasets"].values():
        for f in ds.get("files") or []:
            f["source"].pop("archive_size", None)
    return write_catalog(tmp_path / "catalog-no-archive-sizes.yaml", raw["datasets"])


@pytest.mark.realdata
def test_real_catalog_upstream_recipes_end_to_end(shared_datasets: Path, server: tuple[str, Path, dict[str, Any]],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every source kind of the packaged catalog against a stand-in for GitHub: mule-taobao (zip,
    url, pickle rebuilt from view.txt), crgcn-beibei (url, text converted from hkuds-beibei,
    whose pickles come out of the RAR archive). The results load with the documented counts."""
    if not all((shared_datasets / n).is_dir() for n in ("hkuds-beibei", "crgcn-beibei", "mule-taobao")):
        pytest.skip("hkuds-beibei, crgcn-beibei or mule-taobao absent")
    url, served, _ = server
    cat = load_catalog(_fake_github(served, shared_datasets, monkeypatch, url, tmp_path))
    _fake_unrar(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(fetch_mod, "RAR_TOOLS", fetch_mod.RAR_TOOLS[:1])
    out = tmp_path / "datasets"
    report = fetch_dataset("mule-taobao", out, catalog=cat, options=quiet())
    assert dict(report.actions)["pkef_pickles/trn_pv_DERIVED"] == "converted from mule-taobao/view.txt"
    report = fetch_dataset("crgcn-beibei", out, catalog=cat, options=quiet())
    actions = dict(report.actions)
    assert actions["view.txt"] == "converted from hkuds-beibei/trn_pv"
    assert actions["hkuds-beibei/trn_pv"].startswith("extracted from ")
    assert not (out / "hkuds-beibei" / ".download").exists()
    for name in ("mule-taobao", "crgcn-beibei"):
        assert local_status(load_catalog().get(name), out, verify=True).state == "verified"
    assert load_dataset(out / "crgcn-beibei").counts()["train"] == {"view": 2412586, "cart": 642622, "buy": 261144}
    taobao = load_dataset(out / "mule-taobao" / "pkef_pickles")
    assert taobao.counts()["train"] == {"pv": 873954, "cart": 195476, "buy": 92180}
