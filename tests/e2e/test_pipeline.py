"""End to end: a temporary clone of this repo, tiny params, the real `dvc repro`, MLflow store, serving and UI.

One clone and one `dvc repro` (module fixture) serve every test here; each asserts on what a user
would look at: dvc.lock, `dvc metrics show`, the reports, the MLflow run, `onecycle predict`,
`mlflow models serve` and `mlflow ui` answering over HTTP on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEBIAN = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                       reason="needs Debian's dataset-fashion-mnist (make setup installs it as root)"),
    pytest.mark.skipif(shutil.which("git") is None, reason="needs git"),
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(cmd, cwd, timeout=600, check=True, **env):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 300, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds}s")


def tiny_pipeline_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["data"].update(train_subset=2048, val_size=512, batch_size=128)
    params["model"]["width"] = 0.125
    params["lr_find"].update(num_iter=15, start_lr=1e-3)
    params["train"].update(epochs=2, threads=2)
    params["mlflow"]["registered_model"] = "tiny-onecycle"
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def clone_of_this_repo(clone: Path) -> Path:
    """A git clone of this repo at ``clone`` with the working tree's uncommitted source, dvc.yaml and params."""
    run(["git", "clone", "-q", str(REPO), str(clone)], cwd=clone.parent)
    # the working tree's uncommitted source and params too, so the test checks what is being changed
    for rel in ("dvc.yaml", "params.yaml", "README.md", ".gitignore", "images/README.md"):
        (clone / rel).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / rel, clone / rel)
    shutil.rmtree(clone / "src")
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return clone


def commit_all(clone: Path, message: str) -> None:
    run(["git", "add", "-A", "src", "images"], cwd=clone)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", message], cwd=clone, check=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    clone = clone_of_this_repo(tmp_path_factory.mktemp("pipeline") / "onecycle")
    tiny_pipeline_params(clone / "params.yaml")
    commit_all(clone, "tiny params")
    proc = run([BIN / "dvc", "repro"], cwd=clone, timeout=900)
    return {"path": clone, "repro": proc}


def test_dvc_repro_runs_all_five_stages_and_locks_them(repo):
    clone = repo["path"]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "lr_find", "train", "evaluate", "publish"}
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 2
    published = json.loads((clone / "reports/publish.json").read_text())
    assert published["registered_model"] == "tiny-onecycle" and published["version"] == 1
    assert published["tta"] == "flip"
    for stage in ("fetch", "lr_find", "train", "evaluate", "publish"):
        assert f"Running stage '{stage}'" in repo["repro"].stdout
    assert (clone / "models/model.pt").is_file() and (clone / "checkpoints/last.pt").is_file()
    again = run([BIN / "dvc", "repro"], cwd=clone)
    assert "Running stage" not in again.stdout  # nothing changed, nothing re-runs


def _dvc_status(clone: Path) -> dict:
    return json.loads(run([BIN / "dvc", "status", "--json"], cwd=clone).stdout or "{}")


def test_dvc_status_changes_only_for_the_stages_that_run_an_edited_module(repo):
    clone = repo["path"]
    assert _dvc_status(clone) == {}
    edited = ["src/onecycle/stages/predict.py", "src/onecycle/stages/tune.py", "README.md",
              "src/onecycle/serving/classifier.py", "src/onecycle/training/loop.py", "src/onecycle/stages/fetch.py"]
    try:
        for rel in edited[:3]:  # modules no pipeline stage runs, and the docs
            with open(clone / rel, "a") as f:
                f.write("\n# an edit\n")
        assert _dvc_status(clone) == {}
        with open(clone / "src/onecycle/serving/classifier.py", "a") as f:  # how the server reads a request
            f.write("\n# an edit\n")
        assert set(_dvc_status(clone)) == {"publish"}  # re-publish, never re-train
        with open(clone / "src/onecycle/training/loop.py", "a") as f:  # the epoch loop: train runs it, lr_find does not
            f.write("\n# an edit\n")
        assert set(_dvc_status(clone)) == {"train", "publish"}  # (the serving edit is still there)
        with open(clone / "src/onecycle/stages/fetch.py", "a") as f:  # the fetch stage's own module
            f.write("\n# an edit\n")
        assert set(_dvc_status(clone)) == {"fetch", "train", "publish"}
    finally:
        run(["git", "checkout", "--", *edited], cwd=clone)
    assert _dvc_status(clone) == {}


