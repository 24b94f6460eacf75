"""onecycle tune for time to accuracy: multi-objective studies (score and cost) with their Pareto front in Optuna,
MLflow and DVC, `--apply --target`, a search over recipes (policy, epochs, optimizer, batch size), and `-S`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from onecycle.config import load_params, parse_params
from onecycle.core.errors import ConfigError, OneCycleError
from onecycle.stages import tune as tune_mod
from onecycle.tuning import objectives
from onecycle.tuning import space as space_mod
from onecycle.tuning.overrides import apply_sets, parse_sets
from onecycle.tuning.reproduce import dvc_command, trial_sets
from tiny import tiny_params, write_fetched

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCORE_COST = {"metric": ["val/top1", "train/seconds"], "direction": ["maximize", "minimize"]}
# a search over recipes: the policy, the epochs, the optimizer (Muon too), with the default schedule knobs
RECIPES = {"train.epochs": {"low": 1, "high": 2}, "schedule.policy": {"choices": ["one_cycle", "cosine"]},
           "optimizer.name": {"choices": ["sgd", "muon"]}}


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    # 1072 training images after 128 for validation: 17 steps of 64 (every pct_start 0.1-0.5 fits One Cycle)
    write_fetched(tmp_path / "data", n_train=1200, n_test=50)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    return tmp_path


def _study(workdir) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(workdir / "reports/tune/study.journal")))
    return optuna.load_study(study_name="onecycle", storage=storage)


def _parent(workdir):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test").experiment_id
    runs = client.search_runs([experiment])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return client, experiment, parents[0], [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _workers(workdir, n: int, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    cmd = [sys.executable, "-m", "onecycle", "tune", "--params", "params.yaml", "--threads", "1", *args]
    workers = [subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(n)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]  # a guard against a hang only
    assert [w.returncode for w in workers] == [0] * n, outputs
    return outputs


# ------------------------------------------------------------------------------ a multi-objective study

@pytest.mark.slow
def test_two_workers_run_a_multi_objective_study_whose_front_reaches_optuna_mlflow_dvc_and_apply_target(workdir,
                                                                                                         capsys):
    path = tiny_params(workdir, tune={"epochs": 1, **SCORE_COST, "space": RECIPES})
    outputs = _workers(workdir, 2, "--n-trials", "2")
    for out in outputs:
        assert out.count("tune: trial ") == 2
        assert out.count("pruning is off: Optuna's pruners judge one objective and tune.metric has 2") == 1

    study = _study(workdir)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val/top1", "train/seconds"]
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:  # the score is the best epoch's val/top1; the cost the whole run's seconds, recorded with the rest
        epochs = t.params["train.epochs"]
        assert t.user_attrs["train_epochs"] == epochs and t.user_attrs["train_images"] == 1072 * epochs
        assert t.values[1] == t.user_attrs["train_seconds"] > 0 and 0 <= t.values[0] <= 1
        assert t.intermediate_values == {}  # a multi-objective trial reports no epoch (nothing to prune on)
        assert f"-S train.epochs={epochs}" in t.user_attrs["dvc_command"]
        assert f"-S optimizer.name={t.params['optimizer.name']}" in t.user_attrs["dvc_command"]
    front = sorted(study.best_trials, key=lambda t: (t.values[1], t.number))
    assert front and all(not _dominates(o, t) for t in front for o in trials)

    # the front in reports/tune (a DVC plot) and the optuna CLI
    rows = list(csv.DictReader(open(workdir / "reports/tune/pareto.csv")))
    assert [int(r["trial"]) for r in rows] == [t.number for t in front]
    assert [(float(r["score"]), float(r["cost"])) for r in rows] == [tuple(t.values) for t in front]
    assert [float(r["val_top1"]) for r in rows] == [t.values[0] for t in front]
    assert (workdir / "reports/tune/pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli = subprocess.run([str(BIN / "optuna"), "best-trials", "--study-name", "onecycle", "--storage",
                          "reports/tune/study.journal", "-f", "json"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"})
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert sorted(t["number"] for t in json.loads(cli.stdout)) == sorted(t.number for t in front)

    # the MLflow parent run carries the front: a table, the plot and the CSV
    client, experiment, parent, nested = _parent(workdir)
    assert sorted(r.data.tags["trial_number"] for r in nested) == ["0", "1", "2", "3"]
    assert {"tune/pareto_front.json", "tune/pareto.png", "tune/pareto.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    import mlflow

    previous = mlflow.get_tracking_uri()  # load_table searches the runs through the global tracking URI
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        table = client.load_table(experiment, "tune/pareto_front.json", run_ids=[parent.info.run_id])
    finally:
        mlflow.set_tracking_uri(previous)
    assert list(table["trial"]) == [t.number for t in front]
    assert list(table["cost"]) == pytest.approx([t.values[1] for t in front])  # through MLflow's table (pandas)
    assert parent.data.metrics["pareto_front_size"] == len(front)

    # --apply --target: the cheapest trial whose val/top1 reached the target, with its epochs
    scores = sorted({t.values[0] for t in trials})
    target = scores[len(scores) // 2]
    reached = [t for t in trials if t.values[0] >= target]
    cheapest = min(reached, key=lambda t: (t.values[1], -t.values[0], t.number))
    capsys.readouterr()
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0", "--apply", "--target", repr(target)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"tune: --apply --target {target:g}: trial {cheapest.number}, the cheapest by "
                           f"train/seconds whose val/top1 reached >= {target:g}: val/top1 {cheapest.values[0]:.4f}, "
                           f"train/seconds {cheapest.values[1]:.1f}; wrote ")
    applied = load_params(path)
    assert applied.train.epochs == cheapest.params["train.epochs"]
    assert applied.schedule.policy == cheapest.params["schedule.policy"]
    assert applied.optimizer.name == cheapest.params["optimizer.name"]
    assert applied.schedule.max_lr == pytest.approx(cheapest.params["schedule.max_lr"], rel=1e-3)
    assert applied.schedule.pct_start == pytest.approx(cheapest.params["schedule.pct_start"], rel=1e-3)
    assert applied.tune.epochs == 1 and applied.data.batch_size == 64  # nothing else changed

    # a target no trial reached: one line, nothing written
    text = path.read_text()
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0", "--apply", "--target", "1.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("onecycle tune: error: --target 1.5: no complete trial of study onecycle reached "
                          "val/top1 >= 1.5 (4 complete); the best is trial ")
    assert path.read_text() == text

    # --apply alone: the best val/top1 on the front (the cheaper of equals), with its epochs
    best = max(front, key=lambda t: (t.values[0], -t.values[1], -t.number))
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0", "--apply"]) == 0
    assert f"trial {best.number}, the best val/top1 on the Pareto front" in capsys.readouterr().out
    assert load_params(path).train.epochs == best.params["train.epochs"]

    # dvc plots show draws the front from reports/tune/pareto.csv: score against cost
    project = workdir / "dvc_project"
    (project / "reports/tune").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(REPO / name, project / name)
    shutil.copyfile(workdir / "reports/tune/pareto.csv", project / "reports/tune/pareto.csv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=project, check=True, env=env, timeout=300)
    shutil.copytree(REPO / ".dvc/plots", project / ".dvc/plots", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("vendor"))
    shown = subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=project, capture_output=True, text=True,
                           env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    (plot,) = json.loads(shown.stdout)["data"]["Pareto front"]
    encoding = plot["content"]["encoding"]
    assert (encoding["x"]["field"], encoding["y"]["field"]) == ("cost", "score")
    assert "train/seconds" in encoding["x"]["title"] and "val/top1" in encoding["y"]["title"]


def _dominates(a, b) -> bool:
    """Whether trial ``a`` is at least as good as ``b`` in both (val/top1 up, seconds down) and better in one."""
    (sa, ca), (sb, cb) = a.values, b.values
    return sa >= sb and ca <= cb and (sa > sb or ca < cb)


# ------------------------------------------------------------------------------ choosing a trial

def _made_study(directions, trials):
    """An in-memory study of complete trials: ``[(values, params, user_attrs), ...]``."""
    study = optuna.create_study(directions=directions, study_name="made")
    dist = {"schedule.max_lr": optuna.distributions.FloatDistribution(0.01, 1.0)}
    for values, params, attrs in trials:
        study.add_trial(optuna.create_trial(values=values, params=params, distributions=dist, user_attrs=attrs))
    return study


def test_the_cheapest_trial_that_reached_the_target_is_chosen_and_ties_go_to_the_better_score():
    goals = objectives.goals(parse_params({"tune": SCORE_COST}).tune, 128)
    lr = [{"schedule.max_lr": x} for x in (0.1, 0.2, 0.3, 0.4, 0.5)]
    study = _made_study(["maximize", "minimize"], [
        ([0.95, 90.0], lr[0], {}), ([0.93, 40.0], lr[1], {}), ([0.94, 40.0], lr[2], {}), ([0.90, 10.0], lr[3], {}),
        ([0.929, 20.0], lr[4], {})])
    assert objectives.cheapest_reaching(study, goals, 0.93).number == 2  # 40 s, and 0.94 beats 0.93 at 40 s
    assert objectives.cheapest_reaching(study, goals, 0.95).number == 0
    assert objectives.cheapest_reaching(study, goals, 0.5).number == 3
    assert objectives.best_scoring(study, goals).number == 0
    assert {t.number for t in objectives.front(study)} == {0, 2, 3, 4}
    with pytest.raises(OneCycleError, match=r"^--target 0.96: no complete trial of study made reached val/top1 >= "
                                            r"0.96 \(5 complete\); the best is trial 0 with val/top1 0.9500"):
        objectives.cheapest_reaching(study, goals, 0.96)


def test_a_single_objective_study_answers_target_by_its_trials_recorded_training_seconds():
    goals = objectives.goals(parse_params({}).tune, 128)
    lr = [{"schedule.max_lr": x} for x in (0.1, 0.2, 0.3)]
    study = _made_study(["maximize"], [([0.95], lr[0], {"train_seconds": 30.0}),
                                       ([0.94], lr[1], {"train_seconds": 20.0}), ([0.96], lr[2], {})])
    assert objectives.cheapest_reaching(study, goals, 0.93).number == 1
    assert objectives.cost_of(study.trials[1], goals) == ("train/seconds", 20.0)
    # a loss to minimize reaches its target from above
    loss = objectives.goals(parse_params({"tune": {"metric": ["val/loss", "train/epochs"],
                                                   "direction": ["minimize", "minimize"]}}).tune, 128)
    study = _made_study(["minimize", "minimize"], [([0.30, 4], lr[0], {}), ([0.25, 8], lr[1], {})])
    assert objectives.cheapest_reaching(study, loss, 0.3).number == 0
    assert objectives.cheapest_reaching(study, loss, 0.28).number == 1


@pytest.mark.parametrize("tune, message", [
    ({"metric": ["val/top1", "train/minutes"], "direction": ["maximize", "minimize"]},
     "tune.metric must be one of train/loss, train/top1, val/loss, val/top1, val/top5, wall_clock/epoch_seconds, "
     "wall_clock/images_per_second, train/seconds, train/epochs, train/images; got 'train/minutes'"),
    ({"metric": ["val/top1", "train/seconds"]},
     "tune.direction must give one direction per tune.metric (2: val/top1, train/seconds), got 1"),
    ({"metric": ["val/top1", "val/top1"], "direction": ["maximize", "maximize"]}, "tune.metric names val/top1 twice"),
    ({"metric": []}, "tune.metric must name one metric or a list of them, got []"),
])
def test_bad_objectives_are_one_line_naming_the_key(tune, message):
    with pytest.raises(ConfigError) as info:
        objectives.goals(parse_params({"tune": tune}).tune, 128)
    assert str(info.value) == message


def test_target_needs_a_score_first_and_apply(workdir, capsys):
    goals = objectives.goals(parse_params({"tune": {"metric": ["train/seconds", "val/top1"],
                                                    "direction": ["minimize", "maximize"]}}).tune, 128)
    study = _made_study(["minimize", "maximize"], [([3.0, 0.9], {"schedule.max_lr": 0.1}, {})])
    with pytest.raises(OneCycleError, match=r"^--target applies to the score, tune.metric's first entry, but that is "
                                            r"the cost train/seconds"):
        objectives.cheapest_reaching(study, goals, 0.9)
    tiny_params(workdir)
    assert tune_mod.main(["--params", "params.yaml", "--target", "0.9"]) == 2
    assert capsys.readouterr().err.strip() == ("onecycle tune: error: --target 0.9 picks the trial that --apply "
                                               "writes: add --apply")


# ------------------------------------------------------------------------------ a search over recipes

def test_the_space_holds_the_policy_epochs_optimizer_and_batch_size_and_each_trial_names_its_command():
    params = parse_params({"schedule": {"max_lr": 0.1}, "tune": {"epochs": 3, "space": {
        **RECIPES, "train.epochs": {"low": 2, "high": 6}, "data.batch_size": {"choices": [64, 128, 256]},
        "optimizer.muon_lr_ratio": {"low": 0.5, "high": 4, "log": True}}}})
    space = space_mod.search_space(params)
    assert space["schedule.policy"].kind == space["optimizer.name"].kind == "categorical"
    assert space["train.epochs"].kind == "int" and space["data.batch_size"].choices == (64, 128, 256)
    repo = parse_params({"schedule": {"max_lr": 0.1}}).flat()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        trial = study.ask()
        values = {k: d.suggest(trial) for k, d in space.items()}
        tparams = space_mod.trial_params(params, values)
        assert tparams.train.epochs == values["train.epochs"]  # sampled, not tune.epochs
        assert (tparams.schedule.policy, tparams.optimizer.name, tparams.data.batch_size) == (
            values["schedule.policy"], values["optimizer.name"], values["data.batch_size"])
        sets = trial_sets(tparams.flat(), values, repo)
        command = dvc_command(sets)
        # the command rebuilds the trial's params from the repository's
        rebuilt = parse_params({"schedule": {"max_lr": 0.1}}).flat()
        for part in command.split(" -S ")[1:]:
            key, value = part.strip("'").split("=", 1)
            rebuilt[key] = yaml.safe_load(value)
        assert {k: rebuilt[k] for k in values} == values
        seen.add((values["schedule.policy"], values["optimizer.name"]))
        study.tell(trial, 0.0)
    assert len(seen) == 4
    # without train.epochs in the space, a trial trains tune.epochs
    assert space_mod.trial_params(params, {"schedule.policy": "cosine"}).train.epochs == 3


# ------------------------------------------------------------------------------ -S

def test_set_overrides_read_values_as_yaml_and_validate_like_a_params_file():
    sets = parse_sets(["schedule.max_lr=1e-3", "tune.n_trials=4", "tune.metric=[val/top1, train/seconds]",
                       "tune.direction=[maximize,minimize]", "tune.space.train.epochs={low: 1, high: 3}",
                       "data.train_subset=null", "tune.n_trials=5"])
    assert sets == {"schedule.max_lr": 0.001, "tune.n_trials": 5, "tune.metric": ["val/top1", "train/seconds"],
                    "tune.direction": ["maximize", "minimize"], "tune.space.train.epochs": {"low": 1, "high": 3},
                    "data.train_subset": None}  # YAML 1.2 as DVC reads params.yaml; the last -S of a key wins
    params = apply_sets(parse_params({"data": {"train_subset": 512}}), sets)
    assert params.schedule.max_lr == 0.001 and params.tune.n_trials == 5 and params.data.train_subset is None
    assert params.tune.metrics == ["val/top1", "train/seconds"]
    assert set(space_mod.search_space(params)) == {"schedule.max_lr", "schedule.pct_start", "schedule.div_factor",
                                                   "train.epochs"}


@pytest.mark.parametrize("sets, message", [
    (["schedule.maxlr=0.1"], "-S schedule.maxlr=0.1: unknown key schedule.maxlr; did you mean schedule.max_lr?"),
    (["schedule.max_lr=-1"], "-S schedule.max_lr=-1: schedule.max_lr must be a positive number or auto, got -1"),
    (["tune.n_trials=4", "train.epochs=0"], "-S train.epochs=0: train.epochs must be > 0, got 0"),
    (["max_lr"], "-S max_lr: expected section.key=value, e.g. -S schedule.max_lr=0.1"),
    (["schedule=3"], "-S schedule=3: expected section.key=value, e.g. -S schedule.max_lr=0.1"),
    (["tune.n_trials=[1"], "-S tune.n_trials=[1: the value of tune.n_trials is not valid YAML"),
    (["schedule.max_lr.low=1"], "-S schedule.max_lr.low: schedule.max_lr is not a mapping, so it has no key low"),
])
def test_a_bad_set_is_one_line_naming_the_key_exit_2_before_anything_is_written(workdir, capsys, sets, message):
    tiny_params(workdir)
    argv = ["--params", "params.yaml"]
    for item in sets:
        argv += ["-S", item]
    assert tune_mod.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"onecycle tune: error: {message}")
    assert not (workdir / "mlflow.db").exists() and not (workdir / "reports").exists()


@pytest.mark.slow
def test_a_study_run_with_set_overrides_records_them_in_each_trials_command(workdir, capsys):
    tiny_params(workdir)  # the repository's params.yaml: 2 epochs, 5 tune trials
    text = (workdir / "params.yaml").read_text()
    assert tune_mod.main(["--params", "params.yaml", "-S", "tune.n_trials=1", "-S", "tune.epochs=1",
                          "-S", "optimizer.weight_decay=0.001", "-S", "optimizer.name=muon",
                          "-S", "tune.space.schedule.div_factor=null"]) == 0
    (trial,) = _study(workdir).get_trials()
    assert trial.state.name == "COMPLETE" and set(trial.params) == {"schedule.max_lr", "schedule.pct_start"}
    command = trial.user_attrs["dvc_command"]
    assert "-S train.epochs=1" in command and "-S optimizer.weight_decay=0.001" in command
    assert "-S optimizer.name=muon" in command and "tune." not in command  # the study's own settings train nothing
    assert (workdir / "params.yaml").read_text() == text  # -S changes the loaded params, never the file
    _, _, parent, _ = _parent(workdir)
    assert parent.data.params["optimizer.weight_decay"] == "0.001"


def test_apply_target_on_a_single_objective_study_takes_the_cheapest_by_its_recorded_seconds(workdir, capsys):
    path = tiny_params(workdir, tune={"epochs": 1})
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(_journal(workdir))))
    study = optuna.create_study(storage=storage, study_name="onecycle", direction="maximize")
    dist = {"schedule.max_lr": optuna.distributions.FloatDistribution(0.005, 0.5)}
    for value, lr, seconds in ((0.95, 0.1, 30.0), (0.94, 0.2, 20.0), (0.90, 0.3, 5.0)):
        study.add_trial(optuna.create_trial(value=value, params={"schedule.max_lr": lr}, distributions=dist,
                                            user_attrs={"train_seconds": seconds, "train_epochs": 1}))
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0", "--apply", "--target", "0.93"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "tune: --apply --target 0.93: trial 1, the cheapest by train/seconds whose val/top1 reached >= 0.93: "
        "val/top1 0.9400, train/seconds 20.0; wrote 2 key(s) into params.yaml")
    applied = load_params(path)
    assert applied.schedule.max_lr == 0.2 and applied.train.epochs == 1  # the epochs the trial trained
    # --apply alone keeps to the tuned keys: the best trial's max_lr, train.epochs as it was
    path.write_text(path.read_text().replace("epochs: 1\n  device", "epochs: 2\n  device"))
    assert tune_mod.main(["--params", "params.yaml", "--n-trials", "0", "--apply"]) == 0
    applied = load_params(path)
    assert applied.schedule.max_lr == 0.1 and applied.train.epochs == 2


def _journal(workdir) -> Path:
    (workdir / "reports/tune").mkdir(parents=True, exist_ok=True)
    return workdir / "reports/tune/study.journal"
