"""Offline by default: no import or command of onecycle makes a network call the user did not ask for.

Each check runs a fresh Python process with a ``sitecustomize`` hook first on ``PYTHONPATH`` (so every child
Python process has it too). The hook records and refuses, before anything leaves the machine, every
connection to a non-loopback address and every DNS lookup of a name other than localhost. The environment
is scrubbed of what would switch the libraries' telemetry off without onecycle's help (CI markers, pytest's
own variable, the switches themselves), so a pass means onecycle's defaults did it. The opt-in test shows
that the hook does see albumentations' update check and MLflow's telemetry when ONECYCLE_TELEMETRY=1 lets
them run (each refused by the hook: still no traffic).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import tiny
from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

HOOK = textwrap.dedent('''
    """Test hook: record and refuse every outbound (non-loopback) connection and DNS lookup of this process."""
    import errno
    import ipaddress
    import json
    import os
    import socket
    import sys

    _LOG = os.environ["OFFLINE_HOOK_LOG"]
    _LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


    def _is_local(host):
        if host is None:
            return True
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        host = str(host).strip("[]").lower()
        if host in _LOCAL_NAMES or host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False  # a name: looking it up is a DNS query


    def _record(kind, target):
        with open(_LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[:3], "call": kind, "target": repr(target)}) + "\\n")


    def _host(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", None):
            return None
        return address[0] if isinstance(address, tuple) else address


    _connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


    def connect(self, address):
        if not _is_local(_host(self, address)):
            _record("connect", address)
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"offline test: connect to {address!r} refused")
        return _connect(self, address)


    def connect_ex(self, address):
        if not _is_local(_host(self, address)):
            _record("connect_ex", address)
            return errno.ECONNREFUSED
        return _connect_ex(self, address)


    def _sendto(original):
        def sendto(self, data, *args):
            if not _is_local(_host(self, args[-1])):
                _record("sendto", args[-1])
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"offline test: sendto {args[-1]!r} refused")
            return original(self, data, *args)
        return sendto


    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.socket.sendto = _sendto(socket.socket.sendto)


    def _guard(name):
        original = getattr(socket, name)

        def lookup(host, *args, **kwargs):
            if not _is_local(host):
                _record(name, host)
                raise socket.gaierror(socket.EAI_NONAME, f"offline test: {name}({host!r}) refused")
            return original(host, *args, **kwargs)

        setattr(socket, name, lookup)


    for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        _guard(_name)
    socket.OFFLINE_TEST_HOOK = True
''')

# What turns the libraries' telemetry or update checks off without onecycle's help: the switches themselves, and
# the markers of CI and of a running pytest that MLflow and DVC read (MLflow 3.17: mlflow/telemetry/utils.py).
SCRUBBED = ("ONECYCLE_TELEMETRY", "NO_ALBUMENTATIONS_UPDATE", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
            "DVC_NO_ANALYTICS", "DVC_TEST", "ITERATIVE_DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS",
            "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER",
            "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL",
            "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "MLFLOW_TRACKING_URI")


class Offline:
    """Runs commands under the hook; ``calls()`` are the outbound attempts recorded so far."""

    def __init__(self, base: Path):
        self.hook = base / "offline-hook"
        self.hook.mkdir(parents=True, exist_ok=True)
        (self.hook / "sitecustomize.py").write_text(HOOK)
        self.log = self.hook / "outbound.jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env["PYTHONPATH"] = os.pathsep.join([str(self.hook), *filter(None, [env.get("PYTHONPATH")])])
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["OFFLINE_HOOK_LOG"] = str(self.log)
        env.update(extra)
        return env

    def run(self, cmd: list, cwd: Path, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=self.env(**extra))
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-2000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def python(self, code: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", textwrap.dedent(code)], cwd, **extra)

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture()
def offline(tmp_path) -> Offline:
    return Offline(tmp_path)


def test_the_hook_refuses_and_records_outbound_calls_and_lets_loopback_through(offline, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
        accepted.start()
        proc = offline.python(f"""
            import socket
            assert getattr(socket, "OFFLINE_TEST_HOOK", False), "the hook did not load: nothing is checked"
            socket.create_connection(("127.0.0.1", {port}), timeout=10).close()  # loopback: let through
            socket.getaddrinfo("localhost", {port})
            calls = [lambda: socket.getaddrinfo("pypi.org", 443),
                     lambda: socket.create_connection(("192.0.2.1", 80), timeout=1),  # TEST-NET-1
                     lambda: socket.socket().connect(("192.0.2.2", 80))]
            try:
                v6 = socket.socket(socket.AF_INET6)
                calls.append(lambda: v6.connect(("2001:db8::1", 443, 0, 0)))  # the IPv6 documentation range
            except OSError:
                print("no IPv6")
            for call in calls:
                try:
                    call()
                except OSError:
                    pass
                else:
                    raise AssertionError("an outbound call was let through")
            assert socket.socket().connect_ex(("192.0.2.3", 80)) != 0
            """, tmp_path)
        accepted.join(10)
    expected = [("getaddrinfo", "'pypi.org'"), ("getaddrinfo", "'192.0.2.1'"), ("connect", "('192.0.2.2', 80)")]
    if "no IPv6" not in proc.stdout:
        expected.append(("connect", "('2001:db8::1', 443, 0, 0)"))
    expected.append(("connect_ex", "('192.0.2.3', 80)"))
    assert [(c["call"], c["target"]) for c in offline.calls()] == expected


IMPORTS = """
    import os
    import onecycle  # first, as every command and DVC stage does
    import albumentations  # checks PyPI for a newer release on import unless told not to
    import mlflow  # starts MLflow's telemetry client
    import onecycle.cli
    print(os.environ.get("NO_ALBUMENTATIONS_UPDATE"), os.environ.get("MLFLOW_DISABLE_TELEMETRY"))
