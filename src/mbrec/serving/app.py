"""``mbrec serve``: the HTTP service (FastAPI; the optional extra ``serve``).

Endpoints (docs/serving.md has the JSON shapes and curl examples; OpenAPI at ``/docs``)::

    GET  /healthz                      liveness + the artifact being served
    GET  /v1/info                      the artifact's manifest
    GET  /v1/recommend?user=U&k=10&behavior=B&exclude=seen|none&fallback=none|popular
    POST /v1/recommend                 {"users": [...], "k", "behavior", "exclude", "fallback"}
    POST /v1/score                     {"user": U, "items": [...], "behavior"}
    GET  /v1/similar?item=I&k=10&behavior=B
    POST /v1/admin/reload              {"path": NEW} (token: ``Authorization: Bearer $MBREC_ADMIN_TOKEN``)

Every error is JSON ``{"error": {"status", "code", "message"}}`` with a 4xx status: malformed
JSON (400), a body that is not JSON (415), wrong types or values (422), unknown user or item
(404), too many users or too large a body (413), a reload while another runs (409), admin
without the token (401) or with admin disabled (403). An unexpected failure is a JSON 500 and is logged; it never stops the
server.

Reload without downtime: each request takes the engine it runs on once, at its start; a reload
builds the new engine beside the old one and swaps one reference, so requests in flight finish
on the old one and a refused artifact leaves the old one serving. SIGHUP reloads the current
source. With ``--workers N`` (several processes) the reload is checked by the worker that gets
it, recorded in a shared state file, and the uvicorn supervisor replaces the workers one by one
(its SIGHUP handling), each loading the new source before the old one is retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import json
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from mbrec.errors import MbrecError
from mbrec.serving.artifact import ArtifactError, load_artifact, utc_now
from mbrec.serving.engine import Engine, ServeError

log = logging.getLogger("mbrec.serve")

#: environment variable holding the admin token; admin endpoints are disabled without it
TOKEN_ENV = "MBREC_ADMIN_TOKEN"
#: environment variable naming the state file of a multi-worker server (set by ``mbrec serve``)
STATE_ENV = "MBREC_SERVE_STATE"
DEFAULT_MAX_BATCH = 1000
DEFAULT_MAX_BODY = 4 * 2**20


# ----------------------------------------------------------------------------- loading


def open_source(path: str | Path) -> Engine:
    """An engine for an artifact folder, or for a run folder (exported on the fly into a
    temporary folder, which is removed once loaded)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return Engine(load_artifact(p))
    if (p / "config.yaml").is_file():
        from mbrec.serving.export import export_run

        with tempfile.TemporaryDirectory(prefix="mbrec-serve-") as tmp:
            return Engine(load_artifact(export_run(p, Path(tmp) / "artifact")))
    if not p.exists():
        raise ArtifactError(f"{p} does not exist")
    raise ArtifactError(f"{p} is neither a serving artifact (no manifest.json) nor a run folder (no config.yaml)")


def _is_run_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() and not (p / "manifest.json").is_file()


class ServingState:
    """The engine being served and how it is replaced."""

    def __init__(self, engine: Engine, source: str, *, admin_token: str | None, max_batch: int,
                 state_file: Path | None = None, supervisor_pid: int | None = None) -> None:
        self.engine = engine
        self.source = source
        self.loaded_at = utc_now()
        self.admin_token = admin_token or None
        self.max_batch = max_batch
        self.state_file = state_file
        self.supervisor_pid = supervisor_pid
        self._reload_lock = threading.Lock()

    def check_admin(self, request: Request) -> None:
        """Admin requests need the token (``Authorization: Bearer T`` or ``X-Admin-Token: T``)."""
        if not self.admin_token:
            raise ServeError(403, "admin_disabled", f"admin endpoints are disabled; start the server with {TOKEN_ENV} set")
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-admin-token", "")
        if not given or not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            raise ServeError(401, "bad_token", "missing or wrong admin token (send Authorization: Bearer <token>)")

    def reload(self, path: str | None = None) -> tuple[int, dict[str, Any]]:
        """Load ``path`` (default: the current source) and swap it in; ``(status, answer)``.
        A second reload while one runs is refused (409); a bad artifact is refused (422) and
        the current one keeps serving."""
        if not self._reload_lock.acquire(blocking=False):
            raise ServeError(409, "reload_in_progress", "another reload is in progress; retry when it has finished")
        try:
            with self._shared_lock():
                source = path or self.source
                old = self.engine
                start = time.perf_counter()
                try:
                    if self.state_file is not None and _is_run_folder(source):  # export once for all workers
                        from mbrec.serving.export import export_run

                        source = str(export_run(source, self.state_file.parent / f"artifact-{time.time_ns()}"))
                    engine = open_source(source)
                except (MbrecError, OSError, ValueError) as e:
                    raise ServeError(422, "bad_artifact", f"reload refused, still serving artifact {old.artifact_id}: {e}") from None
                seconds = round(time.perf_counter() - start, 3)
                answer = {"source": str(source), "artifact_id": engine.artifact_id,
                          "previous_artifact_id": old.artifact_id, "load_seconds": seconds}
                if self.state_file is not None:  # several workers: the supervisor replaces them all
                    _write_state(self.state_file, {**_read_state(self.state_file), "source": str(source)})
                    if self.supervisor_pid:
                        os.kill(self.supervisor_pid, signal.SIGHUP)
                    return 202, {"status": "restarting workers", **answer}
                self.engine, self.source, self.loaded_at = engine, str(source), utc_now()
                log.info("reloaded %s: artifact %s replaces %s", source, engine.artifact_id, old.artifact_id)
                return 200, {"status": "reloaded", **answer}
        finally:
            self._reload_lock.release()

    @contextlib.contextmanager
    def _shared_lock(self) -> Any:
        """With several workers, one reload at a time across all of them (a file lock)."""
        if self.state_file is None:
            yield
            return
        with open(self.state_file.with_suffix(".lock"), "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ServeError(409, "reload_in_progress", "another reload is in progress; retry when it has finished") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def reload_on_signal(self) -> None:
        """SIGHUP: reload the current source, logging the outcome (never raising)."""
        try:
            _, answer = self.reload()
            log.warning("SIGHUP: %s", json.dumps(answer))
        except ServeError as e:
            log.error("SIGHUP: %s", e.message)


def _read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- request / answer shapes


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Body):
    users: list[StrictStr] = Field(description="user ids (the dataset's own strings)", examples=[["u1", "u2"]])
    k: StrictInt = Field(10, description="items per user (1 to the number of items)")
    behavior: StrictStr | None = Field(None, description="behavior to rank for (default: the target)")
    exclude: Literal["seen", "none"] = Field("seen", description="seen: leave out the protocol's mask (as `mbrec recommend`)")
    fallback: Literal["none", "popular"] = Field("none", description="popular: answer unknown users with the most popular items")