def test_dvc_metrics_show_has_the_test_and_train_metrics(repo):
    out = json.loads(run([BIN / "dvc", "metrics", "show", "--json"], cwd=repo["path"]).stdout)
    files = next(iter(out.values()))["data"]
    test_top1 = files["reports/metrics.json"]["data"]["test"]["top1"]
    train = files["reports/train.json"]["data"]
    assert 0.3 < test_top1 <= 1.0  # 2 epochs (32 steps) on 2048 Fashion-MNIST images: well above chance (0.1)
    assert train["epochs"] == 2 and "mlflow_run_id" not in train  # run ids are in reports/runs.json


def test_reports_and_plots_are_complete(repo):
    clone = repo["path"]
    lr = json.loads((clone / "reports/lr_find.json").read_text())
    chosen = yaml.safe_load((clone / "params.yaml").read_text())["lr_find"]["suggestion"]
    assert len(lr["lrs"]) <= 15 and lr["suggestion"] == chosen and lr["suggested_lr"] == lr["suggestions"][chosen]
    history = (clone / "reports/history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss,train_top1,val_loss,val_top1,val_top5,lr,momentum")
    assert len(history) == 3
    per_class = (clone / "reports/per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,support,accuracy,precision,recall,f1" and len(per_class) == 11
    assert "Ankle boot" in per_class[-1]
    for png in ("lr_find.png", "confusion_matrix.png", "misclassified.png"):
        assert (clone / "reports" / png).stat().st_size > 10_000
    assert len((clone / "reports/predictions.csv").read_text().splitlines()) == 10_001
    rendered = run([BIN / "dvc", "plots", "show", "--json"], cwd=clone)
    names = set(json.loads(rendered.stdout)["data"])
    assert {"Loss", "Top-1 accuracy", "LR range test", "reports/predictions.csv"} <= names


def _mlflow_client(clone: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{clone / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_the_training_run_holds_train_test_and_lr_finder_links(repo):
    clone = repo["path"]
    client = _mlflow_client(clone)
    run_id = json.loads((clone / "reports/runs.json").read_text())["train"]
    run_ = client.get_run(run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.metrics["test_top1"] == pytest.approx(
        json.loads((clone / "reports/metrics.json").read_text())["test"]["top1"])
    lr_run = json.loads((clone / "reports/lr_find.json").read_text())["mlflow_run_id"]
    assert run_.data.tags["lr_find_run_id"] == lr_run
    # a clean clone, a plain `dvc repro`: what the pipeline rewrote (dvc.lock, reports) does not make it dirty
    assert run_.data.tags["git_dirty"] == "false" and client.get_run(lr_run).data.tags["git_dirty"] == "false"
    assert client.get_run(lr_run).data.tags["stage"] == "lr_find"
    assert run_.info.artifact_uri.startswith((clone / "mlruns/artifacts").as_uri())
    evaluate = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert "evaluate/confusion_matrix.png" in evaluate and "evaluate/misclassified.png" in evaluate


def _png_of_test_image(clone: Path, index: int, out: Path) -> int:
    from PIL import Image

    x = np.load(clone / "data/fashion_mnist/test_x.npy", mmap_mode="r")[index]
    y = int(np.load(clone / "data/fashion_mnist/test_y.npy")[index])
    Image.fromarray(np.asarray(x).squeeze()).resize((56, 56)).convert("RGB").save(out)  # other size, RGB
    return y


def test_predict_answers_each_file_and_reports_unreadable_ones(repo, tmp_path):
    clone = repo["path"]
    good = tmp_path / "shoe.png"
    _png_of_test_image(clone, 0, good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    proc = run([BIN / "onecycle", "predict", str(good), str(bad), "--json", "-k", "3"], cwd=clone, check=False)
    assert proc.returncode == 1
    answer = json.loads(proc.stdout.strip().splitlines()[0])
    assert answer["image"] == str(good) and len(answer["top_k"]) == 3
    probs = [c["probability"] for c in answer["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert "broken.jpg: not a readable image" in proc.stderr
    via_registry = run([BIN / "onecycle", "predict", str(good), "--model-uri", "models:/tiny-onecycle/1", "--json"],
                       cwd=clone)
    again = json.loads(via_registry.stdout.strip().splitlines()[-1])
    assert again["top_k"][0]["class"] == answer["top_k"][0]["class"]
    assert again["top_k"][0]["probability"] == pytest.approx(answer["top_k"][0]["probability"], abs=1e-4)


def test_mlflow_models_serve_answers_an_image_file_like_predict(repo, tmp_path):
    clone = repo["path"]
    good = tmp_path / "shoe.png"
    _png_of_test_image(clone, 0, good)
    expected = json.loads(run([BIN / "onecycle", "predict", str(good), "--json"], cwd=clone).stdout.splitlines()[-1])
    port = free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", "models", "serve", "-m", "models:/tiny-onecycle/latest", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", seconds=300, proc=server)
        import base64

        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(good.read_bytes()).decode()]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        top = answer["predictions"][0]["top_k"]
        assert [c["class"] for c in top] == [c["class"] for c in expected["top_k"]]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_mlflow_ui_shows_the_run_and_its_artifacts(repo):
    clone = repo["path"]
    port = free_port()
    ui = subprocess.Popen(["make", "-s", "ui", f"PORT={port}", f"VENV={BIN.parent}"], cwd=clone,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc=ui)
        run_id = json.loads((clone / "reports/runs.json").read_text())["train"]
        got = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30).read())
        metrics = {m["key"] for m in got["run"]["data"]["metrics"]}
        assert {"val/top1", "train/loss", "test_top1", "lr"} <= metrics
        hist = json.loads(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=val/top1", timeout=30).read())
        assert [m["step"] for m in hist["metrics"]] == [1, 2]
        arts = json.loads(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}", timeout=30).read())
        assert {"history.csv", "model_summary.txt"} <= {f["path"] for f in arts["files"]}
        exp_id = got["run"]["info"]["experiment_id"]
        printed = []  # the link comes once the server answers, after the server's own start-up lines
        while not any("MLflow UI: " in line for line in printed) and len(printed) < 200:
            printed.append(ui.stdout.readline())
        assert f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning\n" in [
            line.split("MLflow UI: ")[-1] for line in printed], printed
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)


BARE_CLIENT = """
import json, mlflow
client = mlflow.MlflowClient()
exp = client.get_experiment_by_name("onecycle")
print(json.dumps({"uri": mlflow.get_tracking_uri(), "kind": exp.tags.get("mlflow.experimentKind"),
                  "runs": [r.info.run_id for r in mlflow.search_runs([exp.experiment_id], output_format="list")]}))
"""


def test_a_bare_mlflow_client_and_mlflow_ui_in_the_clone_see_the_runs(repo, tmp_path):
    """No tracking URI anywhere: MLflow's own default (./mlflow.db) is the project's store."""
    clone = repo["path"]
    run_id = json.loads((clone / "reports/runs.json").read_text())["train"]
    seen = json.loads(run([sys.executable, "-c", BARE_CLIENT], cwd=clone).stdout.strip().splitlines()[-1])
    assert seen["uri"] == f"sqlite:///{clone / 'mlflow.db'}"  # MLflow's default, ./mlflow.db, resolved
    assert seen["kind"] == "custom_model_development"
    assert run_id in seen["runs"]
    assert not (clone / "mlruns" / "mlflow.db").exists()
    port = free_port()
    ui = subprocess.Popen([BIN / "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)], cwd=clone,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc=ui)
        exp = json.loads(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=onecycle", timeout=30).read())
        body = json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]]}).encode()
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
        assert run_id in {r["info"]["run_id"] for r in runs}
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)


