"""``mbrec serve``: endpoints, equality with ``mbrec recommend``, bad input, reload, SIGHUP, workers.

Unit tests use FastAPI's in-process TestClient; the bad-input matrix, reloads and in-flight
requests run against a real uvicorn server on 127.0.0.1 (a free port) in a thread of this
process, and SIGHUP and ``--workers 2`` against ``python -m mbrec serve`` subprocesses. Every
server is shut down by the test that started it. Runs: 1-2 epochs of LightGCN on ``synthetic``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")

with warnings.catch_warnings():  # newer Starlette prefers httpx2 for its test client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from mbrec.cli.main import main  # noqa: E402
from mbrec.config import build_config  # noqa: E402
from mbrec.serving import app as app_module  # noqa: E402
from mbrec.serving.app import create_app, open_source  # noqa: E402
from mbrec.serving.artifact import read_manifest  # noqa: E402
from mbrec.serving.export import export_run  # noqa: E402
from mbrec.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict[str, Path]:
    """Two LightGCN runs (other seeds and epochs: other answers), their artifacts, and a
    damaged copy of the second."""
    root = tmp_path_factory.mktemp("serve")
    out: dict[str, Path] = {}
    for name, epochs, seed in (("a", 2, 7), ("b", 1, 8)):
        cfg = build_config("lightgcn", "synthetic", config_file=REPO / "configs" / "lightgcn" / "synthetic.yaml",
                           overrides=[f"train.epochs={epochs}", "train.eval_start=1", "train.eval_every=1", f"seed={seed}"])
        out[f"run_{name}"] = root / f"run_{name}"
        train(cfg, out[f"run_{name}"], quiet=True)
        out[name] = export_run(out[f"run_{name}"], root / f"art_{name}")
    bad = root / "art_bad"
    shutil.copytree(out["b"], bad)
    (bad / "users.npy").write_bytes((bad / "users.npy").read_bytes()[:-8])
    out["bad"] = bad
    return out


@pytest.fixture(scope="module")
def client(arts) -> Iterator[TestClient]:
    app = create_app(open_source(arts["a"]), arts["a"], admin_token=TOKEN)
    with TestClient(app) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of this process."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "RealServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture
def real_server(arts) -> Iterator[Callable[..., RealServer]]:
    """Start real servers (``real_server(**create_app options)``); all stopped at the end."""
    started: list[RealServer] = []

    def start(**opts: Any) -> RealServer:
        opts.setdefault("admin_token", TOKEN)
        srv = RealServer(create_app(open_source(arts["a"]), arts["a"], **opts)).__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.__exit__(None, None, None)


@pytest.fixture(scope="module")
def shared_server(arts) -> Iterator[RealServer]:
    with RealServer(create_app(open_source(arts["a"]), arts["a"], admin_token=TOKEN, max_body=2**20)) as srv:
        yield srv


def cli_server(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m mbrec serve ARGS --port P`` (a real process); waits for /healthz."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "mbrec", "serve", *args, "--port", str(port), "--no-access-log",
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"mbrec serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "mbrec serve did not answer in time"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def workers(pid: int) -> set[int]:
    """The uvicorn worker processes (multiprocessing spawn children) of the server ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            out.add(int(entry))
    return out


def artifact_id(path: Path) -> str:
    return open_source(path).artifact_id


