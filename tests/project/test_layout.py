"""The code's layout rules: no stage imports another, dvc.yaml's deps are exactly the modules each stage runs,
params.yaml and the code's defaults agree, no module grows past ~500 lines, every module says what it owns."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from dvc_deps import DVC_STAGES, PKG, all_modules, closure, imported_modules  # noqa: E402

STAGES = ("fetch", "lr_find", "train", "evaluate", "publish", "predict", "promote", "tune", "demo")
# The layers, bottom to top: a module may import its own package and the layers below it, never one above.
LAYERS = ("core", "data", "config", "training", "tracking", "serving", "tuning", "stages", "cli")
# The registries of swappable parts: config takes its allowed values from them, so they sit beside their users but
# import nothing of onecycle beyond core (see test_the_registries_import_only_core).
REGISTRIES = {m.relative_to(PKG).with_suffix("").as_posix().replace("/", ".")
              for m in PKG.rglob("*.py") if "onecycle.core.registry import Registry" in m.read_text()}


def layer(module: str) -> str:
    return module.split(".")[0] if "." in module else module


def test_every_module_imports_only_its_own_layer_and_those_below():
    wrong = {}
    for module in all_modules():
        if layer(module) not in LAYERS:
            continue  # onecycle/__init__.py and __main__.py: the package's door
        mine = LAYERS.index(layer(module))
        above = sorted(m for m in imported_modules(module)
                       if layer(m) in LAYERS and LAYERS.index(layer(m)) > mine
                       and m not in REGISTRIES | {f"{layer(r)}.__init__" for r in REGISTRIES})
        if above:
            wrong[module] = above
    assert wrong == {}


def test_the_registries_import_only_core():
    assert {"training.policies", "training.suggest", "training.optimizers"} <= REGISTRIES
    assert {m: sorted(imported_modules(m)) for m in REGISTRIES
            if any(layer(i) != "core" and i != f"{layer(m)}.__init__" for i in imported_modules(m))} == {}


def test_no_stage_module_imports_another_stage_and_nothing_imports_the_cli():
    stages = {f"stages.{s}" for s in STAGES}
    assert {m: sorted(imported_modules(m) & stages) for m in stages if imported_modules(m) & stages} == {}
    assert [m for m in all_modules() if "cli" in imported_modules(m) and m != "__main__"] == []


def test_every_package_and_module_sits_in_a_layer():
    top = sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert set(top) <= set(LAYERS), top
    assert {f"stages.{s}" for s in STAGES} <= set(all_modules())


@pytest.mark.parametrize("stage", DVC_STAGES)
def test_dvc_yaml_deps_are_exactly_the_modules_the_stage_runs(stage):
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    listed = {d for d in dvc["deps"] if d.startswith("src/")}
    expected = {f"src/onecycle/{m.replace('.', '/')}.py" for m in closure(f"stages.{stage}")}
    assert listed == expected, f"dvc.yaml stages.{stage}.deps should list: {sorted(expected)} (run make dvc-deps)"


def test_make_dvc_deps_leaves_the_committed_dvc_yaml_as_it_is(tmp_path):
    from dvc_deps import write_dvc_deps

    copy = tmp_path / "dvc.yaml"
    copy.write_text((ROOT / "dvc.yaml").read_text())
    write_dvc_deps(copy)
    assert copy.read_text() == (ROOT / "dvc.yaml").read_text(), "dvc.yaml's src/ deps are stale: run make dvc-deps"


def test_the_import_walk_sees_lazy_imports_and_package_inits():
    assert "training.loop" in closure("stages.train") and "training.loop" not in closure("stages.lr_find")
    assert "training.rangetest" in imported_modules("stages.lr_find")
    assert "training.__init__" in closure("stages.lr_find") and "stages.command" in closure("stages.fetch")
    assert "serving.pyfunc_model" in imported_modules("serving.publish")  # a file MLflow runs by name


def test_train_does_not_depend_on_the_range_test_engine():
    assert "training.rangetest" not in closure("stages.train")
    assert "training.lr_report" in closure("stages.train")


def test_dvc_yaml_outputs_match_the_workspace_paths():
    from onecycle.core.paths import STAGE_OUTPUTS, Workspace

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    ws = Workspace(Path("."))
    for stage, names in STAGE_OUTPUTS.items():
        declared = set()
        for kind in ("outs", "metrics", "plots"):
            for item in dvc[stage].get(kind, []):
                declared.add(next(iter(item)) if isinstance(item, dict) else item)
        assert {str(getattr(ws, n)) for n in names} == declared, stage


def test_the_fetch_stage_watches_the_image_folder_root():
    from onecycle.stages.fetch import WATCHED_IMAGES

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["fetch"]["deps"]
    assert str(WATCHED_IMAGES) in deps and (ROOT / WATCHED_IMAGES / "README.md").is_file()


def test_params_yaml_and_the_code_defaults_are_the_same_values():
    from onecycle.config import load_params, parse_params

    assert load_params(ROOT / "params.yaml").flat() == parse_params({}).flat()


def test_modules_are_short_and_say_what_they_own():
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 520, f"{path.name} has {len(text.splitlines())} lines"
        if path.stem not in ("__main__",):
            assert ast.get_docstring(ast.parse(text)), f"{path} has no module docstring"


def test_no_module_re_exports_a_helper_for_compatibility():
    for path in sorted(PKG.rglob("*.py")):
        assert "re-exported" not in path.read_text(), path.name


def test_modules_below_the_stages_receive_params_sections_not_the_whole_params():
    """A stage loads params.yaml and hands each function the typed sections (or values) it reads; only the tuning
    package, whose search space spans every section, the tracked fit, which logs and hashes every section, and the
    config module itself see the whole ``Params``."""
    # MLflow's own inference ``params`` (a dict) in the served model's predict signature
    mlflow_inference = {("serving/pyfunc_model.py", "predict"), ("serving/classifier.py", "__call__")}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if layer(rel.removesuffix(".py").replace("/", ".")) not in ("core", "data", "training", "tracking", "serving"):
            continue
        if rel == "tracking/training_run.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (rel, node.name) not in mlflow_inference:
                names = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
                assert not {"params", "tparams"} & set(names), f"{rel}:{node.lineno} {node.name}() takes the params"


def test_no_dataset_is_branched_on_by_name_outside_its_record():
    names = ("imagefolder", "fashion_mnist", "cifar10", "cifar100")
    allowed = {"data/catalog.py", "data/fetchers.py", "config.py"}  # the records, their fetchers, the default
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and rel not in allowed:
                consts = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                consts += [e.value for c in node.comparators if isinstance(c, ast.Tuple | ast.List | ast.Set)
                           for e in c.elts if isinstance(e, ast.Constant)]
                assert not set(consts) & set(names), f"{rel}:{node.lineno} compares with a dataset name"
