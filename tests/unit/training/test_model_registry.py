"""The model registry: ``model.name`` takes exactly the registered models or a user's ``"package.module:factory"``;
a bad import path is one line naming model.name; a factory written into a workspace trains through lr_find, train
(resumed, and started fresh when its architecture changed), evaluate and publish, and the published model loads and
answers in a fresh process where the workspace is not importable."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from onecycle.config import ModelConfig, load_params, parse_params
from onecycle.core.errors import ConfigError
from onecycle.training import checkpoint as ckpt
from onecycle.training.model_registry import MODELS, code_of, is_import_path
from onecycle.training.models import ResNet9, build_model
from tiny import tiny_params, write_fetched

BIN = Path(sys.executable).parent
BUILT_INS = ("resnet9", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """``tmp_path`` as the cwd and on the import path, as every onecycle command puts its workspace (the stages are
    called as functions here); the modules imported from it are forgotten after the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


# ----------------------------------------------------------------------------------------------- the registry

def test_the_registry_holds_the_built_in_resnets_and_config_takes_exactly_them():
    assert MODELS.names() == BUILT_INS
    for name in BUILT_INS:
        assert callable(MODELS[name].factory_function())
        assert parse_params({"model": {"name": name, "width": 0.25 if name == "resnet9" else 1.0}}).model.name == name
    with pytest.raises(ConfigError) as err:
        parse_params({"model": {"name": "resnet8"}})
    listed = ", ".join(repr(n) for n in BUILT_INS)
    assert str(err.value) == (f"model.name must be one of {listed}, or an import path 'package.module:factory' of "
                              f"your own model; got 'resnet8'")


@pytest.mark.parametrize("name", ["mymodels.net:build", "net:build", "a.b.c:Factory.create", "_x:_y"])
def test_config_takes_an_import_path(name):
    assert is_import_path(name)
    model = parse_params({"model": {"name": name}}).model
    assert (model.name, model.width, model.whiten) == (name, 1.0, False)  # full width; no whitening layer to set


@pytest.mark.parametrize("name", ["mymodels.net", "mymodels.net:", ":build", "my-models.net:build", "a..b:f",
                                  "a:b:c", "a.b:f()", "a b:f", ""])
def test_config_refuses_what_is_not_an_import_path(name):
    assert not is_import_path(name)
    with pytest.raises(ConfigError, match=r"^model.name must be one of 'resnet9', .* got "):
        parse_params({"model": {"name": name}})


@pytest.mark.parametrize(("options", "line"), [
    ({"stem": "imagenet"}, "model.stem must be cifar for mymodels.net:build (it is built as "
                           "factory(num_classes, in_channels)), got 'imagenet'"),
    ({"zero_init_residual": True}, "model.zero_init_residual must be false for mymodels.net:build (it is built as "
                                   "factory(num_classes, in_channels)), got True"),
])
def test_a_user_factory_refuses_the_resnet_options_it_does_not_take(options, line):
    with pytest.raises(ConfigError) as err:
        parse_params({"model": {"name": "mymodels.net:build", **options}})
    assert str(err.value) == line
    model = parse_params({"model": {"name": "mymodels.net:build", "whiten": True, "width": 0.25}}).model
    # params.yaml's resnet9 options (whiten: true, width: 0.25) do not stop a user's model, and are logged as used
    assert model.whiten is False and model.width == 1.0