"""
# MLflow's telemetry client reaches out from a thread once a tracked call happens (here: creating an
# experiment and a run in a throw-away SQLite store); wait for it, up to 60 s.
TRACKED_RUN = IMPORTS + """
    import time
    mlflow.set_tracking_uri("sqlite:///store.db")
    mlflow.set_experiment("offline")
    with mlflow.start_run():
        mlflow.log_param("a", 1)
    log, deadline = os.environ["OFFLINE_HOOK_LOG"], time.time() + 60
    while time.time() < deadline and not (os.path.exists(log) and "mlflow-telemetry" in open(log).read()):
        time.sleep(0.2)
"""


@pytest.mark.slow  # torch, MLflow and albumentations: 5-10 s of imports on 2 cores
def test_importing_onecycle_and_its_libraries_makes_no_network_call(offline, tmp_path):
    proc = offline.python(IMPORTS, tmp_path)
    assert offline.calls() == []
    assert proc.stdout.split() == ["1", "true"]  # set by `import onecycle`: the environment had neither


def test_a_value_the_user_set_wins(offline, tmp_path):
    proc = offline.python("import os, onecycle; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])", tmp_path,
                          MLFLOW_DISABLE_TELEMETRY="1")
    assert proc.stdout.split() == ["1"]


@pytest.mark.slow  # MLflow creates a SQLite store's tables: 10 s and more
def test_onecycle_telemetry_1_leaves_the_libraries_at_their_defaults(offline, tmp_path):
    """The opt-in switch; also the proof that the hook sees the calls onecycle's defaults switch off."""
    proc = offline.python(TRACKED_RUN, tmp_path, ONECYCLE_TELEMETRY="1")
    assert proc.stdout.split() == ["None", "None"]
    names = {c["target"] for c in offline.calls()}
    assert "'pypi.org'" in names, names  # albumentations' update check
    assert any("mlflow-telemetry" in n for n in names), names  # MLflow's telemetry


def _stage_params(work: Path, **sections) -> Path:
    return tiny.tiny_params(work, **{
        "data": {"val_size": 64, "batch_size": 64},
        "lr_find": {"num_iter": 10},
        "train": {"epochs": 1},
        "mlflow": {"experiment": "offline", "registered_model": "offline-resnet"},  # the registry too
        **sections,
    })


@pytest.mark.slow
def test_every_stage_runs_without_a_network_call(offline, tmp_path):
    # fetch: an image folder (the Fashion-MNIST default reads Debian's files, or downloads when asked to)
    images = make_image_folder(tmp_path / "images")
    fetch_work = tmp_path / "fetch"
    fetch_work.mkdir()
    _stage_params(fetch_work, data={"dataset": "imagefolder", "source": str(images)})
    offline.run([BIN / "onecycle", "fetch"], fetch_work)
    assert (fetch_work / "data" / "imagefolder").is_dir()

    # lr_find -> train -> evaluate -> predict, as the DVC stages run them, on a tiny fetched dataset
    work = tmp_path / "work"
    tiny.write_fetched(work / "data", n_train=384, n_test=64)
    _stage_params(work)
    for stage in ("lr-find", "train", "evaluate"):
        offline.run([BIN / "onecycle", stage], work)
        assert offline.calls() == [], f"onecycle {stage} reached out: {offline.calls()}"
    from PIL import Image

    Image.new("L", (28, 28), 200).save(work / "shoe.png")
    out = offline.run([BIN / "onecycle", "predict", "shoe.png", "-k", "2"], work)
    assert "shoe.png" in out.stdout
    assert offline.calls() == []


def test_dvc_analytics_and_update_check_are_off_in_the_repo():
    config = (REPO / ".dvc" / "config").read_text()
    core = re.search(r"^\[core\]\n((?:[ \t]+.*\n?)*)", config, re.M)
    assert core, config
    settings = dict(re.findall(r"^\s+(\S+)\s*=\s*(\S+)", core.group(1), re.M))
    assert settings.get("analytics") == "false" and settings.get("check_update") == "false", settings


@pytest.mark.parametrize(("env", "expected"), [({}, "true 1"), ({"MLFLOW_DISABLE_TELEMETRY": "false"}, "false 1"),
                                               ({"ONECYCLE_TELEMETRY": "1"}, "- -")])
def test_make_exports_the_offline_defaults_to_what_it_starts(tmp_path, env, expected):
    """`make ui` starts MLflow's own server, which never imports onecycle: the Makefile sets the same defaults."""
    probe = tmp_path / "probe.mk"
    probe.write_text("probe:\n\t@echo $${MLFLOW_DISABLE_TELEMETRY:--} $${NO_ALBUMENTATIONS_UPDATE:--}\n")
    clean = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("MAKE")}
    proc = subprocess.run(["make", "-s", "-f", "Makefile", "-f", str(probe), "probe"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected.split()