class ScoreRequest(_Body):
    user: StrictStr
    items: list[StrictStr] = Field(description="item ids to score")
    behavior: StrictStr | None = None


class ReloadRequest(_Body):
    path: StrictStr | None = Field(None, description="artifact or run folder on the server (default: the current source)")


class RankedItem(BaseModel):
    item: str
    score: float
    rank: int


class RecommendAnswer(BaseModel):
    user: str
    behavior: str
    fallback: Literal["popular"] | None = Field(None, description="'popular' when the user is unknown and fallback=popular")
    items: list[RankedItem]


class ScoredItem(BaseModel):
    item: str
    score: float
    seen: bool = Field(description="on the user's exclusion list (recommend never returns it)")


class ScoreAnswer(BaseModel):
    user: str
    behavior: str
    scores: list[ScoredItem]


class SimilarAnswer(BaseModel):
    item: str
    behavior: str
    items: list[RankedItem]


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class ErrorAnswer(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorAnswer} for s in (400, 404, 413, 415, 422)}


# ----------------------------------------------------------------------------- errors and limits


try:  # orjson (in the ``serve`` extra) encodes a 1,000-user answer about 20x faster than json
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ModuleNotFoundError:  # pragma: no cover - exercised only without the extra

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class FastJSONResponse(JSONResponse):
    """A JSON answer encoded with orjson when it is installed."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _json_text(text: str) -> Response:
    """An answer the engine already encoded."""
    return Response(content=text.encode("utf-8", errors="replace"), media_type="application/json")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return FastJSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next((e.get("ctx") or {} for e in errors if e.get("type") == "json_invalid"), {})
        return 400, "malformed_json", f"the request body is not valid JSON ({ctx.get('error', 'parse error')})"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid_request", "; ".join(parts) + more


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with a JSON 413."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await error_response(413, "body_too_large", f"the request body has {length.decode(errors='replace')[:20]} bytes; "
                                 f"at most {self.max_bytes:,} are accepted")(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge()
            return message

        await self.app(scope, limited, send)


class _BodyTooLarge(Exception):
    pass


# ----------------------------------------------------------------------------- the application


def create_app(engine: Engine, source: str | Path, *, admin_token: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
               max_body: int = DEFAULT_MAX_BODY, handle_sighup: bool = False, state_file: Path | None = None,
               supervisor_pid: int | None = None) -> FastAPI:
    """The FastAPI application serving ``engine`` (loaded from ``source``)."""
    state = ServingState(engine, str(source), admin_token=admin_token, max_batch=max_batch,
                         state_file=state_file, supervisor_pid=supervisor_pid)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        installed = False
        if handle_sighup:
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, state.reload_on_signal))
                installed = True
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
                log.warning("SIGHUP reload unavailable (not in the main thread)")
        yield
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)

    m = engine.manifest
    app = FastAPI(title="mbrec recommendation service", version=str(m.get("mbrec_version", "")), lifespan=lifespan,
                  description="Recommendations from an mbrec serving artifact; ids are the dataset's own strings. "
                              "See docs/serving.md.")
    app.state.serving = state

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype and any(e.get("loc", ())[:1] == ("body",) for e in exc.errors()):
            return error_response(415, "not_json", f"the request body must be JSON sent with Content-Type: application/json "
                                  f"(got {ctype[:60] or 'no Content-Type'})")
        return error_response(*_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"no endpoint {request.method} {request.url.path[:200]}" if exc.status_code in (404, 405) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI could not decode the body
            cause = exc.__cause__
            if isinstance(cause, _BodyTooLarge):
                return error_response(413, "body_too_large", f"the request body is larger than the {max_body:,} bytes accepted")
            why = "nested too deeply" if isinstance(cause, RecursionError) else f"{type(cause).__name__}: {str(cause)[:120]}"
            return error_response(400, "malformed_json", f"the request body is not valid JSON ({why})")
        return error_response(exc.status_code, code, message)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return error_response(413, "body_too_large", f"the request body is larger than the {max_body:,} bytes accepted")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; the server log has the details")

    @app.get("/healthz", summary="liveness and the artifact being served")
    async def healthz() -> dict[str, Any]:
        e = state.engine
        return {"status": "ok", "artifact_id": e.artifact_id, "model": e.manifest["model"],
                "dataset": e.manifest["dataset"], "loaded_at": state.loaded_at}

    @app.get("/v1/info", summary="the artifact's manifest")
    async def info() -> dict[str, Any]:
        return {**state.engine.info(), "source": state.source, "loaded_at": state.loaded_at,
                "limits": {"max_batch": state.max_batch, "max_body_bytes": max_body}}

    @app.get("/v1/recommend", response_model=None, responses={200: {"model": RecommendAnswer}, **_ERRORS},
             summary="top-k items for one user")
    async def recommend_one(
        user: str = Query(description="user id (the dataset's own string)"),
        k: int = Query(10, description="items to return"),
        behavior: str | None = Query(None, description="behavior to rank for (default: the target)"),
        exclude: Literal["seen", "none"] = Query("seen", description="seen: leave out the protocol's mask"),
        fallback: Literal["none", "popular"] = Query("none", description="popular: answer an unknown user with popular items"),
    ) -> Response:
        return _json_text(state.engine.recommend_json([user], behavior, k, exclude, fallback)[1:-1])

    @app.post("/v1/recommend", response_model=None, responses={200: {"model": list[RecommendAnswer]}, **_ERRORS},
              summary="top-k items for many users (one answer per user, in order)")
    def recommend_many(req: RecommendRequest) -> Response:
        if len(req.users) > state.max_batch:
            raise ServeError(413, "too_many_users", f"{len(req.users):,} users in one request; at most {state.max_batch:,} "
                             "(split the batch)")
        return _json_text(state.engine.recommend_json(req.users, req.behavior, req.k, req.exclude, req.fallback))

    @app.post("/v1/score", response_model=None, responses={200: {"model": ScoreAnswer}, **_ERRORS},
              summary="the model's scores of given items for one user")
    async def score(req: ScoreRequest) -> JSONResponse:
        if len(req.items) > state.max_batch:
            raise ServeError(413, "too_many_items", f"{len(req.items):,} items in one request; at most {state.max_batch:,}")
        return FastJSONResponse(state.engine.score(req.user, req.items, req.behavior))

    @app.get("/v1/similar", response_model=None, responses={200: {"model": SimilarAnswer}, **_ERRORS},
             summary="items closest to an item (cosine of the item representations)")
    async def similar(
        item: str = Query(description="item id"),
        k: int = Query(10, description="items to return"),
        behavior: str | None = Query(None, description="whose item representations (default: the target)"),
    ) -> JSONResponse:
        return FastJSONResponse(state.engine.similar(item, k, behavior))

    @app.post("/v1/admin/reload", response_model=None, responses={401: {"model": ErrorAnswer}, 403: {"model": ErrorAnswer},
                                                                 409: {"model": ErrorAnswer}, 422: {"model": ErrorAnswer}},
              summary=f"load a new artifact and swap it in (token: ${TOKEN_ENV})")
    def reload(request: Request, req: ReloadRequest | None = None) -> JSONResponse:
        state.check_admin(request)
        status, answer = state.reload(req.path if req else None)
        return FastJSONResponse(answer, status_code=status)

    if max_body:
        app.add_middleware(BodyLimit, max_bytes=max_body)
    return app


def create_app_from_env() -> FastAPI:
    """Factory of a multi-worker server's workers: the settings and the current source come
    from the state file named by ``$MBREC_SERVE_STATE`` (written by ``mbrec serve``)."""
    path = Path(os.environ[STATE_ENV])
    state = _read_state(path)
    threads = int(state.get("threads") or 1)
    from mbrec.threads import apply_threads

    apply_threads(threads)
    with contextlib.suppress(ValueError):  # the supervisor handles SIGHUP (replaces the workers)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    engine = open_source(state["source"])
    log.info("worker %d serves artifact %s from %s", os.getpid(), engine.artifact_id, state["source"])
    return create_app(engine, state["source"], admin_token=os.environ.get(TOKEN_ENV), max_batch=state["max_batch"],
                      max_body=state["max_body"], state_file=path, supervisor_pid=state.get("supervisor_pid"))
