"""bench/gpu.py runs every path (throughput, loader feed, the CIFAR-10 recipe) tiny on a CPU.

The figures themselves come from a GPU machine; here only that the script works and says what it measured.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import write_fetched

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_runs_every_path_on_cpu_in_smoke_mode(tmp_path):
    write_fetched(tmp_path / "data", dataset="cifar10", n_train=300, n_test=64, size=32, channels=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "data")}}))
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py"), "--device", "cpu", "--smoke", "--workers", "1",
                          "--params", str(tmp_path / "params.yaml")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("ResNet9", "ResNet-50"))]
    assert len(rows) == 4 and all(float(r.split()[-2]) > 0 for r in rows), out.stdout  # images/s per row
    assert sum("workers:" in line for line in lines) == 2
    assert [line.split(":")[0].strip() for line in lines if "after epoch" in line] == ["after epoch  1",
                                                                                        "after epoch  2"]
    assert lines[-1].startswith("cifar10: ") and "skipped" not in lines[-1], out.stdout


def test_gpu_bench_without_a_gpu_says_nothing_was_measured():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the no-GPU message cannot be shown")
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU is visible; nothing measured" in out.stderr


def test_every_quality_lever_is_a_valid_change_of_the_default_params():
    """bench/quality.py's levers stay valid params as the config evolves (the training itself is the bench's)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench/quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    found = json.loads((ROOT / "reports/lr_find.json").read_text())["suggestions"]
    suggested = found[yaml.safe_load((ROOT / "params.yaml").read_text())["lr_find"]["suggestion"]]
    default = quality.lever_params("default", seed=1)
    assert default.schedule.max_lr == pytest.approx(suggested) and default.train.seed == 1
    assert quality.lever_params("steepest", seed=0).schedule.max_lr == pytest.approx(found["steepest"])
    assert quality.lever_params("x1.5", seed=0).schedule.max_lr == pytest.approx(1.5 * suggested)
    for name in quality.LEVERS:
        changed = quality.lever_params(name, seed=0).flat()
        assert changed["mlflow.system_metrics"] is False and changed["data.root"].endswith("data")


