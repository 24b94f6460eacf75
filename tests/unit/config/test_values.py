"""Every value is checked where params are loaded, against what consumes it: every float key finite, every int key
within what torch and NumPy take (seeds within NumPy's), numbers nested in lists and mappings too, names valid where
they go (MLflow model URIs and filter strings, Optuna), storage strings that keep a study; one line naming the key."""

from __future__ import annotations

import math
import types
import typing
import unicodedata

import pytest

from onecycle.config import Params, parse_params
from onecycle.core.errors import ConfigError
from onecycle.core.values import INT_MAX, SEED_MAX


def _numeric_keys(kind: type) -> list[str]:
    """Every dotted key of params whose type takes a ``kind`` (alone, optional or beside a literal)."""
    keys = []
    for section, field in Params.model_fields.items():
        for key, sub in field.annotation.model_fields.items():
            ann = sub.annotation
            members = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
            if kind in members:
                keys.append(f"{section}.{key}")
    return keys


FLOAT_KEYS = _numeric_keys(float)
INT_KEYS = _numeric_keys(int)


def test_the_generic_checks_cover_every_number_key():
    assert {"lr_find.end_lr", "schedule.max_lr", "train.ema_decay", "model.width"} <= set(FLOAT_KEYS)
    assert {"train.seed", "tune.seed", "data.batch_size", "train.epochs", "lr_find.num_iter"} <= set(INT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e400])
def test_every_float_key_refuses_nan_and_inf_naming_it(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        parse_params({section: {name: value}})
    assert str(err.value).startswith(f"{key} ") and "\n" not in str(err.value)


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_key_refuses_what_torch_and_numpy_cannot_take(key):
    section, name = key.split(".")
    for value in (99999999999999999999999, 2**63, -(2**63) - 1):
        with pytest.raises(ConfigError) as err:
            parse_params({section: {name: value}})
        assert str(err.value).startswith(f"{key} ") and "\n" not in str(err.value)


def test_seeds_reach_numpys_range_and_no_further():
    assert parse_params({"train": {"seed": SEED_MAX}, "tune": {"seed": SEED_MAX}}).train.seed == SEED_MAX
    for key in ("train", "tune"):
        with pytest.raises(ConfigError, match=f"^{key}.seed must be <= {SEED_MAX}"):
            parse_params({key: {"seed": SEED_MAX + 1}})
        with pytest.raises(ConfigError, match=f"^{key}.seed must be >= 0"):
            parse_params({key: {"seed": -1}})
    with pytest.raises(ConfigError, match=f"^data.batch_size must be at most {INT_MAX}"):
        parse_params({"data": {"batch_size": INT_MAX + 1}})
    with pytest.raises(ConfigError, match="^data.num_workers must be <= 256"):
        parse_params({"data": {"num_workers": 100_000}})


def test_a_seed_at_the_top_of_its_range_trains_setup_without_overflow():
    import numpy as np
    import torch

    from onecycle.data.loaders import EpochSampler
    from onecycle.training.engine import seed_everything

    seed = parse_params({"train": {"seed": SEED_MAX}}).train.seed
    seed_everything(seed)
    sampler = EpochSampler(10, True, seed)
    sampler.set_epoch(10**6)
    assert sorted(sampler) == list(range(10))
    assert np.random.SeedSequence([seed, 10**6, 2**22]).generate_state(1)[0] >= 0
    assert torch.initial_seed() == seed


@pytest.mark.parametrize("raw, key", [
    ({"augment": {"train": [{"RandomCrop": {"height": math.inf, "width": 3}}]}}, "augment.train[0].RandomCrop.height"),
    ({"augment": {"eval": [{"Resize": {"height": 2**70, "width": 3}}]}}, "augment.eval[0].Resize.height"),
    ({"tune": {"space": {"schedule.max_lr": {"low": 1e-3, "high": math.nan}}}}, "tune.space.schedule.max_lr.high"),
    ({"optimizer": {"betas": [0.9, math.nan]}}, "optimizer.betas"),
])
def test_numbers_nested_in_lists_and_mappings_are_checked_too(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert str(err.value).startswith(key)


def test_a_sweep_whose_last_lr_is_no_float_is_refused():
    with pytest.raises(ConfigError, match="^lr_find.step_mult 1e\\+10 over 100 steps"):
        parse_params({"lr_find": {"step_mult": 1e10, "num_iter": 100}})


@pytest.mark.parametrize("key, value, message", [
    ("mlflow.registered_model", "team/resnet", "cannot hold '/'"),
    ("mlflow.registered_model", "resnet@best", "cannot hold '@'"),
    ("mlflow.registered_model", "o'neil", "cannot hold \"'\""),
    ("mlflow.registered_model", " resnet", "must not begin or end with a space"),
    ("mlflow.registered_model", "", "must be a name"),
    ("mlflow.experiment", "   ", "must be a name"),
    ("mlflow.experiment", "a\tb", "cannot hold '\\t'"),
    ("mlflow.experiment", "x" * 251, "at most 250 characters"),
    ("tune.study_name", 'the "best"', "cannot hold '\"'"),
    ("tune.study_name", "study\n", "must not begin or end with a space"),
    ("tune.storage", "", "is empty"),
    ("tune.storage", "sqlite://", "in memory"),
    ("tune.storage", "sqlite+pysqlite:///:memory:", "in memory"),
    ("tune.storage", "postgresql:/optuna", "without '//'"),
])
def test_names_and_storage_strings_are_valid_where_they_go(key, value, message):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        parse_params({section: {name: value}})
    assert str(err.value).startswith(key) and message in str(err.value), str(err.value)


def test_names_are_kept_as_users_see_them():
    nfd = unicodedata.normalize("NFD", "études")
    params = parse_params({"mlflow": {"experiment": nfd, "registered_model": "résnet-1"}, "tune": {"study_name": nfd}})
    assert params.mlflow.experiment == params.tune.study_name == unicodedata.normalize("NFC", "études")
    assert params.mlflow.registered_model == "résnet-1" and parse_params({}).mlflow.registered_model
