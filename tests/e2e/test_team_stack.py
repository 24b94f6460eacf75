"""README "Scaling out", for real on loopback: an MLflow server on PostgreSQL with artifacts in S3, a DVC S3
remote, Optuna workers on PostgreSQL, a two-node torchrun, and the tracking server or S3 going away.

Each component is the real one, started by the fixtures below on 127.0.0.1 only:

* PostgreSQL: Debian's server binaries, a throw-away cluster (conftest's ``postgres_url``), one database for
  MLflow's backend store (its own role, with a password) and one for the Optuna study;
* S3: ``moto``'s server mode (``ThreadedMotoServer``, as dvc-s3's own tests use it) in this process, with a
  bucket for MLflow's artifacts and one for the DVC remote; only the MLflow server and DVC get its keys;
* ``mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://...`` as a subprocess that
  serves the artifacts, so the training processes get ``MLFLOW_TRACKING_URI`` and no S3 credentials.

Skipped only where no PostgreSQL server is installed (``make setup`` installs Debian's as root).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port, fresh_database
from tiny import tiny_params, write_fetched

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# made at run time, so that no file (this one included) holds them and a leak anywhere is a leak
S3_KEY, S3_SECRET = "AKIATEAMSTACK0000001", f"s3-{secrets.token_hex(12)}"
PG_PASSWORD = f"pg-{secrets.token_hex(12)}"
SECRETS = (S3_SECRET, PG_PASSWORD)
ARTIFACTS_BUCKET, DVC_BUCKET = "team-mlflow", "team-dvc"
MODEL = "team-onecycle"

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------ the components

def client_env(tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    """A training machine's environment: no AWS credentials, no MLflow/DVC state of this process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "AWS_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTEST_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(extra)
    return env


LOG: list[str] = []  # every command's output, scanned for credentials at the end of the module