def test_every_lr_find_cost_variant_is_a_valid_change_of_the_default_params():
    """bench/lr_find_cost.py's sweeps stay valid params as the config evolves (the sweeps themselves are the bench's)."""
    import importlib.util

    from onecycle.config import load_params

    spec = importlib.util.spec_from_file_location("lr_find_cost", ROOT / "bench/lr_find_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = load_params(ROOT / "params.yaml")
    for label, overrides in bench.VARIANTS:
        params = base.replace(**overrides) if overrides else base
        for section, values in overrides.items():
            for key, value in values.items():
                assert getattr(getattr(params, section), key) == value, label


def test_every_lr_spread_perturbation_is_a_valid_change_of_the_default_params():
    """bench/lr_spread.py's perturbations stay valid params as the config evolves (the sweeps are the bench's)."""
    import importlib.util

    from onecycle.config import load_params

    spec = importlib.util.spec_from_file_location("lr_spread", ROOT / "bench/lr_spread.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = load_params(ROOT / "params.yaml")
    for label, overrides in bench.PERTURBATIONS:
        params = base.replace(**overrides) if overrides else base
        for section, values in overrides.items():
            for key, value in values.items():
                assert getattr(getattr(params, section), key) == value, label


@pytest.mark.slow
def test_make_bench_measures_the_trainer_and_the_pipelines_epoch_on_tiny_params(tmp_path, monkeypatch):
    """bench.py's rows that run onecycle's own code (not timed here: only that they run and report an epoch)."""
    import importlib.util

    from onecycle.config import load_params
    from tiny import tiny_params

    spec = importlib.util.spec_from_file_location("bench_main", ROOT / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_fetched(tmp_path / "data", n_train=400, n_test=40)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # the bench functions set it: restored after the test
    params = load_params(tiny_params(tmp_path, mlflow={"system_metrics": False}))
    (tmp_path / "b").mkdir()
    (tmp_path / "e").mkdir()
    ips, secs, images = bench.bench_trainer(params, tmp_path / "b")
    assert ips > 0 and secs > 0 and images == 400 - params.data.val_size
    ips, secs = bench.bench_pipeline_epoch(params, tmp_path / "e", images)
    assert ips > 0 and secs > 0 and (tmp_path / "e/models/model.pt").is_file()


def _load_bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_compared_schedules_have_the_shapes_they_are_named_for():
    """bench/schedules.py's cosine (warm-up, then to 0), step (/10 at 50% and 75%) and constant LRs per step."""
    import torch

    schedules = _load_bench("schedules")
    from onecycle.config import load_params

    params = load_params(ROOT / "params.yaml")

    def lrs(name: str, total: int = 100) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4, momentum=0.9)
        sched = schedules.make_scheduler(name, opt, params, 0.4, total, warmup=0.1)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cos = lrs("cosine")
    assert cos[0] == pytest.approx(0.04) and cos[9] == pytest.approx(0.4) and max(cos) == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(cos[9:], cos[10:], strict=False)) and cos[-1] < 0.001
    step = lrs("step")
    assert step[49] == pytest.approx(0.4) and step[50] == pytest.approx(0.04) and step[75] == pytest.approx(0.004)
    assert set(lrs("constant")) == {0.4}
    one = lrs("onecycle", total=params.train.epochs * 25)
    assert one[0] == pytest.approx(0.4 / params.schedule.div_factor) and max(one) == pytest.approx(0.4)


@pytest.mark.slow
def test_schedules_bench_trains_every_schedule_and_picks_each_ones_best_lr(tmp_path, capsys):
    """Every schedule at every LR of its grid trains the same tiny model; Schedule-Free is scored at its averaged
    weights; the summary keeps each schedule's best final validation top-1."""
    from tiny import tiny_params

    schedules = _load_bench("schedules")
    write_fetched(tmp_path / "data", n_train=400, n_test=40)
    path = tiny_params(tmp_path, mlflow={"system_metrics": False})
    results = schedules.main(["--params", str(path), "--max-lr", "0.05", "--epochs", "2", "--target", "0.0"])
    out = capsys.readouterr().out
    assert [(r["schedule"], round(r["lr"], 6)) for r in results] == [
        (name, round(0.05 * m, 6)) for name, grid in schedules.GRIDS.items() for m in grid]
    for r in results:  # 2 evaluations an epoch, the last at the epoch's end; target 0: reached at the first
        assert r["diverged"] or (0.0 <= r["final"] <= 1.0 and len(r["curve"]) == 4 and r["curve"][-1][0] == 2.0
                                 and 0.0 < r["epochs_to_target"] == r["curve"][0][0] < 1.0)
    summary = out.split("Each schedule at its best LR")[1].splitlines()
    for name in schedules.GRIDS:
        ok = [r for r in results if r["schedule"] == name and not r["diverged"]]
        row = next(line for line in summary if line.startswith(f"| {name} |"))
        if ok:
            assert f"| {max(r['final'] for r in ok):.4f} |" in row, row
    finals = {r["final"] for r in results if not r["diverged"]}
    assert len(finals) > 1, "every schedule trained to the same accuracy: the schedules did not differ"


def test_make_bench_startup_times_modules_that_exist():
    """bench/startup.py (the second half of `make bench`) imports each stage by its module path: it broke once when
    the stages moved under onecycle.stages."""
    import importlib.util

    startup = _load_bench("startup")
    assert set(startup.STAGES) >= {"fetch", "lr_find", "train", "evaluate"}
    for stage in startup.STAGES:
        assert importlib.util.find_spec(f"onecycle.stages.{stage}") is not None, stage
    code = startup.stage_code("train")
    assert "import onecycle.stages.train" in code