def mlflow_chart_order(keys) -> list[str]:
    """The order of a run page's metric charts in MLflow 3.17 (RunsChartsCardConfig.getBaseChartAndSectionConfigs):
    sections named by the key's part before the last "/", sorted, then "Model metrics" (no prefix), then
    "System metrics" (system/); charts sorted by key within a section."""
    def section(key: str) -> tuple[int, str]:
        prefix = key.rpartition("/")[0]
        return (2, "") if prefix == "system" else (1, "") if not prefix else (0, prefix.lower())
    return sorted(keys, key=lambda k: (section(k), k))


def test_mlflow_chart_order_follows_the_ui_rules():
    keys = ["system/cpu", "lr", "b/x", "a/z", "a/y", "test_top1"]
    assert mlflow_chart_order(keys) == ["a/y", "a/z", "b/x", "lr", "test_top1", "system/cpu"]


def test_the_training_run_shows_its_datasets_system_metrics_and_per_class_table(repo, tmp_path):
    from onecycle.config import load_params
    from onecycle.tracking import runs

    clone = repo["path"]
    client = _mlflow_client(clone)
    run_id = json.loads((clone / "reports/runs.json").read_text())["train"]
    run_ = client.get_run(run_id)
    assert run_.info.run_name.startswith("train-")  # `dvc repro`: no DVC experiment name, a readable default
    inputs = {i.tags[0].value: i.dataset for i in run_.inputs.dataset_inputs if i.tags}
    assert set(inputs) == {"training", "validation", "testing"}
    assert {d.name for d in inputs.values()} == {"fashion_mnist-train", "fashion_mnist-val", "fashion_mnist-test"}
    assert {json.loads(d.source)["uri"] for d in inputs.values()} == {"data/fashion_mnist"}
    # the same fetched files, copied elsewhere (another machine), give the same digests
    shutil.copytree(clone / "data" / "fashion_mnist", tmp_path / "data" / "fashion_mnist")
    params = load_params(clone / "params.yaml")
    elsewhere = runs.datasets(params.data, tmp_path, ["train", "val", "test"], split_seed=0)
    assert {d.name: d.digest for d in inputs.values()} == {d.name: d.digest for d in elsewhere.values()}
    metrics = set(run_.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_percentage"} <= metrics
    assert not [k for k in metrics if k.startswith(("test/class_top1/", "test_class"))]  # a table, not a chart per class
    # The run page's first charts are the learning curves (MLflow 3.17's section order, see mlflow_chart_order)
    first = mlflow_chart_order(metrics)
    assert first[:5] == ["train/loss", "train/top1", "val/loss", "val/top1", "val/top5"], first
    assert first.index("test_top1") > first.index("val/top5") and first[-1].startswith("system/")
    table = json.loads(Path(client.download_artifacts(run_id, "evaluate/per_class.json", str(tmp_path))).read_text())
    assert table["columns"][:2] == ["class", "support"] and len(table["data"]) == 10
    assert {"path": "evaluate/per_class.json", "type": "table"} in json.loads(run_.data.tags["mlflow.loggedArtifacts"])
    assert "evaluate/per_class.csv" in {a.path for a in client.list_artifacts(run_id, "evaluate")}
    model = client.get_logged_model(runs.model_of_run(run_id, "network"))  # the network evaluate scored
    linked = {m.key: m for m in model.metrics}
    assert linked["test_top1"].dataset_name == "fashion_mnist-test"
    assert linked["test_top1"].dataset_digest == inputs["testing"].digest
    assert linked["test_top1"].value == pytest.approx(run_.data.metrics["test_top1"])


def test_dvc_experiments_carry_their_name_into_mlflow(repo):
    clone = repo["path"]
    run([BIN / "dvc", "exp", "run", "-n", "lowlr", "-S", "schedule.max_lr=0.02"], cwd=clone, timeout=900)
    shown = json.loads(run([BIN / "dvc", "exp", "show", "--json"], cwd=clone).stdout)
    text = json.dumps(shown)
    assert "lowlr" in text and "0.02" in text
    run_id = json.loads((clone / "reports/runs.json").read_text())["train"]
    run_ = _mlflow_client(clone).get_run(run_id)
    assert run_.data.tags["dvc_exp_name"] == "lowlr"
    assert run_.info.run_name == "lowlr"  # found in the UI's runs table by the experiment's name
    assert run_.data.params["schedule.max_lr"] == "0.02"


def test_a_tune_trials_recorded_command_reproduces_its_params(repo, tmp_path):
    """A worker tunes with its own params file (other subset and batch size than params.yaml); the command its
    trial records, run as it is, trains with exactly the trial's params."""
    import shlex

    clone = repo["path"]
    worker = yaml.safe_load((clone / "params.yaml").read_text())
    worker["data"].update(train_subset=1024, batch_size=64)
    worker["tune"].update(epochs=1, n_trials=1, study_name="reproduce", pruner="none")
    worker["train"]["threads"] = 1
    (tmp_path / "worker.yaml").write_text(yaml.safe_dump(worker, sort_keys=False))
    run([BIN / "onecycle", "tune", "--params", str(tmp_path / "worker.yaml")], cwd=clone, timeout=900)
    client = _mlflow_client(clone)
    experiment = client.get_experiment_by_name("onecycle").experiment_id
    trial = client.search_runs([experiment], "tags.stage = 'tune_trial' and tags.optuna_study = 'reproduce'")[0]
    command = trial.data.tags["dvc_command"]
    assert "-S data.train_subset=1024" in command and "-S data.batch_size=64" in command, command
    argv = shlex.split(command)
    assert argv[:3] == ["dvc", "exp", "run"]
    run([BIN / "dvc", "exp", "run", "--temp", "-n", "trial-again", *argv[3:]], cwd=clone, timeout=900)
    again = client.search_runs([experiment], "tags.stage = 'train' and tags.dvc_exp_name = 'trial-again'")[0]
    skip = ("tune.", "mlflow.", "train.threads", "train.resume", "train.checkpoint_every")
    differ = {k: (v, again.data.params.get(k)) for k, v in trial.data.params.items()
              if not k.startswith(skip) and again.data.params.get(k) != v}
    assert differ == {}, differ


def test_queued_experiments_log_to_the_workspace_store(repo):
    """`dvc exp run --queue` runs in a temporary copy; its MLflow runs must still land in mlruns/ here."""
    clone = repo["path"]
    client = _mlflow_client(clone)
    before = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("onecycle").experiment_id])}
    for name, lr in (("q1", "0.03"), ("q2", "0.05")):
        run([BIN / "dvc", "exp", "run", "--queue", "-n", name, "-S", f"schedule.max_lr={lr}"], cwd=clone)
    run([BIN / "dvc", "queue", "start", "-j", "1"], cwd=clone)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = run([BIN / "dvc", "queue", "status"], cwd=clone).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") >= 2, status
    shown = json.dumps(json.loads(run([BIN / "dvc", "exp", "show", "--json"], cwd=clone).stdout))
    assert "q1" in shown and "q2" in shown
    runs = client.search_runs([client.get_experiment_by_name("onecycle").experiment_id])
    new = {r.data.tags.get("dvc_exp_name"): r for r in runs if r.info.run_id not in before}
    assert {"q1", "q2"} <= set(new)
    assert new["q1"].data.params["schedule.max_lr"] == "0.03"
    assert new["q2"].data.metrics["test_top1"] > 0
    assert not list(clone.glob(".dvc/tmp/exps/**/mlflow.db"))  # nothing stranded in the temp copies


