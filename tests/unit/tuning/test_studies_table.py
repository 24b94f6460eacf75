"""`optuna studies` reads on 160 columns: a study's user attrs hold the digest of its fixed params, not the params
(they are a system attr, still read back to name the keys a refused worker differs in)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from onecycle.config import parse_params
from onecycle.core.errors import ConfigError
from onecycle.tuning.reproduce import FIXED_ATTR, check_fixed, fixed_digest, fixed_params

BIN = Path(sys.executable).parent


def _fixed(**data) -> dict:
    params = parse_params({"data": data})
    return fixed_params(params.flat(), {"schedule.max_lr", "schedule.pct_start", "schedule.div_factor"})


def test_optuna_studies_prints_a_table_that_fits_160_columns(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name="onecycle", storage=storage, direction="maximize")
    study.set_user_attr("metric", "val/top1")
    fixed = _fixed()
    assert len(str(fixed)) > 1000  # what the table used to print
    check_fixed(study, storage, fixed)
    assert study.user_attrs[FIXED_ATTR] == fixed_digest(fixed)
    out = subprocess.run([BIN / "optuna", "studies", "--storage", url], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "onecycle" in out and fixed_digest(fixed) in out
    assert max(len(line) for line in out.splitlines()) <= 160, out


def test_a_worker_with_other_fixed_params_is_still_told_which_keys_differ(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    check_fixed(study, storage, _fixed())
    check_fixed(study, storage, _fixed())  # the same: joins
    with pytest.raises(ConfigError, match=r"holds other params fixed: data.batch_size \(\"auto\" in the study, 64 "):
        check_fixed(study, storage, _fixed(batch_size=64))
    check_fixed(study, storage, _fixed(batch_size=64), force=True)


def test_a_study_that_recorded_its_fixed_params_in_full_is_shortened_and_still_checked(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="old", storage=storage)
    study.set_user_attr(FIXED_ATTR, _fixed())  # how a study recorded them before
    with pytest.raises(ConfigError, match="data.batch_size"):
        check_fixed(study, storage, _fixed(batch_size=64))
    assert study.user_attrs[FIXED_ATTR] == fixed_digest(_fixed())
    check_fixed(study, storage, _fixed())
