"""No-config training defaults: a minimum of epochs before early stopping, and the ln 2 warning."""

from __future__ import annotations

import math

import yaml

from mbrec.config import build_config, config_from_dict
from mbrec.train import LN2, at_ln2, train


def test_at_ln2_needs_every_recent_epoch_near_ln2_and_only_pairwise_terms():
    near = {"loss": LN2, "bpr_buy": LN2 + 0.004, "cl": LN2, "pme_buy": 0.4}
    assert at_ln2([near] * 3) == {"bpr_buy"}
    assert at_ln2([near] * 2) == set()  # not yet three epochs
    assert at_ln2([{"bpr_buy": 0.5}, near, near]) == set()
    assert at_ln2([{"pme_buy": math.log(2)}] * 4) == {"pme_buy"}
    assert at_ln2([{"bpr": LN2 + 0.02}] * 3) == set()


def test_min_epochs_defaults_to_50_without_config_and_0_in_paper_configs():
    assert build_config("lightgcn", "synthetic").train.min_epochs == 50
    assert build_config("copf", "synthetic").train.min_epochs == 0  # no early stopping there
    assert build_config("lightgcn", "crgcn-beibei", config_file="configs/lightgcn/crgcn-beibei.yaml").train.min_epochs == 0


def test_a_run_folder_written_before_min_epochs_reads_as_no_minimum():
    d = build_config("rmbrec", "synthetic").to_dict()
    del d["train"]["min_epochs"]
    assert config_from_dict(d).train.min_epochs == 0


def test_early_stopping_waits_for_min_epochs(tmp_path):
    # lr 0: nothing improves after the first evaluation, so patience 1 would stop at epoch 3
    base = ["train.lr=0", "train.patience=1", "train.epochs=8", "train.progress=false", "model_args.n_layers=1"]
    early = train(build_config("lightgcn", "synthetic", overrides=base + ["train.min_epochs=0"]), out_dir=tmp_path / "a", quiet=True)
    late = train(build_config("lightgcn", "synthetic", overrides=base + ["train.min_epochs=6"]), out_dir=tmp_path / "b", quiet=True)
    assert early["epochs_run"] == 3 and late["epochs_run"] == 6
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["train"]["min_epochs"] == 6