def test_a_dvc_remote_round_trips_the_outputs_into_a_fresh_clone(repo, tmp_path):
    clone = repo["path"]
    remote = tmp_path / "remote"
    run([BIN / "dvc", "remote", "add", "-f", "-d", "shared", str(remote)], cwd=clone)
    run(["git", "add", "-A"], cwd=clone)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline results"], cwd=clone,
        check=False)
    run([BIN / "dvc", "push"], cwd=clone)
    other = tmp_path / "other"
    run(["git", "clone", "-q", str(clone), str(other)], cwd=tmp_path)
    run([BIN / "dvc", "pull"], cwd=other)
    for rel in ("models/model.pt", "data/fashion_mnist/train_x.npy", "data/fashion_mnist/meta.json"):
        assert (other / rel).read_bytes() == (clone / rel).read_bytes(), rel
    status = run([BIN / "dvc", "status"], cwd=other).stdout
    # Everything cached came back; only checkpoints/ (cache: false by design, machine-local) is missing.
    assert "checkpoints" in status
    assert "model.pt" not in status and "fetch" not in status and "lr_find" not in status


def test_training_against_an_mlflow_tracking_server(repo, tmp_path):
    """A team server (SQL backend, artifacts served) via MLFLOW_TRACKING_URI, on loopback."""
    clone = repo["path"]
    port = free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc=server)
        run([BIN / "onecycle", "train"], cwd=clone, MLFLOW_TRACKING_URI=base)
        run_id = json.loads((clone / "reports/runs.json").read_text())["train"]
        got = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30).read())
        assert got["run"]["info"]["status"] == "FINISHED"
        assert {"val/top1", "lr"} <= {m["key"] for m in got["run"]["data"]["metrics"]}
        assert list((tmp_path / "server-artifacts").rglob("history.csv"))  # artifacts went through the server
        assert not list((clone / "mlruns").rglob(f"*{run_id}*"))  # nothing in the local store
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