def sh(cmd, cwd, env, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    LOG.append(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def wait_http(url: str, seconds: float = 120, proc: subprocess.Popen | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited early with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return time.monotonic() - start
        except Exception:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds}s")


class S3Server:
    """moto's S3 in this process on a fixed port, so that it can stop and start again (the data stays)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer("127.0.0.1", self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


class MlflowServer:
    """``mlflow server`` on PostgreSQL with artifacts in S3, served; stop() and start() for the outage test."""

    def __init__(self, backend: str, s3: S3Server, home: Path):
        self.backend, self.s3, self.home = backend, s3, home
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = home / "mlflow-server.log"

    def start(self) -> float:
        # the password from PGPASSWORD, not the command line (which `ps` shows to every user of the machine)
        env = client_env(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1",
                         MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint, PGPASSWORD=PG_PASSWORD)
        cmd = [BIN / "mlflow", "server", "--backend-store-uri", self.backend.replace(f":{PG_PASSWORD}@", "@"),
               "--artifacts-destination", f"s3://{ARTIFACTS_BUCKET}", "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1"]
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([str(c) for c in cmd], cwd=self.home, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return wait_http(self.uri + "/health", proc=self.proc)

    def stop(self, crash: bool = False) -> None:
        """SIGTERM (a graceful stop takes ~10 s), or with ``crash`` SIGKILL: gone at once, as in a crash."""
        if crash:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def s3():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    server = S3Server()
    server.start()
    for bucket in (ARTIFACTS_BUCKET, DVC_BUCKET):
        server.client().create_bucket(Bucket=bucket)
    yield server
    if server.server is not None:
        server.stop()


@pytest.fixture(scope="module")
def team_db(postgres_url):
    """MLflow's backend store: a database owned by a role with a password (the URL carries it)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE mlflow LOGIN PASSWORD '{PG_PASSWORD}'"))
        conn.execute(sqlalchemy.text("CREATE DATABASE mlflow OWNER mlflow"))
    engine.dispose()
    host = postgres_url.split("@", 1)[1].rsplit("/", 1)[0]
    return {"mlflow": f"postgresql://mlflow:{PG_PASSWORD}@{host}/mlflow",
            # the workers' URL carries a password too (the throw-away cluster trusts loopback, so it is not checked)
            "optuna": fresh_database(postgres_url, "optuna_team").replace("onecycle@", f"onecycle:{PG_PASSWORD}@", 1)}


@pytest.fixture(scope="module")
def mlflow_server(team_db, s3, tmp_path_factory):
    server = MlflowServer(team_db["mlflow"], s3, tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()
    LOG.append(server.log.read_text())


def _png(workdir: Path, out: Path) -> Path:
    import numpy as np
    from PIL import Image

    x = np.load(workdir / "data/fashion_mnist/test_x.npy", mmap_mode="r")[0]
    Image.fromarray(np.asarray(x).squeeze()).convert("RGB").save(out)
    return out


def tiny_team_params(workdir: Path, **sections) -> None:
    """tiny.py's seconds-long params with a registered model and the team's experiment."""
    tiny_params(workdir, **{"mlflow": {"experiment": "team", "registered_model": MODEL, "system_metrics": False},
                            "evaluate": {"tta": "none"}, **sections})


def clone_with_tiny_params(base: Path) -> Path:
    """test_pipeline's clone of this repo, the full params.yaml with tiny values, and a tiny fetched dataset
    recorded as the fetch stage's output (``dvc commit``: fetch checks the published Fashion-MNIST checksums)."""
    from test_pipeline import clone_of_this_repo, commit_all

    clone = clone_of_this_repo(base / "onecycle")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"].update(val_size=128, batch_size=64)
    params["model"]["width"] = 0.125
    params["lr_find"].update(num_iter=12)
    params["train"].update(epochs=2, threads=1, deterministic=True)
    params["mlflow"].update(experiment="team", registered_model=MODEL, system_metrics=False)
    params["evaluate"]["tta"] = "none"
    params["tune"].update(epochs=1, storage=None)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_fetched(clone / "data", n_train=640, n_test=100)
    commit_all(clone, "tiny params")
    sh([BIN / "dvc", "commit", "-f", "fetch"], clone, client_env())
    return clone


def test_the_team_recipe_end_to_end(mlflow_server, s3, team_db, tmp_path):
    """dvc repro against the server, dvc push to S3, a teammate's clone + dvc pull + predict, two tune workers
    on PostgreSQL, and mlflow models serve of @champion from the server."""
    uri = mlflow_server.uri
    clone = clone_with_tiny_params(tmp_path)
    env = client_env(uri)
    t0 = time.monotonic()
    sh([BIN / "dvc", "repro"], clone, env, timeout=900)
    timings = {"dvc repro": time.monotonic() - t0}

    # the run, its metrics, the registered model and the artifacts: on the server, the files in S3
    client = mlflow_server.client()
    runs = json.loads((clone / "reports/runs.json").read_text())
    run = client.get_run(runs["train"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1, 2]
    assert "test_top1" in run.data.metrics or any(k.startswith("test") for k in run.data.metrics)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served: the training machine has no S3 keys
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    keys = s3.keys(ARTIFACTS_BUCKET)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/history.csv") for k in keys), keys[:20]
    assert any(k.endswith("/best.pt") for k in keys) and any(k.endswith("MLmodel") for k in keys)  # checkpoint, models
    assert not list(clone.glob("mlruns/**/*.csv")) and not (clone / "mlflow.db").exists()  # nothing local
    sh([BIN / "onecycle", "promote"], clone, env)
    assert client.get_model_version_by_alias(MODEL, "champion").run_id == run.info.run_id

    # serving @champion from the server starts now (it takes a while); asked at the end
    port = free_port()
    serve = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                              "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        # dvc push to the S3 remote: the endpoint in .dvc/config (committed), the keys in .dvc/config.local
        t0 = time.monotonic()
        sh([BIN / "dvc", "remote", "add", "-d", "shared", f"s3://{DVC_BUCKET}/store"], clone, env)
        sh([BIN / "dvc", "remote", "modify", "shared", "endpointurl", s3.endpoint], clone, env)
        sh([BIN / "dvc", "remote", "modify", "--local", "shared", "access_key_id", S3_KEY], clone, env)
        sh([BIN / "dvc", "remote", "modify", "--local", "shared", "secret_access_key", S3_SECRET], clone, env)
        sh(["git", "add", "-A"], clone, env)
        sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], clone, env)
        sh([BIN / "dvc", "push"], clone, env)
        assert s3.keys(DVC_BUCKET)
        tracked = sh(["git", "grep", "-I", "-l", "-e", S3_SECRET, "-e", PG_PASSWORD], clone, env, check=False)
        assert tracked.stdout == ""  # no credential in anything committed

        # a teammate: git clone + the keys + dvc pull; data, model and reports without training
        mate = tmp_path / "teammate"
        sh(["git", "clone", "-q", str(clone), str(mate)], tmp_path, env)
        sh([BIN / "dvc", "remote", "modify", "--local", "shared", "access_key_id", S3_KEY], mate, env)
        sh([BIN / "dvc", "remote", "modify", "--local", "shared", "secret_access_key", S3_SECRET], mate, env)
        sh([BIN / "dvc", "pull"], mate, env)
        for rel in ("models/model.pt", "data/fashion_mnist/train_x.npy", "reports/metrics.json", "reports/train.json"):
            assert (mate / rel).read_bytes() == (clone / rel).read_bytes(), rel
        status = sh([BIN / "dvc", "status"], mate, env).stdout
        assert "checkpoints" in status and "model.pt" not in status and "lr_find" not in status
        png = _png(mate, tmp_path / "item.png")
        answer = json.loads(sh([BIN / "onecycle", "predict", png, "--json"], mate, env).stdout.splitlines()[-1])
        assert len(answer["top_k"]) >= 1
        timings["push, teammate's clone, pull, predict"] = time.monotonic() - t0

        # two tune workers (as on two machines) on PostgreSQL, logging to the server under one parent run
        t0 = time.monotonic()
        params = yaml.safe_load((mate / "params.yaml").read_text())
        params["tune"]["storage"] = team_db["optuna"]
        (mate / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        cmd = [str(BIN / "onecycle"), "tune", "--n-trials", "1"]
        workers = [subprocess.Popen(cmd, cwd=mate, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for _ in range(2)]
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        LOG.extend(outputs)
        assert [w.returncode for w in workers] == [0, 0], outputs
        exp = client.get_experiment_by_name("team")
        tune_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("optuna_study")
                     or r.data.tags.get("trial_number")]
        parents = [r for r in tune_runs if "mlflow.parentRunId" not in r.data.tags]
        nested = [r for r in tune_runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1, [r.data.tags for r in tune_runs]
        assert sorted(r.data.tags["trial_number"] for r in nested) == ["0", "1"]
        assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parents[0].info.run_id}
        timings["two tune workers"] = time.monotonic() - t0

        # the champion, served from the server's registry (artifacts through the server), answers a PNG
        t0 = time.monotonic()
        wait_http(f"http://127.0.0.1:{port}/ping", seconds=300, proc=serve)
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(png.read_bytes()).decode()]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert [c["class"] for c in served["predictions"][0]["top_k"]][:1] == [answer["top_k"][0]["class"]]
        timings["serve @champion (after the rest)"] = time.monotonic() - t0
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        LOG.append(serve.communicate(timeout=30)[0])
    print("timings:", {k: round(v, 1) for k, v in timings.items()})


# ------------------------------------------------------------------------------------------ outages

class Lines:
    """A process's merged output, line by line with the monotonic time each arrived."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, prefix: str, seconds: float = 300) -> float:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if line.startswith(prefix):
                    return t
            assert self.proc.poll() is None or self.thread.is_alive(), self.text()
            time.sleep(0.05)
        raise AssertionError(f"no line {prefix!r} within {seconds}s:\n{self.text()}")

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.thread.join(timeout=30)
        LOG.append(self.text())
        return code


def _epochs_between(lines: Lines, start: float, end: float) -> list[str]:
    return [line.split(":")[0] for t, line in lines.lines if start <= t <= end and line.startswith("epoch ")]


OUTAGE_SECONDS = 20


def test_training_goes_on_while_the_tracking_server_is_down_and_everything_arrives(mlflow_server, tmp_path):
    """The server dies (SIGKILL) after epoch 2 and starts again 20 s later: training goes on, nothing is lost."""
    epochs = 16
    write_fetched(tmp_path / "data", n_train=1152, n_test=50)  # 1024 training images: 16 steps an epoch
    tiny_team_params(tmp_path, train={"epochs": epochs},
                     mlflow={"experiment": "team", "registered_model": MODEL, "system_metrics": True})
    proc = subprocess.Popen([str(BIN / "onecycle"), "train"], cwd=tmp_path, env=client_env(mlflow_server.uri),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    try:
        lines.wait_for("epoch 2/")
        down = time.monotonic()
        mlflow_server.stop(crash=True)
        time.sleep(OUTAGE_SECONDS)
        restart = time.monotonic()
        mlflow_server.start()
        up = time.monotonic()
        code = lines.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = lines.text()
    assert code == 0, out[-4000:]
    during = _epochs_between(lines, down, up)
    kept = [line.split("; ")[-1] for _, line in lines.lines if "metric values kept" in line]
    figures = {"seconds down": round(up - down, 1), "of which restarting": round(up - restart, 1),
               "epochs finished while down": during, "buffered": kept,
               "recovered": [line for _, line in lines.lines if "reachable again" in line]}
    print("outage:", json.dumps(figures, indent=1))
    (tmp_path / "outage.json").write_text(json.dumps(figures))
    assert len(during) >= 2, figures  # training did not stop while the server was down
    assert kept and figures["recovered"], out[-3000:]

    client = mlflow_server.client()
    run_id = json.loads((tmp_path / "reports/runs.json").read_text())["train"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run_id, "val/top1")}) == list(range(1, epochs + 1))
    assert sorted({m.step for m in client.get_metric_history(run_id, "lr")}) == list(range(epochs * 16))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.csv", "schedule.csv"} <= artifacts, artifacts
    checkpoints = client.search_logged_models([run.info.experiment_id], filter_string=(
        f"source_run_id = '{run_id}' AND model_type = 'checkpoint'"))
    assert [m.name for m in checkpoints] == ["checkpoint-best"]
    assert [a.path for a in client.list_logged_model_artifacts(checkpoints[0].model_id)] == ["best.pt"]
    assert _network_logged(client, run) == 1  # the trained network arrived (publish registers after evaluate)


def test_a_server_that_stays_down_ends_in_one_line_and_the_run_completes_later(mlflow_server, tmp_path):
    """Down until after the last epoch: one error line, exit 1, nothing lost; `onecycle train` again (the server
    back) completes the run without training. MLFLOW_HTTP_REQUEST_MAX_RETRIES bounds how long the end waits."""
    write_fetched(tmp_path / "data", n_train=640, n_test=50)
    tiny_team_params(tmp_path, train={"epochs": 3})
    env = client_env(mlflow_server.uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
    proc = subprocess.Popen([str(BIN / "onecycle"), "train"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    try:
        lines.wait_for("train: ")  # the run exists on the server
        mlflow_server.stop(crash=True)
        code = lines.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
        if mlflow_server.proc.poll() is not None:
            mlflow_server.start()
    out = lines.text()
    assert code == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("onecycle train: error: ")]
    assert len(errors) == 1 and "finalization stopped at step 'metrics'" in errors[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert len([line for line in out.splitlines() if "metric values kept" in line]) == 1  # said once, not per epoch
    assert ckpt_finished(tmp_path)

    again = sh([BIN / "onecycle", "train"], tmp_path, client_env(mlflow_server.uri))
    assert not [line for line in again.stdout.splitlines() if line.startswith("epoch ")]  # nothing trained again
    print("stays down:", errors[0])
    client = mlflow_server.client()
    run_id = json.loads((tmp_path / "reports/runs.json").read_text())["train"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run_id, "val/top1")}) == [1, 2, 3]
    assert sorted({m.step for m in client.get_metric_history(run_id, "lr")}) == list(range(3 * 8))
    assert _network_logged(client, client.get_run(run_id)) == 1


def _network_logged(client, run) -> int:
    """How many raw networks (``network``) the training run logged."""
    return len(client.search_logged_models([run.info.experiment_id], filter_string=(
        f"source_run_id = '{run.info.run_id}' AND name = 'network'")))


def ckpt_finished(workdir: Path) -> bool:
    from onecycle.training import checkpoint as ckpt

    return bool(ckpt.load(workdir / "checkpoints/last.pt").get("finished"))


# ------------------------------------------------------------------------------------------ two nodes

def _node(base: Path, name: str, experiment: str) -> Path:
    """A machine's clone: the same data and params (as from git + dvc pull), its own checkpoints/ and reports/."""
    work = base / name
    write_fetched(work / "data", n_train=640, n_test=50)  # 512 training images: 8 global batches of 64
    tiny_team_params(work, train={"epochs": 3},
                     mlflow={"experiment": experiment, "registered_model": MODEL, "system_metrics": False})
    return work


def _torchrun_nodes(nodes: list[Path], uri: str) -> list[subprocess.Popen]:
    """README's multi-machine command, one process per node, the rendezvous and gloo on loopback."""
    port = free_port()
    env = client_env(uri, GLOO_SOCKET_IFNAME="lo")
    return [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(rank), "--rdzv-backend",
                              "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "team",
                              "--local-addr", "127.0.0.1", "--nproc-per-node", "1", "-m", "onecycle", "train"],
                             cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank, work in enumerate(nodes)]


def test_two_nodes_train_one_run_with_one_checkpoint_and_resume(mlflow_server, tmp_path):
    from onecycle.training import checkpoint as ckpt

    nodes = [_node(tmp_path, f"node{i}", "team-ddp") for i in range(2)]
    first = [Lines(p) for p in _torchrun_nodes(nodes, mlflow_server.uri)]
    try:
        first[0].wait_for("epoch 1/3")
        first[0].proc.send_signal(signal.SIGTERM)  # node 0 is preempted: the whole job stops with a checkpoint
        codes = [lines.finish(timeout=300) for lines in first]
    finally:
        for lines in first:
            if lines.proc.poll() is None:
                lines.proc.kill()
    assert codes[0] != 0, first[0].text()[-3000:]
    stopped = ckpt.load(nodes[0] / "checkpoints/last.pt")
    assert 1 <= stopped["epoch"] < 3 and not stopped.get("finished"), first[0].text()[-3000:]
    assert not (nodes[1] / "checkpoints/last.pt").exists()  # rank 0 alone checkpoints

    again = [Lines(p) for p in _torchrun_nodes(nodes, mlflow_server.uri)]
    codes = [lines.finish(timeout=600) for lines in again]
    assert codes == [0, 0], "\n".join(lines.text()[-3000:] for lines in again)
    out = again[0].text()
    assert "x 2 processes" in out and "epoch 3/3" in out and "epoch 1/3" not in out, out[-3000:]
    assert ckpt.load(nodes[0] / "checkpoints/last.pt")["finished"]
    assert not (nodes[1] / "checkpoints/last.pt").exists()

    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("team-ddp").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["processes"] == "2"
    assert run.data.tags["resumed_from_epoch"] == str(stopped["epoch"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1")) == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == list(range(24))
    assert json.loads((nodes[0] / "reports/runs.json").read_text())["train"] == run.info.run_id


# ------------------------------------------------------------------------------------------ S3 going away

def test_dvc_push_through_an_s3_outage_leaves_nothing_half_written(s3, tmp_path):
    """S3 stops in the middle of a `dvc push` for ~20 s: DVC's clear error (no traceback), every object in the
    bucket whole (content-addressed: its bytes hash to its key), and the next push completes."""
    import hashlib

    import numpy as np

    repo = tmp_path / "repo"
    repo.mkdir()
    env = client_env()
    sh(["git", "init", "-q"], repo, env)
    sh([BIN / "dvc", "init", "-q"], repo, env)
    rng = np.random.default_rng(0)
    (repo / "data").mkdir()
    for i in range(400):  # 400 objects of 64 KiB: the push takes long enough to be cut
        (repo / "data" / f"part-{i:03d}.bin").write_bytes(rng.bytes(64 * 1024))
    sh([BIN / "dvc", "add", "data"], repo, env)
    sh([BIN / "dvc", "remote", "add", "-d", "shared", f"s3://{DVC_BUCKET}/outage"], repo, env)
    sh([BIN / "dvc", "remote", "modify", "shared", "endpointurl", s3.endpoint], repo, env)
    sh([BIN / "dvc", "remote", "modify", "--local", "shared", "access_key_id", S3_KEY], repo, env)
    sh([BIN / "dvc", "remote", "modify", "--local", "shared", "secret_access_key", S3_SECRET], repo, env)

    push = subprocess.Popen([str(BIN / "dvc"), "push"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        start = time.monotonic()
        while not [k for k in s3.keys(DVC_BUCKET) if k.startswith("outage/")]:
            assert push.poll() is None and time.monotonic() - start < 120, "the push ended before S3 could stop"
            time.sleep(0.05)
        before = len([k for k in s3.keys(DVC_BUCKET) if k.startswith("outage/")])
        down = time.monotonic()
        s3.stop()
        time.sleep(OUTAGE_SECONDS)
        s3.start()
        up = time.monotonic()
        out = push.communicate(timeout=600)[0]
        ended = time.monotonic()
    finally:
        if push.poll() is None:
            push.kill()
        if s3.server is None:
            s3.start()
    LOG.append(out)
    assert "Traceback" not in out, out[-3000:]
    keys = [k for k in s3.keys(DVC_BUCKET) if k.startswith("outage/")]
    client = s3.client()
    for key in keys:  # files/md5/ab/cdef...: every object's bytes hash to its name
        body = client.get_object(Bucket=DVC_BUCKET, Key=key)["Body"].read()
        digest = key.split("/md5/", 1)[1].replace("/", "")
        if not digest.endswith(".dir"):
            assert hashlib.md5(body).hexdigest() == digest, key
    figures = {"seconds down": round(up - down, 1), "objects before the outage": before,
               "push exit code": push.returncode, "push ended seconds after S3 was back": round(ended - up, 1),
               "objects after": len(keys), "last lines": out.strip().splitlines()[-2:]}
    print("s3 outage:", json.dumps(figures, indent=1))
    if push.returncode != 0:
        assert [line for line in out.splitlines() if line.startswith("ERROR:")], out[-3000:]
    again = sh([BIN / "dvc", "push"], repo, env)
    status = sh([BIN / "dvc", "status", "-c"], repo, env).stdout
    assert "up to date" in status.lower() or "in sync" in status.lower(), status + again.stdout
    assert len([k for k in s3.keys(DVC_BUCKET) if k.startswith("outage/")]) == 401  # 400 files and the .dir


# ------------------------------------------------------------------------------------------ credentials

@pytest.mark.parametrize("text, masked", [
    ("aws_secret_access_key = abc/DEF+1", "aws_secret_access_key = ***"),
    ("AWS_ACCESS_KEY_ID=AKIATEAMSTACK0000001 used", "AWS_ACCESS_KEY_ID=*** used"),
    ("key AKIATEAMSTACK0000001 denied", "key *** denied"),
    ("https://b.s3.example/k?X-Amz-Credential=AKIAX%2F1&X-Amz-Signature=abc&X-Amz-Security-Token=zz",
     "https://b.s3.example/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("--backend-store-uri postgresql+psycopg://mlflow:pw@db:5432/mlflow", "--backend-store-uri postgresql+psycopg://mlflow:***@db:5432/mlflow"),
    ("s3://team-mlflow/1/abc/artifacts http://127.0.0.1:5000", "s3://team-mlflow/1/abc/artifacts http://127.0.0.1:5000"),
])
def test_redact_masks_s3_keys_and_the_tracking_servers_database_url(text, masked):
    from onecycle.core.redact import redact

    assert redact(text) == masked


def test_no_credential_reached_anything_logged(mlflow_server, s3):
    """After the tests above (same module): every command's output, the server's runs (params, tags) and every
    text artifact in the S3 bucket are free of the S3 secret key and the PostgreSQL password."""
    texts = [*LOG, mlflow_server.log.read_text()]  # the commands' output (when run with the tests above), the server's
    leaks = [text[max(0, text.find(s) - 200):text.find(s) + 50] for text in texts for s in SECRETS if s in text]
    client = mlflow_server.client()
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            blob = json.dumps([run.data.params, run.data.tags])
            leaks += [f"run {run.info.run_id}: {blob[blob.find(s) - 100:blob.find(s) + 50]}" for s in SECRETS
                      if s in blob]
            if run.data.params.get("tune.storage", "").startswith("postgresql"):
                assert ":***@" in run.data.params["tune.storage"]
    objects = s3.client()
    for key in s3.keys(ARTIFACTS_BUCKET):
        if key.endswith((".csv", ".json", ".txt", ".yaml", "MLmodel", ".py")):
            body = objects.get_object(Bucket=ARTIFACTS_BUCKET, Key=key)["Body"].read().decode(errors="replace")
            leaks += [f"s3://{ARTIFACTS_BUCKET}/{key}" for s in SECRETS if s in body]
    assert leaks == []
