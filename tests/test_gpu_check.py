"""``scripts/gpu_check.sh`` (the prepared GPU check): its dry run names every model, with the
settings the check depends on, and the script parses (and passes shellcheck where installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mbrec.models.base import available_models

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(*args: str) -> list[str]:
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_dry_run_trains_and_benches_every_model_on_cuda():
    lines = dry_run()
    for model in available_models():
        data = "hkuds-beibei" if model in ("copf", "pkef") else "crgcn-beibei"
        train = [ln for ln in lines if f" -m mbrec train {model} {data} " in ln]
        bench = [ln for ln in lines if f" -m mbrec bench {model} {data} " in ln]
        assert len(train) == 1 and len(bench) == 1, f"{model}: {train} {bench}"
        assert "--device cuda" in train[0] and "--set train.epochs=1" in train[0] and "--json" in train[0]
        assert "--steps 20" in bench[0] and "--device cuda" in bench[0]
        config = REPO / "configs" / model / f"{data}.yaml"
        if config.is_file():
            flag = f"--config configs/{model}/{data}.yaml"
            assert flag in train[0] and flag in bench[0]
        else:
            assert "--config" not in train[0] and "model defaults" in train[0]
    assert any("pip install torch==2.13.0" in ln for ln in lines)
    assert any("venv --system-site-packages" in ln for ln in lines)


def test_dry_run_options():
    lines = dry_run("--no-install", "--models", "lightgcn,pkef", "--dataset", "synthetic", "--device", "cpu",
                    "--steps", "3")
    runs = [ln for ln in lines if " -m mbrec " in ln]
    assert len(runs) == 4 and all(" synthetic " in ln and "--device cpu" in ln for ln in runs)
    assert not any("pip install" in ln for ln in lines)
    assert any("bench pkef synthetic --config configs/pkef/synthetic.yaml --steps 3" in ln for ln in runs)


def test_dry_run_unpacks_a_data_archive(tmp_path):
    lines = dry_run("--data-archive", str(tmp_path / "beibei.tgz"))
    assert any(ln.startswith("tar -xzf ") and "beibei.tgz" in ln for ln in lines)
    assert any(ln.startswith("# datasets: ") and ln.endswith("/datasets") for ln in lines)


def test_bad_arguments_are_refused():
    for args in (["--bogus"], ["--steps", "x"]):
        done = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "gpu_check.sh" in done.stderr


def test_script_parses_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=60).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