# The README's "at a glance" view: the dataset, the headline metrics and the schedule's knobs (DVC 3 has no setting
# for the default columns: plain `dvc exp show` lists every key of params.yaml and every dependency).
GLANCE = ["--drop", ".*", "--keep", r"Experiment|Created|data\.dataset$|test\.|best_val_top1|best_epoch|"
          r"schedule\.(max_lr|pct_start|div_factor)$|train\.epochs$"]


def test_dvc_exp_show_has_the_headline_metrics_and_no_per_class_or_run_id_columns(repo):
    clone = repo["path"]
    shown = json.loads(run([BIN / "dvc", "exp", "show", "--json"], cwd=clone).stdout)
    workspace = next(e for e in shown if e["rev"] == "workspace")["data"]
    metrics = {f"{file}:{key}": value for file, result in workspace["metrics"].items()
               for key, value in _flatten(result["data"]).items()}
    assert set(metrics) == {
        "reports/metrics.json:test.loss", "reports/metrics.json:test.top1", "reports/metrics.json:test.top5",
        "reports/metrics.json:test.n", "reports/metrics.json:test.macro_f1",
        "reports/metrics.json:test.worst_class_top1", "reports/metrics.json:test.worst_class",
        "reports/train.json:best_val_top1", "reports/train.json:best_epoch", "reports/train.json:final_train_loss",
        "reports/train.json:final_val_top1", "reports/train.json:epochs", "reports/train.json:total_seconds"}
    per_class = (clone / "reports/per_class.csv").read_text().splitlines()[1:]
    worst = min(per_class, key=lambda line: float(line.split(",")[2]))
    assert metrics["reports/metrics.json:test.worst_class"] == worst.split(",")[0]
    assert json.loads((clone / "reports/runs.json").read_text())["train"]  # the run id moved here
    table = run([BIN / "dvc", "exp", "show", "--md", *GLANCE], cwd=clone).stdout
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert len(header) <= 20 and "test.top1" in header and "test.worst_class" in header, header
    assert "schedule.max_lr" in header and not any("per_class" in c or "run_id" in c for c in header), header
    assert "data.dataset" in header, header  # which data each experiment trained on


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_dvc_plots_show_the_per_step_schedule_and_a_log_x_lr_range_test(repo, tmp_path):
    clone = repo["path"]
    params = yaml.safe_load((clone / "params.yaml").read_text())
    plots = json.loads(run([BIN / "dvc", "plots", "show", "--json"], cwd=clone).stdout)["data"]
    lr = plots["Learning rate"][0]["content"]
    rows = lr["data"]["values"]
    steps_per_epoch = 2048 // 128  # tiny_pipeline_params: train_subset 2048, batch 128
    lrs = [float(r["lr"]) for r in sorted(rows, key=lambda r: int(r["step"]))]
    assert [int(r["step"]) for r in rows] == list(range(2 * steps_per_epoch))  # every step, not every epoch
    suggested_lr = json.loads((clone / "reports/lr_find.json").read_text())["suggested_lr"]
    # the workspace's schedule.max_lr: auto (the LR finder's), or a number an earlier test's `dvc exp run -S` set
    max_lr = suggested_lr if params["schedule"]["max_lr"] == "auto" else float(params["schedule"]["max_lr"])
    assert lrs[0] == pytest.approx(max_lr / params["schedule"]["div_factor"])
    assert max(lrs) == pytest.approx(max_lr)
    assert lrs.index(max(lrs)) == params["schedule"]["pct_start"] * 2 * steps_per_epoch - 1
    assert "Momentum" in plots
    range_test = plots["LR range test"][0]["content"]
    line, suggestion = range_test["layer"]
    assert line["encoding"]["x"]["scale"]["type"] == "log" and line["encoding"]["x"]["field"] == "lr"
    assert {layer["mark"]["type"] for layer in suggestion["layer"]} == {"rule", "text"}
    values = range_test["data"]["values"]
    (suggested,) = {float(v["suggested_lr"]) for v in values}
    assert suggested == pytest.approx(suggested_lr)
    assert {v["suggestion"] for v in values} == {params["lr_find"]["suggestion"]}
    out = tmp_path / "html"
    run([BIN / "dvc", "plots", "show", "-o", str(out)], cwd=clone)
    html = (out / "index.html").read_text()
    assert '"type": "log"' in html and "suggested_lr" in html and "optimizer step" in html


