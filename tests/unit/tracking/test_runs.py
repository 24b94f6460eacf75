"""runs.py against a real MLflow SQLite store: the experiment's kind, dataset digests, run names."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from onecycle.config import parse_params
from onecycle.tracking import runs, store
from tiny import write_fetched


def _client(root: Path):
    import mlflow

    mlflow.set_tracking_uri(store.default_tracking_uri(root))
    return mlflow.MlflowClient()


def test_the_experiment_is_a_model_training_experiment_and_the_ui_link_opens_its_runs(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    client = _client(root)
    bare = client.create_experiment("made-elsewhere")  # made by MLflow's own client: no kind tag
    assert store.EXPERIMENT_KIND_TAG not in client.get_experiment(bare).tags
    assert store.configure("made-elsewhere", root) == bare
    exp_id = store.configure("onecycle", root)
    for eid in (bare, exp_id):
        assert _client(root).get_experiment(eid).tags[store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text("mlflow:\n  experiment: made-elsewhere\n")
    assert store.ui_link(5123).endswith(f"http://127.0.0.1:5123/#/experiments/{bare}/runs"
                                           "?workflowType=machine_learning")


def test_dataset_digests_follow_the_data_and_the_split_not_the_machine(tmp_path):
    write_fetched(tmp_path / "a" / "data")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same data in another place (another machine)
    params = parse_params({"data": {"val_size": 100}})

    def digests(root, p=params):
        return {k: (d.digest, d.source.uri, d.name) for k, d in
                runs.datasets(p.data, root, ["train", "val", "test"], split_seed=0).items()}

    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a == b
    assert a["train"][1:] == ("data/fashion_mnist", "fashion_mnist-train")
    assert len({d for d, _, _ in a.values()}) == 3
    other_split = digests(tmp_path / "a", parse_params({"data": {"val_size": 50}}))
    assert other_split["train"][0] != a["train"][0] and other_split["val"][0] != a["val"][0]
    assert other_split["test"] == a["test"]  # the test split does not depend on the train/val split
    write_fetched(tmp_path / "b" / "data", n_train=641)  # other data, same names
    assert digests(tmp_path / "b")["test"][0] != a["test"][0]


def test_runs_are_named_after_the_dvc_experiment(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert runs.run_name("train-abc123") == "train-abc123"
    monkeypatch.setenv("DVC_EXP_NAME", "lowlr")
    assert runs.run_name("train-abc123") == "lowlr"


@pytest.mark.slow
def test_a_training_run_samples_system_metrics_and_can_switch_them_off(tmp_path):
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    store.configure("onecycle", root)
    client = _client(root)
    with runs.start_run(None, "with", system_metrics=True) as run:
        deadline = time.monotonic() + 300  # a generous bound for a loaded machine; the first sample comes in 2 s
        while not client.get_run(run.info.run_id).data.metrics and time.monotonic() < deadline:
            time.sleep(0.2)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_percentage"} <= set(
        client.get_run(run.info.run_id).data.metrics)
    with runs.start_run(None, "without", system_metrics=False) as quiet:
        time.sleep(runs.SYSTEM_METRICS_INTERVAL * 2)
    assert not client.get_run(quiet.info.run_id).data.metrics


def _git(repo: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_dirty_ignores_what_the_pipeline_writes_but_not_a_changed_source(tmp_path):
    (tmp_path / "reports").mkdir()
    for rel in ("dvc.lock", "reports/lr_find.json", "reports/metrics.json", "params.yaml", "src.py"):
        (tmp_path / rel).write_text("committed\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "x")
    assert runs.git_info(tmp_path)["git_dirty"] == "false"
    for rel in ("dvc.lock", "reports/lr_find.json", "reports/metrics.json"):  # what `dvc repro` rewrites
        (tmp_path / rel).write_text("rewritten by a stage\n")
    assert runs.git_info(tmp_path)["git_dirty"] == "false"
    (tmp_path / "src.py").write_text("edited\n")
    assert runs.git_info(tmp_path) == {"git_commit": runs.git_info(tmp_path)["git_commit"], "git_dirty": "true"}
    _git(tmp_path, "checkout", "--", "src.py")
    (tmp_path / "params.yaml").write_text("edited\n")  # `dvc exp run -S` edits params: the run says so
    assert runs.git_info(tmp_path)["git_dirty"] == "true"


def test_the_lr_report_is_linked_by_its_run_only_when_that_run_is_in_this_store(tmp_path):
    import mlflow

    store.configure("lr", tmp_path)
    report = tmp_path / "reports/lr_find.json"
    report.parent.mkdir()
    report.write_text('{"mlflow_run_id": "0123456789abcdef0123456789abcdef"}\n')  # a run of another machine's store
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "reports")
    _git(tmp_path, "commit", "-qm", "the committed report")
    commit = runs.git_info(tmp_path)["git_commit"]
    assert runs.lr_report_provenance(report, "0123456789abcdef0123456789abcdef") == {
        "lr_find_report": f"lr_find.json from git commit {commit}"}
    report.write_text('{"mlflow_run_id": "0123456789abcdef0123456789abcdef", "edited": 1}\n')
    assert runs.lr_report_provenance(report, "0123456789abcdef0123456789abcdef") == {
        "lr_find_report": "lr_find.json, not committed, from an LR finder run that is not in this store"}
    with mlflow.start_run() as here:
        pass
    assert runs.lr_report_provenance(report, here.info.run_id) == {"lr_find_run_id": here.info.run_id}
    mlflow.MlflowClient().delete_run(here.info.run_id)
    assert "lr_find_run_id" not in runs.lr_report_provenance(report, here.info.run_id)


def test_a_checkpoint_model_is_logged_once_at_its_epoch_and_an_interrupted_one_is_completed(tmp_path):
    import mlflow
    from mlflow.entities import LoggedModelStatus

    write_fetched(tmp_path / "data")
    params = parse_params({"data": {"val_size": 100}})
    found = runs.datasets(params.data, tmp_path, ["train", "val"], split_seed=0)
    exp = store.configure("onecycle", tmp_path)
    client = mlflow.MlflowClient()
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        logger = runs.RunLogger(run_id, datasets=found)
        logger.log({"val/top1": 0.5, "train/loss": 1.0}, step=2)
        assert logger.flush()
        # an upload stopped by a kill leaves a PENDING model: the step run again completes that one
        pending = client.create_logged_model(exp, name="checkpoint-best", source_run_id=run_id,
                                             model_type=runs.CHECKPOINT_MODEL_TYPE)
        metrics = {"val/top1": 0.5, "train/loss": 1.0}
        first = runs.log_checkpoint_model(checkpoint, run_id, "checkpoint-best", 2, metrics, logger)
        assert runs.log_checkpoint_model(checkpoint, run_id, "checkpoint-best", 2, metrics, logger) == first
    assert first == pending.model_id
    model = client.get_logged_model(first)
    assert model.status == LoggedModelStatus.READY
    assert {(m.key, m.step, m.dataset_name, m.dataset_digest) for m in model.metrics} == {
        ("val/top1", 2, "fashion_mnist-val", found["val"].digest),
        ("train/loss", 2, "fashion_mnist-train", found["train"].digest)}
    # the run's own history gains no second point at that epoch
    assert [m.step for m in client.get_metric_history(run_id, "val/top1")] == [2]
    assert (first, 2) in {(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs}
    # a run with only checkpoint models has no served model for evaluate to link its metrics to
    assert runs.model_of_run(run_id) is None


def test_a_runs_models_are_found_by_name_and_an_interrupted_one_is_dropped(tmp_path):
    import mlflow
    from mlflow.entities import LoggedModelStatus

    exp = store.configure("onecycle", tmp_path)
    client = mlflow.MlflowClient()

    def model(run_id: str, name: str, status=LoggedModelStatus.READY, model_type=None) -> str:
        made = client.create_logged_model(exp, name=name, source_run_id=run_id, model_type=model_type)
        if status != LoggedModelStatus.PENDING:
            client.finalize_logged_model(made.model_id, status)
        return made.model_id

    with mlflow.start_run() as run:
        run_id = run.info.run_id
        checkpoint = model(run_id, "checkpoint-best", model_type=runs.CHECKPOINT_MODEL_TYPE)
        network = model(run_id, "network")
        pending = model(run_id, "network", LoggedModelStatus.PENDING)  # a log cut by kill -9
    with mlflow.start_run() as other:
        model(other.info.run_id, "network")
    assert {m.model_id for m in runs.run_models(run_id)} == {checkpoint, network, pending}
    assert [m.model_id for m in runs.run_models(run_id, "checkpoint-best", runs.CHECKPOINT_MODEL_TYPE)] == [checkpoint]
    assert runs.model_of_run(run_id) == network  # no classifier yet: the newest READY model that is no checkpoint
    assert runs.model_of_run(run_id, "checkpoint-best") == checkpoint
    assert runs.finished_model(run_id, "network") == network
    assert {m.model_id for m in runs.run_models(run_id, "network")} == {network}  # the PENDING one is deleted
    classifier = model(run_id, "model")
    assert runs.model_of_run(run_id) == classifier and runs.model_of_run(run_id, "network") == network


def test_no_module_queries_mlflows_tables_only_its_client_does():
    """MLflow's schema is MLflow's (it migrates it between versions): runs, experiments and models are read
    through MlflowClient. SQLite's own sqlite_master (the store's lock and corruption check) is not MLflow's."""
    import ast
    import re

    import mlflow.store.model_registry.dbmodels.models  # noqa: F401  (registers the registry's tables)
    import mlflow.store.tracking.dbmodels.models as tracking_models

    mlflow_tables = set(tracking_models.Base.metadata.tables)
    assert {"runs", "experiments", "experiment_tags", "logged_models"} <= mlflow_tables
    statement = re.compile(r"\s*(?:SELECT|INSERT|UPDATE|DELETE|REPLACE|WITH)\b", re.IGNORECASE)
    sql = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE)\s+[\"'`]?(\w+)", re.IGNORECASE)
    found = []
    for path in sorted((Path(runs.__file__).parents[1]).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and statement.match(node.value):
                found += [f"{path.name}: {node.value!r}" for table in sql.findall(node.value) if table in mlflow_tables]
    assert not found