def wait_for(check: Callable[[], bool], seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


# ----------------------------------------------------------------------------- endpoints


def test_endpoints_answer_in_the_documented_shapes(client, arts):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["artifact_id"] == artifact_id(arts["a"]) and h["model"] == "lightgcn"
    info = client.get("/v1/info").json()
    manifest = read_manifest(arts["a"])
    assert {k: info[k] for k in ("model", "dataset", "behaviors", "target", "protocol", "metrics", "created",
                                 "mbrec_version", "files")} == {k: manifest[k] for k in
                                                                 ("model", "dataset", "behaviors", "target", "protocol",
                                                                  "metrics", "created", "mbrec_version", "files")}
    one = client.get("/v1/recommend", params={"user": "u3", "k": 5}).json()
    assert set(one) == {"user", "behavior", "fallback", "items"} and one["user"] == "u3" and one["behavior"] == "buy"
    assert one["fallback"] is None and [x["rank"] for x in one["items"]] == [1, 2, 3, 4, 5]
    assert all(set(x) == {"item", "score", "rank"} and x["item"].startswith("i") for x in one["items"])
    scores = [x["score"] for x in one["items"]]
    assert scores == sorted(scores, reverse=True)
    many = client.post("/v1/recommend", json={"users": ["u3", "u4", "u3"], "k": 5}).json()
    assert [a["user"] for a in many] == ["u3", "u4", "u3"] and many[0]["items"] == many[2]["items"]
    assert [x["item"] for x in many[0]["items"]] == [x["item"] for x in one["items"]]
    assert client.post("/v1/recommend", json={"users": []}).json() == []
    sc = client.post("/v1/score", json={"user": "u3", "items": [one["items"][0]["item"], "i0"]}).json()
    assert sc["user"] == "u3" and sc["behavior"] == "buy" and [s["item"] for s in sc["scores"]] == [one["items"][0]["item"], "i0"]
    assert sc["scores"][0]["score"] == pytest.approx(one["items"][0]["score"], rel=1e-5) and sc["scores"][0]["seen"] is False
    sim = client.get("/v1/similar", params={"item": "i5", "k": 4}).json()
    assert sim["item"] == "i5" and len(sim["items"]) == 4 and "i5" not in [x["item"] for x in sim["items"]]
    assert all(-1.0 - 1e-5 <= x["score"] <= 1.0 + 1e-5 for x in sim["items"])


def test_unknown_user_is_404_or_gets_the_popular_fallback(client):
    r = client.get("/v1/recommend", params={"user": "stranger"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_user" and "stranger" in r.json()["error"]["message"]
    r = client.post("/v1/recommend", json={"users": ["u1", "stranger", "alien"]})
    assert r.status_code == 404 and "'stranger', 'alien'" in r.json()["error"]["message"]
    fb = client.get("/v1/recommend", params={"user": "stranger", "k": 3, "fallback": "popular"}).json()
    assert fb["fallback"] == "popular" and len(fb["items"]) == 3
    assert [x["score"] for x in fb["items"]] == sorted((x["score"] for x in fb["items"]), reverse=True)
    mixed = client.post("/v1/recommend", json={"users": ["u1", "stranger"], "k": 3, "fallback": "popular"}).json()
    assert [a["fallback"] for a in mixed] == [None, "popular"] and mixed[1]["items"] == fb["items"]


def test_results_equal_mbrec_recommend(client, arts, tmp_path):
    """The service and ``mbrec recommend`` give the same items in the same order, for all users."""
    out = tmp_path / "rec.csv"
    assert main(["recommend", str(arts["run_a"]), "--users", "all", "--k", "10", "--out", str(out)]) == 0
    want: dict[str, list[tuple[str, float]]] = {}
    with open(out) as fh:
        for row in csv.DictReader(fh):
            want.setdefault(row["user"], []).append((row["item"], float(row["score"])))
    users = list(want)
    got = client.post("/v1/recommend", json={"users": users, "k": 10}).json()
    for ans in got:
        assert [x["item"] for x in ans["items"]] == [i for i, _ in want[ans["user"]]], ans["user"]
        np.testing.assert_allclose([x["score"] for x in ans["items"]], [s for _, s in want[ans["user"]]], rtol=1e-5)
    for user in users[:5]:  # the single-user GET too
        one = client.get("/v1/recommend", params={"user": user, "k": 10}).json()
        assert [x["item"] for x in one["items"]] == [i for i, _ in want[user]]


def test_exclude_none_ranks_every_item_by_its_score(client):
    items = [f"i{k}" for k in range(400)]
    scores = client.post("/v1/score", json={"user": "u7", "items": items}).json()["scores"]
    by_score = [s["item"] for s in sorted(scores, key=lambda s: -s["score"])]
    unseen = [s["item"] for s in sorted(scores, key=lambda s: -s["score"]) if not s["seen"]]
    assert any(s["seen"] for s in scores)
    none = client.get("/v1/recommend", params={"user": "u7", "k": 20, "exclude": "none"}).json()
    seen = client.get("/v1/recommend", params={"user": "u7", "k": 20}).json()
    assert [x["item"] for x in none["items"]] == by_score[:20]
    assert [x["item"] for x in seen["items"]] == unseen[:20]


def test_openapi_docs_list_every_endpoint(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/v1/info", "/v1/recommend", "/v1/score", "/v1/similar", "/v1/admin/reload"} <= set(paths)
    assert {"get", "post"} <= set(paths["/v1/recommend"])


# ----------------------------------------------------------------------------- bad input on a real server

LONG = "x" * 5000
BAD_INPUT = [
    ("malformed JSON", "POST", "/v1/recommend", {"content": b'{"users": ["u0"', "headers": {"content-type": "application/json"}}, 400, "malformed_json", "not valid JSON"),
    ("deeply nested JSON", "POST", "/v1/recommend", {"content": b"[" * 100000, "headers": {"content-type": "application/json"}}, 400, "malformed_json", "not valid JSON"),
    ("users not a list", "POST", "/v1/recommend", {"json": {"users": "u0"}}, 422, "invalid_request", "users"),
    ("user ids not strings", "POST", "/v1/recommend", {"json": {"users": [1, 2]}}, 422, "invalid_request", "users.0"),
    ("k a string", "POST", "/v1/recommend", {"json": {"users": ["u0"], "k": "ten"}}, 422, "invalid_request", "k"),
    ("k a fraction", "POST", "/v1/recommend", {"json": {"users": ["u0"], "k": 2.5}}, 422, "invalid_request", "k"),
    ("unknown field", "POST", "/v1/recommend", {"json": {"users": ["u0"], "kk": 3}}, 422, "invalid_request", "kk"),
    ("body a list", "POST", "/v1/recommend", {"json": ["u0"]}, 422, "invalid_request", "body"),
    ("body not JSON", "POST", "/v1/recommend", {"content": b'{"users": ["u0"]}', "headers": {"content-type": "text/plain"}}, 415, "not_json", "Content-Type"),
    ("k zero", "GET", "/v1/recommend?user=u0&k=0", {}, 422, "bad_k", "at least 1"),
    ("k negative", "GET", "/v1/recommend?user=u0&k=-3", {}, 422, "bad_k", "at least 1"),
    ("k above the catalogue", "GET", "/v1/recommend?user=u0&k=401", {}, 422, "bad_k", "400 items"),
    ("k huge", "GET", "/v1/recommend?user=u0&k=99999999999999999999999", {}, 422, "bad_k", "400 items"),
    ("k not a number", "GET", "/v1/recommend?user=u0&k=abc", {}, 422, "invalid_request", "query.k"),
    ("unknown behavior", "GET", "/v1/recommend?user=u0&behavior=click", {}, 422, "unknown_behavior", "'click'"),
    ("behavior the model does not rank", "POST", "/v1/recommend", {"json": {"users": ["u0"], "behavior": "view"}}, 422, "unknown_behavior", "does not rank it"),
    ("bad exclude", "GET", "/v1/recommend?user=u0&exclude=all", {}, 422, "invalid_request", "exclude"),
    ("no user", "GET", "/v1/recommend", {}, 422, "invalid_request", "query.user"),
    ("10,000 users", "POST", "/v1/recommend", {"json": {"users": [f"u{i % 500}" for i in range(10000)]}}, 413, "too_many_users", "10,000 users"),
    ("long id in the query", "GET", f"/v1/recommend?user={LONG}", {}, 422, "id_too_long", "5,000 characters"),
    ("long id in the body", "POST", "/v1/recommend", {"json": {"users": ["u0", "y" * 100000]}}, 422, "id_too_long", "100,000 characters"),
    ("long item id", "POST", "/v1/score", {"json": {"user": "u0", "items": [LONG]}}, 422, "id_too_long", "item id"),
    ("body over the limit", "POST", "/v1/recommend", {"content": b" " * (2 * 2**20), "headers": {"content-type": "application/json"}}, 413, "body_too_large", "bytes"),
    ("chunked body over the limit", "POST", "/v1/recommend", {"content": iter([b" " * 2**19] * 4), "headers": {"content-type": "application/json"}}, 413, None, ""),
    ("unknown item", "GET", "/v1/similar?item=nope", {}, 404, "unknown_item", "'nope'"),
    ("unknown user to score", "POST", "/v1/score", {"json": {"user": "nobody", "items": ["i1"]}}, 404, "unknown_user", "'nobody'"),
    ("unknown item to score", "POST", "/v1/score", {"json": {"user": "u0", "items": ["i1", "zz"]}}, 404, "unknown_item", "'zz'"),
    ("k above the other items", "GET", "/v1/similar?item=i1&k=400", {}, 422, "bad_k", "399 other items"),
    ("unknown endpoint", "GET", "/v1/nothing", {}, 404, "not_found", "/v1/nothing"),
    ("wrong method", "DELETE", "/v1/recommend", {}, 405, "method_not_allowed", "DELETE"),
    ("admin without token", "POST", "/v1/admin/reload", {}, 401, "bad_token", "token"),
    ("admin with a wrong token", "POST", "/v1/admin/reload", {"headers": {"Authorization": "Bearer nope"}}, 401, "bad_token", "token"),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(shared_server, case):
    _, method, path, kwargs, status, code, words = case
    r = httpx.request(method, shared_server.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["status"] == status and (code is None or err["code"] == code) and words in err["message"], err
    assert httpx.get(shared_server.url + "/healthz", timeout=10).json()["status"] == "ok"


def test_odd_characters_in_ids_are_answered_as_valid_json(shared_server):
    """Lone surrogates, quotes, backslashes and non-ASCII in an unknown id: a 404, or with the
    popular fallback a valid JSON answer echoing the id."""
    for user in ("\ud800", 'a"b\\c', "ünïcödé", "x\u0000y"):
        body = json.dumps({"users": [user]}).encode()
        r = httpx.post(shared_server.url + "/v1/recommend", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_user"
        body = json.dumps({"users": [user], "fallback": "popular", "k": 2}).encode()
        r = httpx.post(shared_server.url + "/v1/recommend", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()[0]["user"] == user and r.json()[0]["fallback"] == "popular"
    r = httpx.get(shared_server.url + "/v1/recommend?user=%ED%A0%80%FF&fallback=popular")
    assert r.status_code == 200 and r.json()["fallback"] == "popular"


def test_a_request_line_beyond_the_http_parser_limit_is_refused(shared_server):
    """A 1 MB id in the URL never reaches the application: uvicorn answers 400 (httptools; h11 may
    close the connection while the request is still being sent) and serves on."""
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", shared_server.port), timeout=30) as s:
            s.sendall(b"GET /v1/recommend?user=" + b"x" * 2**20 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while chunk := s.recv(65536):
                answer += chunk
    except (ConnectionResetError, BrokenPipeError):
        answer = answer or b"reset"
    assert answer.startswith(b"HTTP/1.1 400") or answer == b"reset", answer[:100]
    assert httpx.get(shared_server.url + "/healthz", timeout=10).status_code == 200


def test_many_concurrent_requests_with_bad_ones_mixed_in(shared_server):
    """32 threads of good and bad requests at once: good ones answered, bad ones 4xx, no 5xx."""
    statuses: list[int] = []

    def hit(i: int) -> None:
        with httpx.Client(base_url=shared_server.url, timeout=30) as c:
            for j in range(10):
                r = (c.get("/v1/recommend", params={"user": f"u{(i * 10 + j) % 500}"}) if j % 3 else
                     c.post("/v1/recommend", content=b"{oops", headers={"content-type": "application/json"}))
                statuses.append(r.status_code)

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 320 and set(statuses) == {200, 400}


# ----------------------------------------------------------------------------- admin and reload


def test_admin_endpoints_are_disabled_without_a_token(arts):
    with TestClient(create_app(open_source(arts["a"]), arts["a"], admin_token=None)) as c:
        r = c.post("/v1/admin/reload", headers=AUTH)
        assert r.status_code == 403 and "MBREC_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_reload_swaps_the_artifact_and_refuses_a_bad_one(real_server, arts):
    srv = real_server()
    base = srv.url
    old_answer = httpx.get(base + "/v1/recommend", params={"user": "u2"}).json()
    r = httpx.post(base + "/v1/admin/reload", json={"path": str(arts["b"])}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["artifact_id"] == artifact_id(arts["b"]) and r.json()["previous_artifact_id"] == artifact_id(arts["a"])
    assert httpx.get(base + "/healthz").json()["artifact_id"] == artifact_id(arts["b"])
    new_answer = httpx.get(base + "/v1/recommend", params={"user": "u2"}).json()
    assert new_answer == open_source(arts["b"]).recommend(["u2"])[0] != old_answer
    for path, words in ((arts["bad"], "does not match its SHA-256"), (arts["b"].parent / "missing", "does not exist"),
                        (arts["run_a"].parent, "neither a serving artifact")):
        r = httpx.post(base + "/v1/admin/reload", json={"path": str(path)}, headers=AUTH, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "bad_artifact", r.text
        assert words in r.json()["error"]["message"] and "still serving" in r.json()["error"]["message"]
        assert httpx.get(base + "/healthz").json()["artifact_id"] == artifact_id(arts["b"])
    r = httpx.post(base + "/v1/admin/reload", headers={"X-Admin-Token": TOKEN}, timeout=60)  # the current source again
    assert r.status_code == 200 and r.json()["source"] == str(arts["b"])


def test_reload_accepts_a_run_folder(real_server, arts):
    srv = real_server()
    r = httpx.post(srv.url + "/v1/admin/reload", json={"path": str(arts["run_b"])}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    got = httpx.get(srv.url + "/v1/recommend", params={"user": "u9"}).json()
    assert got == open_source(arts["b"]).recommend(["u9"])[0]


def test_requests_in_flight_finish_on_the_old_artifact(real_server, arts):
    srv = real_server()
    state = srv.app.state.serving
    old = state.engine
    want_old = old.recommend(["u0", "u1"])
    entered, release = threading.Event(), threading.Event()
    original = old.top_k

    def slow_top_k(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    old.top_k = slow_top_k  # type: ignore[method-assign]
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(srv.url + "/v1/recommend",
                                                                   json={"users": ["u0", "u1"]}, timeout=60)))
    t.start()
    assert entered.wait(30)
    r = httpx.post(srv.url + "/v1/admin/reload", json={"path": str(arts["b"])}, headers=AUTH, timeout=60)
    assert r.status_code == 200
    assert httpx.get(srv.url + "/v1/recommend", params={"user": "u0"}).json() == open_source(arts["b"]).recommend(["u0"])[0]
    release.set()
    t.join(30)
    assert result["r"].status_code == 200 and result["r"].json() == want_old


def test_concurrent_reloads_are_refused_with_409(real_server, arts, monkeypatch):
    srv = real_server()
    entered, release = threading.Event(), threading.Event()
    real_open = app_module.open_source

    def slow_open(path: Any) -> Any:
        entered.set()
        release.wait(30)
        return real_open(path)

    monkeypatch.setattr(app_module, "open_source", slow_open)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(srv.url + "/v1/admin/reload", json={"path": str(arts["b"])},
                                                                   headers=AUTH, timeout=60)))
    t.start()
    assert entered.wait(30)
    for _ in range(3):
        r = httpx.post(srv.url + "/v1/admin/reload", json={"path": str(arts["a"])}, headers=AUTH, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "reload_in_progress"
    assert httpx.get(srv.url + "/v1/recommend", params={"user": "u0"}).status_code == 200  # still serving
    release.set()
    t.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["artifact_id"] == artifact_id(arts["b"])


# ----------------------------------------------------------------------------- the command line


def test_sighup_reloads_the_current_source(arts, tmp_path):
    """``mbrec serve LINK``; LINK re-pointed + SIGHUP -> the new artifact; a bad one is refused."""
    link = tmp_path / "current"
    link.symlink_to(arts["a"], target_is_directory=True)
    proc, url = cli_server([str(link)])
    try:
        assert httpx.get(url + "/healthz").json()["artifact_id"] == artifact_id(arts["a"])
        link.unlink()
        link.symlink_to(arts["b"], target_is_directory=True)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: httpx.get(url + "/healthz").json()["artifact_id"] == artifact_id(arts["b"]), 30)
        link.unlink()
        link.symlink_to(arts["bad"], target_is_directory=True)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None
        assert httpx.get(url + "/healthz").json()["artifact_id"] == artifact_id(arts["b"])
        r = httpx.post(url + "/v1/admin/reload", headers=AUTH)
        assert r.status_code == 403  # no MBREC_ADMIN_TOKEN in this server's environment
    finally:
        stop(proc)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises SIGTERM


def test_serve_refuses_bad_arguments(arts, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(arts["bad"])]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert main(["serve", str(arts["a"]), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


@pytest.mark.slow
def test_several_workers_reload_together(arts):
    """``--workers 2``: an admin reload replaces every worker; a bad artifact is refused."""
    proc, url = cli_server([str(arts["a"]), "--workers", "2"], {"MBREC_ADMIN_TOKEN": TOKEN})
    try:
        a, b = artifact_id(arts["a"]), artifact_id(arts["b"])
        assert httpx.get(url + "/healthz").json()["artifact_id"] == a
        assert wait_for(lambda: len(workers(proc.pid)) == 2, 60)
        old = workers(proc.pid)
        r = httpx.post(url + "/v1/admin/reload", json={"path": str(arts["b"])}, headers=AUTH, timeout=60)
        assert r.status_code == 202 and r.json()["artifact_id"] == b, r.text

        def all_new() -> bool:
            return all(httpx.get(url + "/healthz", headers={"Connection": "close"}).json()["artifact_id"] == b
                       for _ in range(12))

        # the supervisor replaces the workers one at a time: wait until every old one is gone
        assert wait_for(lambda: not old & workers(proc.pid) and len(workers(proc.pid)) == 2, 120)
        assert all_new()
        r = httpx.post(url + "/v1/admin/reload", json={"path": str(arts["bad"])}, headers=AUTH, timeout=60)
        assert r.status_code == 422
        time.sleep(1.0)
        assert all_new() and len(workers(proc.pid)) == 2
    finally:
        stop(proc)