FACTORY = """from torch import nn


def build(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
"""


def test_dvc_exp_run_trains_every_schedule_policy_and_a_model_factory(repo):
    """Runs last on the shared clone: it leaves the workspace at its own experiments."""
    from onecycle.training.policies import POLICIES

    clone = repo["path"]
    steps = 2 * (2048 // 128)  # tiny_pipeline_params: 2 epochs of train_subset 2048 in batches of 128
    for policy in POLICIES:
        run([BIN / "dvc", "exp", "run", "-S", f"schedule.policy={policy}", "-S", "schedule.max_lr=0.1"], cwd=clone,
            timeout=900)
        rows = (clone / "reports/schedule.csv").read_text().splitlines()[1:]
        lrs = [float(r.split(",")[1]) for r in rows]
        assert [int(r.split(",")[0]) for r in rows] == list(range(steps)), policy
        expected = {"one_cycle": (0.004, 7, 4e-7), "cosine": (0.004, 7, 4e-7), "linear": (0.004, 7, 4e-7),
                    "step": (0.1, 0, 0.001), "constant": (0.1, 0, 0.1)}[policy]  # first LR, peak step, last LR
        assert (lrs[0], lrs.index(max(lrs)), lrs[-1]) == pytest.approx(expected), policy
        assert max(lrs) == pytest.approx(0.1), policy
        assert json.loads((clone / "reports/metrics.json").read_text())["test"]["n"] == 10000
    (clone / "mymodels").mkdir()
    (clone / "mymodels/__init__.py").write_text("")
    (clone / "mymodels/tiny.py").write_text(FACTORY)
    run([BIN / "dvc", "exp", "run", "-S", "model.name=mymodels.tiny:build", "-S", "schedule.policy=one_cycle",
         "-S", "schedule.max_lr=auto"], cwd=clone, timeout=900)
    trained = json.loads((clone / "reports/train.json").read_text())
    assert trained["epochs"] == 2 and trained["best_val_top1"] > 0.15  # learns (10 classes: chance is 0.1)
    assert json.loads((clone / "reports/publish.json").read_text())["version"] >= 2
    from onecycle.training import checkpoint as ckpt

    assert ckpt.load(clone / "models/model.pt")["model"]["name"] == "mymodels.tiny:build"
    assert "test" in json.loads((clone / "reports/metrics.json").read_text())


def test_dvc_repro_re_indexes_an_image_folder_when_images_are_added_and_a_moved_clone_finds_it(tmp_path):
    from conftest import make_image_folder

    clone = clone_of_this_repo(tmp_path / "onecycle")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"].update(dataset="imagefolder", source="images/pets")
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pets = make_image_folder(clone / "images" / "pets")
    commit_all(clone, "an image folder")
    assert run(["git", "status", "--porcelain", "images"], cwd=clone).stdout == ""  # images are not source
    first = run([BIN / "dvc", "repro", "fetch"], cwd=clone)
    assert "Running stage 'fetch'" in first.stdout and "note:" not in first.stdout
    meta = json.loads((clone / "data/imagefolder/meta.json").read_text())
    assert meta["source"] == "images/pets" and meta["num_train"] == 9  # relative: valid in any clone
    assert _dvc_status(clone).get("fetch") is None
    locked = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["fetch"]["outs"]

    shutil.copy(pets / "train/cat/cat_0.jpg", pets / "train/cat/cat_new.jpg")
    assert "fetch" in _dvc_status(clone)  # DVC sees the new image
    again = run([BIN / "dvc", "repro", "fetch"], cwd=clone)
    assert "Running stage 'fetch'" in again.stdout
    assert json.loads((clone / "data/imagefolder/meta.json").read_text())["num_train"] == 10
    assert yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["fetch"]["outs"] != locked

    # another dataset under images/ re-runs fetch, but this dataset's index (the stages after it) is unchanged
    locked = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["fetch"]["outs"]
    make_image_folder(clone / "images" / "other", classes=("a", "b"))
    run([BIN / "dvc", "repro", "fetch"], cwd=clone)
    assert yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["fetch"]["outs"] == locked

    moved = shutil.move(clone, tmp_path / "elsewhere")  # the workspace moves (or another clone gets the data)
    up_to_date = run([BIN / "onecycle", "fetch"], cwd=moved)
    assert up_to_date.stdout.startswith("up to date: imagefolder")
    assert f"from {Path(moved).resolve() / 'images' / 'pets'}" in up_to_date.stdout


def test_fetch_says_when_dvc_cannot_watch_an_image_folder(tmp_path):
    from conftest import make_image_folder

    clone = clone_of_this_repo(tmp_path / "onecycle")
    outside = make_image_folder(tmp_path / "outside")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"].update(dataset="imagefolder", source=str(outside))
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([BIN / "onecycle", "fetch"], cwd=clone).stdout
    assert f"note: {outside.resolve()} is outside images/" in out and "dvc repro -f fetch" in out
    assert json.loads((clone / "data/imagefolder/meta.json").read_text())["source"] == str(outside.resolve())
