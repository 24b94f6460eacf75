"""The pinned requirements: runtime only, consistent with pyproject.toml, and installable everywhere they claim.

requirements.txt is a universal lock (`make lock`: uv pip compile --universal): one file whose environment
markers select the right pins on Linux (with or without CUDA), macOS and Windows, for Python 3.11-3.13.
requirements-dev.txt holds the test and lint tools. The slow test resolves both files for other platforms
and Pythons against PyPI, the only place it contacts.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEV_TOOLS = {"pytest", "pytest-timeout", "ruff", "uv"}
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")
# The one pinned package PyPI has no wheel of (pure Python, built from its sdist on every platform).
SDIST_ONLY = ("antlr4-python3-runtime",)


def read_lock(path: Path) -> list[Requirement]:
    """The requirement lines of a pip requirements file (comments, options and continuation-free)."""
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            reqs.append(Requirement(line))
    return reqs


def pins(reqs: list[Requirement]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for req in reqs:
        (spec,) = req.specifier  # exactly one, ==
        out.setdefault(canonicalize_name(req.name), set()).add(spec.version)
    return out


RUNTIME = read_lock(REPO / "requirements.txt")
DEV = read_lock(REPO / "requirements-dev.txt")


def test_every_line_is_an_exact_pin():
    for req in RUNTIME + DEV:
        assert [s.operator for s in req.specifier] == ["=="], str(req)


def test_requirements_txt_holds_no_test_or_lint_tool():
    assert not DEV_TOOLS & set(pins(RUNTIME)), "test/lint tools belong in requirements-dev.txt"
    assert DEV_TOOLS <= set(pins(DEV))


def test_cuda_packages_are_marked_linux_only():
    cuda = [r for r in RUNTIME if CUDA_ONLY.match(canonicalize_name(r.name))]
    assert cuda, "torch's CUDA libraries should be pinned for Linux"
    for req in cuda:
        assert req.marker is not None, str(req)
        assert req.marker.evaluate({**default_environment(), "sys_platform": "linux", "platform_machine": "x86_64",
                                    "python_full_version": "3.13.0"}), str(req)
        for platform in ("darwin", "win32"):
            assert not req.marker.evaluate({**default_environment(), "sys_platform": platform}), str(req)


def test_the_pins_satisfy_pyproject_toml():
    """A dependency added to pyproject.toml without `make lock` fails here."""
    runtime, dev = pins(RUNTIME), pins(DEV)
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        versions = runtime.get(canonicalize_name(req.name), set())
        assert versions and all(req.specifier.contains(v, prereleases=True) for v in versions), \
            f"{line}: requirements.txt has {versions or 'nothing'} (run `make lock`)"
        for extra in req.extras:  # psycopg[binary] -> psycopg-binary
            assert canonicalize_name(f"{req.name}-{extra}") in runtime, line
    for line in PYPROJECT["dependency-groups"]["dev"]:
        req = Requirement(line)
        versions = dev.get(canonicalize_name(req.name), set())
        assert versions and all(req.specifier.contains(v) for v in versions), \
            f"{line}: requirements-dev.txt has {versions or 'nothing'} (run `make lock`)"
    for extra, lines in PYPROJECT["project"].get("optional-dependencies", {}).items():  # `make setup` installs them
        for line in lines:
            req = Requirement(line)
            versions = runtime.get(canonicalize_name(req.name), set())
            assert versions and all(req.specifier.contains(v) for v in versions), \
                f"[{extra}] {line}: requirements.txt has {versions or 'nothing'} (run `make lock`)"
    both = set(runtime) & set(dev)
    assert {name: runtime[name] for name in both} == {name: dev[name] for name in both}


def test_torch_and_torchvision_are_pinned_to_the_disk_served_builds():
    runtime = pins(RUNTIME)
    assert runtime["torch"] == {"2.14.1"} and runtime["torchvision"] == {"0.29.1"}
    assert runtime["psycopg"] == runtime["psycopg-binary"] == {"3.3.9"}
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.14"
    assert PYPROJECT["project"]["license"] == "MIT"  # an SPDX string: no setuptools deprecation warnings


# (uv's target triple, Python): macOS on Apple silicon (torch 2.14 has no Intel macOS wheel; it needs macOS 14),
# Linux x86_64 (CUDA or CPU-only: PyPI's torch runs on the CPU where there is no GPU) and aarch64. Linux x86_64
# on 3.11 is what `make setup` installs in CI. Windows resolves too (checked by hand, not here).
PLATFORMS = [("aarch64-apple-darwin", v) for v in ("3.11", "3.12", "3.13")] + [
    ("x86_64-unknown-linux-gnu", "3.13"), ("aarch64-unknown-linux-gnu", "3.12")]


def _resolve(platform: str, python: str, out: Path, offline: bool) -> subprocess.CompletedProcess:
    from uv import find_uv_bin

    cmd = [find_uv_bin(), "pip", "compile", "requirements.txt", "requirements-dev.txt",
           "--python-platform", platform, "--python-version", python, "--only-binary", ":all:",
           *[arg for name in SDIST_ONLY for arg in ("--no-binary", name)],
           "--no-python-downloads",  # to build the sdist's metadata: this Python, never a download
           "--no-header", "--no-annotate", "--quiet", "--output-file", str(out), *(["--offline"] if offline else [])]
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0"}  # torch 2.14's macOS wheels need macOS 14
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after 300 s\n{exc.stderr or ''}")


@pytest.mark.slow
def test_the_locks_resolve_for_every_platform_from_pypi(tmp_path):
    """uv resolves requirements.txt + requirements-dev.txt for each platform from wheels (metadata only:
    nothing is installed), and every package it picks is already pinned, at the pinned version.

    The first platform asks PyPI (refreshing uv's cache of its index pages); each other one first tries uv's
    cache alone (3 s instead of 15) and asks PyPI when the cache lacks something.
    """
    try:
        import uv  # noqa: F401
    except ImportError:
        pytest.fail("uv is not installed: it is in requirements-dev.txt (`make setup` installs it)")
    locked = {**pins(RUNTIME), **pins(DEV)}
    problems = []
    for i, (platform, python) in enumerate(PLATFORMS):
        out = tmp_path / f"{platform}-{python}.txt"
        proc = _resolve(platform, python, out, offline=i > 0)
        if proc.returncode != 0 and i > 0:
            proc = _resolve(platform, python, out, offline=False)
        where = f"{platform}, Python {python}"
        if proc.returncode != 0:
            problems.append(f"{where}: does not resolve (this test needs PyPI):\n{proc.stderr[-2000:]}")
            continue
        resolved = pins(read_lock(out))
        unpinned = {name: v for name, v in resolved.items() if not v <= locked.get(name, set())}
        if unpinned:
            problems.append(f"{where}: resolves to packages the locks do not pin (run `make lock`): {unpinned}")
        if not {"torch", "torchvision", "pytest"} <= set(resolved):
            problems.append(f"{where}: torch, torchvision or pytest missing: {sorted(resolved)}")
        if any(CUDA_ONLY.match(name) for name in resolved) != ("linux" in platform):
            problems.append(f"{where}: CUDA packages {'missing' if 'linux' in platform else 'selected'}")
    assert not problems, "\n".join(problems)


def _declared() -> dict[str, str]:
    """Canonical distribution name -> where pyproject.toml declares it (dependencies or an extra)."""
    out = {canonicalize_name(Requirement(line).name): "dependencies" for line in PYPROJECT["project"]["dependencies"]}
    for extra, lines in PYPROJECT["project"].get("optional-dependencies", {}).items():
        out.update({canonicalize_name(Requirement(line).name): f"[{extra}]" for line in lines})
    return out


def test_every_package_the_code_imports_is_declared():
    """filelock, sqlalchemy, packaging ... came through other packages' dependencies; each is onecycle's own."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for path in sorted((REPO / "src/onecycle").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "onecycle":
                    continue
                names = {canonicalize_name(d) for d in dists.get(top, [top])}
                if not names & set(declared):
                    missing.setdefault(top, f"{path.relative_to(REPO)}: {sorted(names)}")
    assert not missing, f"imported but not in pyproject.toml: {missing}"


def test_pyproject_holds_ranges_and_extras_the_locks_pin_exactly():
    lines = PYPROJECT["project"]["dependencies"] + [
        line for lines in PYPROJECT["project"]["optional-dependencies"].values() for line in lines]
    assert not [line for line in lines if "==" in line.split(";")[0]], "exact pins belong in requirements.txt (`make lock`)"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"demo", "postgres", "s3"} <= set(extras)
    assert _declared()["gradio"] == "[demo]" and _declared()["psycopg"] == "[postgres]"
    makefile = (REPO / "Makefile").read_text()
    assert "--all-extras" in makefile and '-e ".[demo,postgres,s3]"' in makefile  # `make setup` installs them all


def test_a_missing_extra_is_one_line_naming_it(capsys):
    from onecycle.stages.command import guarded

    def needs_psycopg():
        raise ModuleNotFoundError("No module named 'psycopg'", name="psycopg")  # as SQLAlchemy's import raises it

    assert guarded("tune", needs_psycopg) == 1
    assert capsys.readouterr().err == ("onecycle tune: error: psycopg is not installed: pip install 'onecycle[postgres]' "
                                       "(`make setup` installs every extra)\n")
