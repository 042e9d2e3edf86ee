"""benchmarks/bench_scale.py: data generation, one measurement per fresh process, the merged
JSON, the table and the plot, on 500 users."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mbrec.data.registry import load_dataset

REPO = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks" / "bench_scale.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = mod
    spec.loader.exec_module(mod)
    return mod


bs = _module()


def test_parse_count_and_generator_options() -> None:
    assert [bs.parse_count(s) for s in ("20k", "1M", "300", "0.5k")] == [20_000, 1_000_000, 300, 500]
    opts = bs.generator_options(80_000, 0.5, 20.0, 256)
    assert opts == {"n_users": 80_000, "n_items": 16_000, "views_per_user": 20.0, "candidates": 256}
    assert bs.generator_options(20_000, 1.0, 20.0, 0)["n_items"] == 8_000


def test_driver_writes_data_json_table_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "scale.png"
    bs.main(["--sizes", "500", "--models", "lightgcn", "--nprocs", "1", "--steps", "3", "--dir", str(tmp_path),
             "--png", str(png)])
    folder = bs.data_folder(tmp_path, 500)
    info = json.loads((folder / "info.json").read_text())
    data = load_dataset(folder)
    assert data.n_users == 500 and data.n_items == info["items"] == 1265
    assert sum(sum(v.values()) for v in data.counts().values()) == info["interactions"]
    results = json.loads((tmp_path / "scale.json").read_text())
    run = results["runs"]["500/lightgcn/1"]
    for key in ("load_s", "graph_s", "step_s", "epoch_s", "eval_s", "peak_rss_mb", "loadavg_before", "command"):
        assert key in run, key
    assert run["epoch_kind"] == "measured" and run["timed_steps"] == run["steps_per_epoch"]
    assert run["eval_users"] == 500 and run["peak_rss_mb"] >= run["rss_mb"]["load"] > 0
    assert png.stat().st_size > 1000
    # a second call reuses the data and the measurement; the table lists it
    before = (folder / "interactions.parquet").stat().st_mtime_ns
    bs.main(["--sizes", "500", "--models", "lightgcn", "--nprocs", "1", "--dir", str(tmp_path), "--png", str(png)])
    assert (folder / "interactions.parquet").stat().st_mtime_ns == before
    assert "| 500 | 1,265 |" in bs.table(json.loads((tmp_path / "scale.json").read_text()))


def test_watchdog_stops_a_child_over_the_memory_limit() -> None:
    with pytest.raises(RuntimeError, match="max-rss-gb"):
        bs.run_child([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(5)"], 0.05)