def test_params_load_without_torch():
    code = ("import sys; from onecycle.config import parse_params; "
            "m = parse_params({'model': {'name': 'mymodels.net:build'}}).model; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(m.name)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "mymodels.net:build", proc.stderr


def test_a_registered_model_is_built_as_its_class_builds_it():
    torch.manual_seed(0)
    direct = ResNet9(10, 1, 0.25, "cifar", False, True).state_dict()
    torch.manual_seed(0)
    registered = build_model(ModelConfig(), 10, 1).state_dict()
    assert direct.keys() == registered.keys() and all(torch.equal(direct[k], registered[k]) for k in direct)


# ----------------------------------------------------------------------------------------------- a user's factory

NET = """
    from torch import nn


    def build(num_classes, in_channels):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
"""


def test_a_factory_in_the_workspace_is_built_with_the_datasets_classes_and_channels(workspace):
    write(workspace, {"userfactory_ok/__init__.py": "", "userfactory_ok/net.py": NET})
    net = build_model(ModelConfig(name="userfactory_ok.net:build"), 7, 3)
    assert isinstance(net, nn.Sequential) and net[0].in_channels == 3 and net[-1].out_features == 7
    assert code_of("userfactory_ok.net:build") == workspace / "userfactory_ok"  # the whole package is served
    write(workspace, {"userfactory_single.py": NET})
    assert code_of("userfactory_single:build") == workspace / "userfactory_single.py"
    assert code_of("resnet9") is None and code_of("onecycle.training.models:resnet9") is None


@pytest.mark.slow
def test_an_exported_space_runs_the_factorys_network_without_the_workspace(workspace, tmp_path_factory):
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    from onecycle.config import AugmentConfig
    from onecycle.serving.modelfile import save_model
    from onecycle.serving.space_export import export_space

    write(workspace, {"userspace_pkg/__init__.py": "", "userspace_pkg/net.py": NET})
    model = ModelConfig(name="userspace_pkg.net:build")
    info = SimpleNamespace(name="fashion_mnist", classes=[f"c{i}" for i in range(10)], image_shape=(28, 28, 1),
                           mean=[0.5], std=[0.25])
    save_model(model, AugmentConfig(), info, build_model(model, 10, 1).state_dict(), workspace / "model.pt")
    space = export_space(tmp_path_factory.mktemp("space"), workspace / "model.pt", info, [], 3, "model.pt")
    assert (space / "model.onnx").is_file() and not (space / "model.pt").exists()  # the network is in the graph
    code = ("import sys; sys.path.insert(0, '.'); import numpy as np; from pathlib import Path; "  # as the Space's app.py
            "from onecycle.serving.inference import load_predictor; "
            "p, _, _ = load_predictor(Path('model.onnx'), None, 'cpu'); print(p(np.zeros((2, 1, 28, 28), np.float32)).shape, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('userspace_pkg', 'torch')))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=space, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(2, 10) []"


BAD = {  # case -> (files written into the workspace, model.name, the one line build_model gives)
    "no-module": ({}, "userbad_none.net:build",
                  "model.name 'userbad_none.net:build': no module userbad_none.net in the workspace (the folder "
                  "onecycle runs in) or the installed packages"),
    "no-submodule": ({"userbad_sub/__init__.py": ""}, "userbad_sub.net:build",
                     "model.name 'userbad_sub.net:build': no module userbad_sub.net in the workspace (the folder "
                     "onecycle runs in) or the installed packages"),
    "syntax": ({"userbad_syntax.py": "def build(:\n"}, "userbad_syntax:build",
               "model.name 'userbad_syntax:build': importing userbad_syntax failed: SyntaxError: invalid syntax "
               "(userbad_syntax.py, line 1) (userbad_syntax.py:1)"),
    "raises-on-import": ({"userbad_raise.py": "import os\nundefined_thing\n"}, "userbad_raise:build",
                         "model.name 'userbad_raise:build': importing userbad_raise failed: NameError: name "
                         "'undefined_thing' is not defined (userbad_raise.py:2)"),
    "missing-dependency": ({"userbad_dep.py": "import no_such_library_here\n"}, "userbad_dep:build",
                           "model.name 'userbad_dep:build': importing userbad_dep failed: ModuleNotFoundError: No "
                           "module named 'no_such_library_here' (userbad_dep.py:1)"),
    "no-attribute": ({"userbad_attr.py": "x = 1\n"}, "userbad_attr:build",
                     "model.name 'userbad_attr:build': module userbad_attr (userbad_attr.py) has no attribute 'build'"),
    "not-callable": ({"userbad_value.py": "build = 3\n"}, "userbad_value:build",
                     "model.name 'userbad_value:build': userbad_value.build (userbad_value.py) is a int, not a "
                     "function build(num_classes, in_channels) returning a torch.nn.Module"),
    "wrong-signature": ({"userbad_sig.py": "def build(num_classes):\n    return None\n"}, "userbad_sig:build",
                        "model.name 'userbad_sig:build': userbad_sig.build(10, 1) raised TypeError: build() takes 1 "
                        "positional argument but 2 were given"),
    "raises": ({"userbad_call.py": "def build(num_classes, in_channels):\n    return 1 / 0\n"}, "userbad_call:build",
               "model.name 'userbad_call:build': userbad_call.build(10, 1) raised ZeroDivisionError: division by "
               "zero (userbad_call.py:2)"),
    "not-a-module": ({"userbad_list.py": "def build(num_classes, in_channels):\n    return [num_classes]\n"},
                     "userbad_list:build",
                     "model.name 'userbad_list:build': userbad_list.build(10, 1) returned a list, not a "
                     "torch.nn.Module"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_import_path_is_one_line_naming_model_name_and_the_module(workspace, case):
    files, name, line = BAD[case]
    write(workspace, files)
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=name), 10, 1)
    assert str(err.value) == line


def test_the_cli_says_what_is_wrong_with_the_factory_in_one_line_and_exits_2(workspace):
    write_fetched(workspace / "data", n_train=300, n_test=20)  # enough for tiny_params' 128 validation images
    write(workspace, {"userbad_cli/__init__.py": "", "userbad_cli/net.py": "from torch import nn\nnn.Conv3x3\n"})
    tiny_params(workspace, model={"name": "userbad_cli.net:build", "width": 1.0})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([BIN / "onecycle", "lr-find"], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=300)  # the console script: its path has no workspace until the command puts it
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "onecycle lr-find: error: model.name 'userbad_cli.net:build': importing userbad_cli.net failed: "
        "AttributeError: module 'torch.nn' has no attribute 'Conv3x3' (userbad_cli/net.py:2)"]
    assert not (workspace / "reports").exists()


# ----------------------------------------------------------------------------------------------- the whole pipeline

PACKAGE = {  # a package of two modules: the served model must ship both
    "tinynets/__init__.py": "",
    "tinynets/blocks.py": """
        from torch import nn


        def conv_bn(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
    """,
    "tinynets/convnet.py": """
        from torch import nn

        from tinynets.blocks import conv_bn

        WIDTH = 8


        def build(num_classes, in_channels):
            return nn.Sequential(conv_bn(in_channels, WIDTH), nn.MaxPool2d(2), conv_bn(WIDTH, 2 * WIDTH),
                                 nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * WIDTH, num_classes))
    """,
}
SERVE = """
import json, sys
import pandas as pd
import mlflow.pyfunc

try:
    import tinynets
    raise SystemExit(f"tinynets is importable before the model loads: {tinynets.__file__}")
except ModuleNotFoundError:
    pass
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict(pd.DataFrame({"image": [open(sys.argv[2], "rb").read()]}), params={"k": 3})
print(json.dumps({"answer": answer[0], "imported": sorted(m for m in sys.modules if m.startswith(("tinynets", "torch")))}))
"""


def _crash_at(call: int):
    """An optimizer step that raises KeyboardInterrupt at its ``call``-th call (a kill mid-training)."""
    from onecycle.training.engine import train_step

    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return train_step(*args, **kwargs)

    return step


def _forget_tinynets() -> None:
    """What a new process sees: the package imported again from its files."""
    for name in [m for m in sys.modules if m == "tinynets" or m.startswith("tinynets.")]:
        del sys.modules[name]


@pytest.mark.slow
def test_a_factory_model_trains_resumes_evaluates_and_is_served_without_its_workspace(workspace, tmp_path_factory,
                                                                                     capsys, caplog):
    import mlflow
    from PIL import Image

    from onecycle.core.paths import Workspace
    from onecycle.stages import evaluate, lr_find, predict, publish, train
    from onecycle.stages.command import guarded

    caplog.set_level(logging.INFO, logger="onecycle")
    work = workspace
    write_fetched(work / "data", n_train=400, n_test=100)
    write(work, PACKAGE)
    tiny_params(work, data={"val_size": 64}, model={"name": "tinynets.convnet:build", "width": 1.0},
                schedule={"max_lr": "auto"}, mlflow={"registered_model": "tiny-factory"})
    params, ws = load_params(work / "params.yaml"), Workspace(work)
    _forget_tinynets()

    assert guarded("lr_find", lambda: lr_find.run(params, ws, progress=False) and 0) == 0
    assert json.loads(ws.lr_find_json.read_text())["suggested_lr"] > 0

    # 336 training images in batches of 64: 6 steps an epoch; killed at the first step of epoch 2, then resumed
    assert guarded("train", lambda: train.run(params, ws, step_fn=_crash_at(7), progress=False)) == 130
    first = ckpt.load(work / "checkpoints/last.pt")
    assert first["epoch"] == 1
    assert guarded("train", lambda: train.run(params, ws, progress=False)) == 0
    assert json.loads(ws.runs_json.read_text())["train"] == first["mlflow_run_id"]  # the same run, continued
    assert "resuming from" in caplog.text

    # the architecture is the checkpoint's identity: a wider factory does not continue a narrower one's checkpoint
    assert guarded("train", lambda: train.run(params, ws, step_fn=_crash_at(7), progress=False)) == 130
    (work / "tinynets/convnet.py").write_text((work / "tinynets/convnet.py").read_text().replace("WIDTH = 8",
                                                                                                "WIDTH = 12"))
    _forget_tinynets()
    caplog.clear()
    assert guarded("train", lambda: train.run(params, ws, progress=False)) == 0
    assert "cannot continue here: architecture" in caplog.text
    bundle = ckpt.load(ws.model)
    assert bundle["model"]["name"] == "tinynets.convnet:build" and bundle["state_dict"]["0.0.weight"].shape[0] == 12

    assert guarded("evaluate", lambda: evaluate.run(params, ws) and 0) == 0
    assert 0 <= json.loads(ws.metrics_json.read_text())["test"]["top1"] <= 1
    assert guarded("publish", lambda: publish.run(params, ws) and 0) == 0
    assert json.loads(ws.publish_json.read_text())["version"] == 1

    image = work / "test0.png"
    Image.fromarray(np.load(work / "data/fashion_mnist/test_x.npy")[0].squeeze()).save(image)
    capsys.readouterr()
    assert predict.main([str(image), "--json", "-k", "3"]) == 0  # models/model.pt, from the workspace
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top_k"]

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    served = Path(mlflow.artifacts.download_artifacts("models:/tiny-factory/1", dst_path=str(
        tmp_path_factory.mktemp("served"))))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_")) and k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SERVE, str(served), str(image)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] == []  # served on ONNX Runtime: neither the factory's code nor torch is needed
    answer = out["answer"]["top_k"]
    assert [c["class"] for c in answer] == [c["class"] for c in local]
    np.testing.assert_allclose([c["probability"] for c in answer], [c["probability"] for c in local], atol=1e-5)
