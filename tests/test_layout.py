"""The code's layout rules: no stage imports another, dvc.yaml's deps are exactly the modules each stage runs,
params.yaml and the code's defaults agree, no module grows past ~500 lines, every module says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "onecycle"
STAGES = ("fetch", "lr_find", "train", "evaluate", "predict", "promote", "tune", "demo")
DVC_STAGES = ("fetch", "lr_find", "train", "evaluate")


def imported_modules(name: str) -> set[str]:
    """The onecycle modules ``name`` imports directly, at module level or inside functions, or names as a file."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "onecycle":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            found.add(node.value[:-3])  # a module run by file name (MLflow's models-from-code file)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "onecycle" and len(parts) > 1:
                    found.add(parts[1])
    return {m for m in found if (PKG / f"{m}.py").is_file()}


def closure(name: str) -> set[str]:
    """Every onecycle module that running ``name`` can import (the package's __init__ and cli included)."""
    seen, todo = set(), [name, "cli", "__init__"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(imported_modules(mod))
    return seen


def test_no_stage_module_imports_another_stage():
    offenders = {stage: sorted(imported_modules(stage) & set(STAGES)) for stage in STAGES if (PKG / f"{stage}.py").is_file()}
    assert {k: v for k, v in offenders.items() if v} == {}
    shared = [p.stem for p in PKG.glob("*.py") if p.stem not in STAGES]
    below = {m: sorted(imported_modules(m) & set(STAGES)) for m in shared}
    assert {k: v for k, v in below.items() if v} == {}, "shared modules must not import stages"


@pytest.mark.parametrize("stage", DVC_STAGES)
def test_dvc_yaml_deps_are_exactly_the_modules_the_stage_runs(stage):
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    listed = {d for d in dvc["deps"] if d.startswith("src/")}
    expected = {f"src/onecycle/{m}.py" for m in closure(stage)}
    assert listed == expected, f"dvc.yaml stages.{stage}.deps should list: {sorted(expected)}"


def test_the_import_walk_sees_lazy_imports():
    assert "loop" in closure("train") and "loop" not in closure("lr_find")
    assert "rangetest" in imported_modules("lr_find")


def test_dvc_yaml_outputs_match_the_workspace_paths():
    from onecycle.paths import STAGE_OUTPUTS, Workspace

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    ws = Workspace(Path("."))
    for stage, names in STAGE_OUTPUTS.items():
        declared = set()
        for kind in ("outs", "metrics", "plots"):
            for item in dvc[stage].get(kind, []):
                declared.add(next(iter(item)) if isinstance(item, dict) else item)
        assert {str(getattr(ws, n)) for n in names} == declared, stage


def test_the_fetch_stage_watches_the_image_folder_root():
    from onecycle.fetch import WATCHED_IMAGES

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["fetch"]["deps"]
    assert str(WATCHED_IMAGES) in deps and (ROOT / WATCHED_IMAGES / "README.md").is_file()


def test_params_yaml_and_the_code_defaults_are_the_same_values():
    from onecycle.config import load_params, parse_params

    assert load_params(ROOT / "params.yaml").flat() == parse_params({}).flat()


def test_modules_are_short_and_say_what_they_own():
    for path in sorted(PKG.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 520, f"{path.name} has {len(text.splitlines())} lines"
        if path.stem not in ("__main__",):
            assert ast.get_docstring(ast.parse(text)), f"{path.name} has no module docstring"


def test_no_module_re_exports_a_helper_for_compatibility():
    for path in sorted(PKG.glob("*.py")):
        assert "re-exported" not in path.read_text(), path.name


def write_dvc_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each DVC stage's ``src/`` deps in dvc.yaml to the modules it runs (keeps everything else)."""
    out, stage, other, indent = [], None, None, ""

    def flush() -> None:
        out.extend(other)
        if stage in DVC_STAGES:
            out.extend(f"{indent}- src/onecycle/{m}.py\n" for m in sorted(closure(stage)))

    for line in path.read_text().splitlines(keepends=True):
        stripped = line.strip()
        if other is not None:
            if stripped.startswith("- "):
                if not stripped.startswith("- src/"):
                    other.append(line)
                continue
            flush()
            other = None
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage = stripped[:-1]
        out.append(line)
        if stripped == "deps:":
            other, indent = [], line[: len(line) - len(line.lstrip())] + "  "
    if other is not None:
        flush()
    path.write_text("".join(out))


if __name__ == "__main__":  # python tests/test_layout.py: update dvc.yaml after changing a stage's imports
    write_dvc_deps()
