"""``mbrec export`` (a run folder -> a serving artifact) and ``mbrec serve`` (HTTP)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from mbrec.errors import MbrecError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="write a self-contained serving artifact of a finished run (docs/serving.md)",
                       description="Exports the run's final user/item representations per scored behavior, the id "
                       "maps, the exclusion lists (the protocol's mask), popularity and a manifest with checksums. "
                       "Refuses a run whose config or data no longer match its fingerprint.")
    p.add_argument("run_dir", help="a finished run folder (mbrec train --out)")
    p.add_argument("out_dir", help="the new artifact folder (must not exist, or be empty)")
    p.add_argument("--max-dense-mb", type=float, default=1024.0,
                   help="largest dense score matrix written for a model without a serving extractor (default 1024)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as one JSON object")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve recommendations over HTTP (FastAPI + uvicorn: pip install 'mbrec[serve]')",
                       description="Serves an artifact (mbrec export) or a run folder (exported on start) on "
                       "HTTP; OpenAPI docs at /docs. Admin endpoints (POST /v1/admin/reload) need the token in "
                       "$MBREC_ADMIN_TOKEN and are disabled without it; SIGHUP reloads the current source.")
    p.add_argument("source", metavar="ARTIFACT_OR_RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--max-batch", type=int, default=1000, help="most users (or items) in one request (default 1000)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB (default 4)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.set_defaults(func=cmd_serve)


def _set_threads(args: argparse.Namespace, workers: int = 1) -> int:
    """Threads per process (torch's and NumPy's BLAS): ``--threads``, else mbrec's rule shared
    by the workers."""
    from mbrec.threads import apply_threads, default_threads

    n = args.threads if getattr(args, "threads", None) else max(1, default_threads() // workers)
    apply_threads(n)
    return n


def cmd_export(args: argparse.Namespace) -> int:
    from mbrec.serving.artifact import read_manifest
    from mbrec.serving.export import export_run

    _set_threads(args)
    start = time.perf_counter()
    out = export_run(args.run_dir, args.out_dir, max_dense_mb=args.max_dense_mb,
                     log=None if args.json else (lambda m: print(m, file=sys.stderr)))
    m = read_manifest(out)
    size = sum((out / f).stat().st_size for f in m["files"]) + (out / "manifest.json").stat().st_size
    summary = {"artifact": str(out), "model": m["model"], "dataset": m["dataset"],
               "scorers": {b: s["kind"] for b, s in m["scorers"].items()}, "files": len(m["files"]) + 1,
               "bytes": size, "seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        kinds = ", ".join(f"{b}: {k}" for b, k in summary["scorers"].items())
        print(f"exported {m['model']} on {m['dataset']} ({kinds}) to {out}: {summary['files']} files, "
              f"{size / 2**20:.1f} MiB, {summary['seconds']}s")
    return 0


def _check_serve_args(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise MbrecError(f"mbrec serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'mbrec[serve]'") from None
    if args.workers < 1:
        raise MbrecError(f"--workers must be at least 1, got {args.workers}")
    if not 0 <= args.port <= 65535:
        raise MbrecError(f"--port must be 0..65535, got {args.port}")
    if args.max_batch < 1 or args.max_body_mb <= 0:
        raise MbrecError("--max-batch and --max-body-mb must be positive")


def cmd_serve(args: argparse.Namespace) -> int:
    from mbrec.serving.app import STATE_ENV, TOKEN_ENV

    _check_serve_args(args)
    threads = _set_threads(args, args.workers)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s:     %(message)s")
    token = os.environ.get(TOKEN_ENV) or None
    if token and len(token) < 16:
        print(f"mbrec serve: warning: ${TOKEN_ENV} is shorter than 16 characters; use a long random token",
              file=sys.stderr)
    admin = "admin endpoints enabled" if token else f"admin endpoints disabled (set ${TOKEN_ENV} to enable)"
    max_body = int(args.max_body_mb * 2**20)
    import uvicorn

    opts = {"host": args.host, "port": args.port, "log_level": args.log_level, "access_log": not args.no_access_log}
    if args.workers == 1:
        from mbrec.serving.app import create_app, open_source

        engine = open_source(args.source)
        app = create_app(engine, args.source, admin_token=token, max_batch=args.max_batch, max_body=max_body,
                         handle_sighup=True)
        _announce(engine.manifest, engine.artifact_id, args, admin, threads)
        uvicorn.run(app, **opts)
        return 0
    with tempfile.TemporaryDirectory(prefix="mbrec-serve-") as tmp:
        source = _prepare_source(args.source, Path(tmp))
        state = Path(tmp) / "state.json"
        state.write_text(json.dumps({"source": str(source), "max_batch": args.max_batch, "max_body": max_body,
                                     "threads": threads, "supervisor_pid": os.getpid()}))
        os.environ[STATE_ENV] = str(state)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))  # numpy's GEMM in each worker
        from mbrec.serving.artifact import load_artifact

        art = load_artifact(source)
        _announce(art.manifest, art.artifact_id, args, admin, threads)
        uvicorn.run("mbrec.serving.app:create_app_from_env", factory=True, workers=args.workers, **opts)
    return 0


def _prepare_source(source: str, tmp: Path) -> Path:
    """With several workers, a run folder is exported once (into ``tmp``) for all of them."""
    p = Path(source)
    if (p / "config.yaml").is_file() and not (p / "manifest.json").is_file():
        from mbrec.serving.export import export_run

        print(f"exporting {p} for the workers ...", file=sys.stderr)
        return export_run(p, tmp / "artifact-0")
    return p


def _announce(manifest: dict, artifact_id: str, args: argparse.Namespace, admin: str, threads: int) -> None:
    print(f"mbrec serve: {manifest['model']} on {manifest['dataset']} (artifact {artifact_id}, "
          f"{manifest['n_users']:,} users, {manifest['n_items']:,} items, behaviors {manifest['scored_behaviors']}) "
          f"at http://{args.host}:{args.port} (docs: /docs); {args.workers} worker(s) x {threads} torch thread(s); "
          f"{admin}", file=sys.stderr, flush=True)
