"""Write each DVC stage's ``src/`` deps in dvc.yaml: exactly the onecycle modules the stage can import, so DVC re-runs
only the stages a change touches. ``make dvc-deps`` runs it after a stage's imports change;
``tests/project/test_layout.py`` checks the file is current.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "onecycle"
DVC_STAGES = ("fetch", "lr_find", "train", "evaluate", "publish")


def all_modules() -> list[str]:
    """Every module of the package, dotted below ``onecycle`` (``training.loop``, ``data.__init__``, ``cli``)."""
    return sorted(p.relative_to(PKG).with_suffix("").as_posix().replace("/", ".") for p in PKG.rglob("*.py"))


def module_file(name: str) -> Path:
    return PKG / f"{name.replace('.', '/')}.py"


def _resolve(dotted: str) -> str | None:
    """A dotted name below onecycle (``training.loop``, ``data``) as a module of the package, if it is one."""
    if module_file(dotted).is_file():
        return dotted
    if (PKG / dotted.replace(".", "/") / "__init__.py").is_file():
        return f"{dotted}.__init__"
    return None


def imported_modules(name: str) -> set[str]:
    """The onecycle modules ``name`` imports directly, at module level or inside functions, or names as a file."""
    path = module_file(name)
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "onecycle":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            if base:
                found.add(base)
            for alias in node.names:  # from onecycle.training import loop: a module
                found.add(f"{base}.{alias.name}" if base else alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{name}: relative import; onecycle imports absolutely")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("onecycle."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            found.add(str(path.parent.relative_to(PKG) / node.value[:-3]).replace("/", "."))  # a file run by name
    modules = {m for m in map(_resolve, found) if m}
    # importing a.b.c runs the __init__ of every package on the way
    for m in list(modules):
        parts = m.split(".")
        modules.update(".".join([*parts[:i], "__init__"]) for i in range(1, len(parts)) if parts[i - 1] != "__init__")
    return {m for m in modules if module_file(m).is_file()} - {name}


def closure(name: str) -> set[str]:
    """Every onecycle module that running ``name`` can import (the package's __init__ and cli included)."""
    seen, todo = set(), [name, "cli", "__init__"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(imported_modules(mod))
    return seen


def write_dvc_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each DVC stage's ``src/`` deps in dvc.yaml to the modules it runs (keeps everything else)."""
    out, stage, other, indent = [], None, None, ""

    def flush() -> None:
        out.extend(other)
        if stage in DVC_STAGES:
            out.extend(f"{indent}- src/onecycle/{m.replace('.', '/')}.py\n"
                       for m in sorted(closure(f"stages.{stage}"), key=lambda m: m.replace(".", "/")))

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


if __name__ == "__main__":
    write_dvc_deps()
