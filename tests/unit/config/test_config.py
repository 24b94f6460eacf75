"""params.yaml: the defaults, the repository's file, and one clear line per malformed value."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, _write_params, defaults
from onecycle.config import Params, load_params, parse_params
from onecycle.core.errors import ConfigError
from onecycle.data.store import sized

REPO = Path(__file__).resolve().parents[3]


def test_defaults_load_with_the_documented_values():
    p = parse_params({})
    assert p.data.dataset == "fashion_mnist" and p.data.source is None and p.data.val_size == "auto"
    assert p.model.name == "resnet9" and p.model.stem == "cifar" and p.model.width == 0.25  # as params.yaml
    assert p.data.batch_size == "auto" and p.train.channels_last is True
    fashion = sized(p.data, 60_000)  # Fashion-MNIST's training split: 5000 held out, batches of 256, as always
    assert (fashion.val_size, fashion.batch_size) == (5000, 256)
    assert p.schedule.max_lr == "auto" and p.schedule.pct_start == 0.25 and p.schedule.anneal_strategy == "cos"
    assert p.lr_find.start_lr == 1e-3 and p.lr_find.end_lr == 10.0 and p.lr_find.num_iter == 30
    assert p.optimizer.name == "sgd" and p.optimizer.betas == (0.9, 0.999)
    assert p.train.device == "auto" and p.train.amp == "auto"
    assert parse_params(None) == p  # an empty params.yaml is the defaults


def test_the_repository_params_yaml_loads():
    p = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert p.data.dataset == raw["data"]["dataset"]
    assert p.model.width == raw["model"]["width"]
    assert p.schedule.max_lr == raw["schedule"]["max_lr"]
    assert p.train.epochs == raw["train"]["epochs"]


def test_the_defaults_written_to_a_file_load_back_equal(tmp_path, write_params):
    p = load_params(write_params(tmp_path))
    assert p.model_dump(mode="json") == {**defaults(), "data": {**defaults()["data"], "root": str(tmp_path / "data")}}


def test_overrides_are_applied(tmp_path, write_params):
    p = load_params(write_params(tmp_path, schedule={"max_lr": 0.4, "pct_start": 0.3}, model={"name": "resnet18", "width": 1.0}))
    assert (p.schedule.max_lr, p.schedule.pct_start, p.model.name) == (0.4, 0.3, "resnet18")
    assert p.schedule.div_factor == 25.0  # untouched keys keep their defaults


def test_numbers_in_yaml_exponent_form_are_numbers(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; users write it that way in `dvc exp run -S`.
    path = tmp_path / "params.yaml"
    path.write_text("schedule:\n  max_lr: 1e-3\nlr_find:\n  start_lr: 1e-7\n  end_lr: 1\n")
    p = load_params(path)
    assert p.schedule.max_lr == pytest.approx(1e-3) and p.lr_find.start_lr == pytest.approx(1e-7)


def test_booleans_are_still_booleans(tmp_path, write_params):
    p = load_params(write_params(tmp_path, train={"amp": True, "resume": False}, optimizer={"nesterov": False}))
    assert (p.train.amp, p.train.resume, p.optimizer.nesterov) == (True, False, False)


def test_missing_params_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


# (sections to write, text the one-line message must start with, text it must also contain)
BAD = [
    pytest.param({"bogus": {"x": 1}}, "unknown key bogus", "allowed in the top level: data, augment", id="top-level-key"),
    pytest.param({"data": {"batchsize": 64}}, "unknown key data.batchsize", "did you mean data.batch_size?",
                 id="section-key"),
    pytest.param({"schedule": {"max_lrr": 0.1}}, "unknown key schedule.max_lrr", "schedule.max_lr", id="typo-key"),
    pytest.param({"data": 5}, "data must be a mapping", "got 5", id="section-not-mapping"),
    pytest.param({"data": {"batch_size": 0}}, "data.batch_size must be > 0", "got 0", id="batch-size-zero"),
    pytest.param({"data": {"batch_size": "big"}}, "data.batch_size must be an integer", "'big'", id="batch-size-str"),
    pytest.param({"data": {"val_size": -1}}, "data.val_size must be >= 0", "got -1", id="val-size-negative"),
    pytest.param({"data": {"dataset": "mnist"}}, "data.dataset must be one of 'fashion_mnist', 'cifar10'",
                 "got 'mnist'", id="unknown-dataset"),
    pytest.param({"data": {"dataset": "imagefolder", "source": "/no/such/folder"}}, "data.source must be an existing folder",
                 "'/no/such/folder'", id="imagefolder-missing-source"),
    pytest.param({"data": {"dataset": "imagefolder", "source": None}}, "data.source must name a folder", "imagefolder",
                 id="imagefolder-no-source"),
    pytest.param({"model": {"name": "resnet7"}},
                 "model.name must be one of 'resnet9', 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'",
                 "got 'resnet7'", id="unknown-model"),
    pytest.param({"model": {"name": "resnet50", "width": 0.5}}, "model.width must be 1 for resnet50", "got 0.5",
                 id="width-resnet50"),
    pytest.param({"model": {"width": 0}}, "model.width must be > 0", "got 0", id="width-zero"),
    pytest.param({"model": {"width": "wide"}}, "model.width must be a number", "'wide'", id="width-str"),
    pytest.param({"model": {"stem": "tiny"}}, "model.stem must be one of 'cifar', 'imagenet'", "'tiny'", id="stem"),
    pytest.param({"optimizer": {"name": "lamb"}}, "optimizer.name must be one of 'sgd', 'adam', 'adamw'", "'lamb'",
                 id="unknown-optimizer"),
    pytest.param({"optimizer": {"momentum": 1.0}}, "optimizer.momentum must be < 1", "got 1.0", id="momentum-one"),
    pytest.param({"optimizer": {"nesterov": "maybe"}}, "optimizer.nesterov must be true or false", "'maybe'",
                 id="bool"),
    pytest.param({"optimizer": {"betas": [0.9]}}, "optimizer.betas must be two numbers in [0, 1)", "[0.9]",
                 id="betas-short"),
    pytest.param({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas must be two numbers in [0, 1)", "1.5",
                 id="betas-range"),
    pytest.param({"optimizer": {"weight_decay": -0.1}}, "optimizer.weight_decay must be >= 0", "-0.1", id="wd"),
    pytest.param({"schedule": {"pct_start": 1.5}}, "schedule.pct_start must be in (0, 1), got 1.5", "",
                 id="pct-start"),
    pytest.param({"schedule": {"pct_start": 0}}, "schedule.pct_start must be in (0, 1), got 0", "", id="pct-start-0"),
    pytest.param({"schedule": {"max_lr": -0.1}}, "schedule.max_lr must be a positive number or auto", "-0.1",
                 id="max-lr-negative"),
    pytest.param({"schedule": {"max_lr": 0}}, "schedule.max_lr must be a positive number or auto", "got 0",
                 id="max-lr-zero"),
    pytest.param({"schedule": {"max_lr": "fast"}}, "schedule.max_lr must be a number or 'auto'", "got 'fast'",
                 id="max-lr-word"),
    pytest.param({"schedule": {"div_factor": 0}}, "schedule.div_factor must be > 0", "got 0", id="div-factor-0"),
    pytest.param({"schedule": {"final_div_factor": -10}}, "schedule.final_div_factor must be > 0", "got -10",
                 id="final-div-factor"),
    pytest.param({"schedule": {"anneal_strategy": "step"}}, "schedule.anneal_strategy must be one of 'cos', 'linear'",
                 "'step'", id="anneal"),
    pytest.param({"schedule": {"base_momentum": 0.96}}, "schedule.base_momentum must not exceed schedule.max_momentum",
                 "0.96", id="momenta"),
    pytest.param({"schedule": {"peak_epoch": 9}}, "schedule.peak_epoch must be below train.epochs (4)", "got 9",
                 id="peak-epoch"),
    pytest.param({"lr_find": {"start_lr": 10, "end_lr": 1}}, "lr_find.start_lr must be below lr_find.end_lr", "got 10",
                 id="start-above-end"),
    pytest.param({"lr_find": {"start_lr": 1.0, "end_lr": 1.0}}, "lr_find.start_lr must be below lr_find.end_lr",
                 "got 1", id="start-equals-end"),
    pytest.param({"lr_find": {"start_lr": -1e-7}}, "lr_find.start_lr must be > 0", "-1e-07", id="start-negative"),
    pytest.param({"lr_find": {"num_iter": 9}}, "lr_find.num_iter must be >= 10", "got 9", id="num-iter"),
    pytest.param({"lr_find": {"smooth": 1.0}}, "lr_find.smooth must be in [0, 1)", "got 1.0", id="smooth"),
    pytest.param({"lr_find": {"mode": "linear", "step_mult": 1.1}}, "lr_find.step_mult only applies when lr_find.mode is exp",
                 "", id="step-mult-linear"),
    pytest.param({"train": {"epochs": 0}}, "train.epochs must be > 0", "got 0", id="epochs-zero"),
    pytest.param({"train": {"epochs": 2.5}}, "train.epochs must be a whole number", "2.5", id="epochs-fraction"),
    pytest.param({"train": {"epochs": True}}, "train.epochs must be a number", "got true", id="epochs-bool"),
    pytest.param({"schedule": {"max_lr": True}}, "schedule.max_lr must be a number", "got true", id="max-lr-bool"),
    pytest.param({"train": {"device": "tpu"}}, "train.device must be one of 'auto', 'cpu', 'cuda', 'mps'", "'tpu'",
                 id="device"),
    pytest.param({"train": {"amp": "fp8"}}, "train.amp must be one of 'auto', false, true, 'fp16', 'bf16'", "'fp8'", id="amp"),
    pytest.param({"train": {"label_smoothing": 1.0}}, "train.label_smoothing must be in [0, 1)", "1.0", id="smoothing"),
    pytest.param({"mlflow": {"log_checkpoints": "some"}}, "mlflow.log_checkpoints must be one of 'none', 'best', 'all'",
                 "'some'", id="log-checkpoints"),
    pytest.param({"augment": {"train": ["HorizontalFlp"]}}, "augment.train[0] unknown transform 'HorizontalFlp'",
                 "did you mean HorizontalFlip", id="transform-typo"),
    pytest.param({"augment": {"train": ["HorizontalFlip", {"RandomCrop": {"hieght": 28, "width": 28}}]}},
                 "augment.train[1].RandomCrop has no argument 'hieght'", "allowed: height, width", id="transform-arg"),
    pytest.param({"augment": {"train": [{"RandomCrop": {"height": -28, "width": 28}}]}},
                 "augment.train[0].RandomCrop bad arguments: height", "got -28", id="transform-bad-value"),
    pytest.param({"augment": {"train": [5]}}, "augment.train[0] must be a transform name or a one-key mapping", "got 5",
                 id="transform-not-a-name"),
    pytest.param({"augment": {"train": "HorizontalFlip"}}, "augment.train must be a list", "'HorizontalFlip'",
                 id="augment-not-list"),
    pytest.param({"augment": {"eval": ["HorizontalFlip"]}}, "augment.eval[0] HorizontalFlip is random", "deterministic",
                 id="random-eval"),
    pytest.param({"augment": {"eval": [{"Rotate": {"limit": 10, "p": 1.0}}]}}, "augment.eval[0] Rotate is random",
                 "deterministic", id="random-eval-p1"),
]


@pytest.mark.parametrize(("sections", "starts", "contains"), BAD)
def test_malformed_params_fail_with_one_line_naming_the_key(tmp_path, sections, starts, contains):
    with pytest.raises(ConfigError) as info:
        load_params(_write_params(tmp_path, **sections))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(starts), msg
    assert contains in msg, msg
    for jargon in ("Input should", "validation error", "literal[", "function-after", "errors.pydantic.dev", "[type="):
        assert jargon not in msg, msg


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  dataset: fashion_mnist\n  batch_size: [64\nmodel:\n  name: resnet9\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path} is not valid YAML at line ")


def test_a_key_given_twice_is_refused(tmp_path):
    # PyYAML would silently keep the last value; the first one (what the user may be reading) would be ignored.
    path = tmp_path / "params.yaml"
    path.write_text("schedule:\n  max_lr: 0.1\n  pct_start: 0.3\n  max_lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"at line 4: duplicate key 'max_lr'"):
        load_params(path)


def test_a_params_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- data\n- model\n")
    with pytest.raises(ConfigError, match=r"params.yaml holds no params \(a mapping of sections .* but a YAML list$"):
        load_params(path)


def test_replace_validates_like_a_loaded_file():
    p = parse_params({})
    assert p.replace(schedule={"max_lr": 0.2}).schedule.max_lr == 0.2
    with pytest.raises(ConfigError, match=r"^schedule.pct_start must be in \(0, 1\), got 1.5$"):
        p.replace(schedule={"pct_start": 1.5})


def test_flat():
    p = parse_params({})
    flat = p.flat()
    assert flat["schedule.pct_start"] == 0.25 and flat["model.name"] == "resnet9" and flat["augment.train"] == []
    assert isinstance(p, Params)


@pytest.mark.parametrize(("sections", "key"), [
    pytest.param({"schedule": {"pct_start": 1.5}}, "schedule.pct_start must be in (0, 1), got 1.5", id="pct-start"),
    pytest.param({"model": {"name": "resnet7"}}, "model.name must be one of", id="model"),
    pytest.param({"augment": {"train": ["HorizontalFlp"]}}, "augment.train[0] unknown transform", id="transform"),
])
def test_the_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, sections, key):
    params = _write_params(tmp_path, **sections)
    proc = subprocess.run([PYTHON, "-m", "onecycle", "fetch", "--params", str(params)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onecycle fetch: error: ") and key in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
