"""Security: checkpoints never run code, secrets never reach MLflow, local services bind to loopback, Ray's
token authentication stays on. Real parts: real pickles, a real training through the CLI with a real local Ray
and a real MLflow store, a real Ray head started the way the README says."""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from robustune import cli
from robustune.checkpoints import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, model_weights_from

from helpers import free_port, start_mlflow_server, stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


# ------------------------------------------------------------------------------- 1. malicious checkpoints
class Payload:
    """Unpickling this runs a shell command (here: create a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def write_malicious(kind: str, path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch.save":
        torch.save(Payload(marker), path)
    elif kind == "inside-a-robustune-checkpoint":  # the right format marker, a payload among the weights
        torch.save({"format": CHECKPOINT_FORMAT, "model": {"head.weight": torch.zeros(2), "x": Payload(marker)}}, path)
    else:  # a bare pickle (torch's legacy, non-zip format path)
        path.write_bytes(pickle.dumps(Payload(marker)))
    return path


KINDS = ["torch.save", "inside-a-robustune-checkpoint", "raw-pickle"]


@pytest.mark.parametrize("kind", KINDS)
def test_payload_is_live(tmp_path, kind):
    """The crafted files really run their code when unpickled without restrictions, so the refusals below
    are meaningful (this is what `weights_only=False` would do)."""
    marker = tmp_path / "pwned"
    path = write_malicious(kind, tmp_path / "evil.pt", marker)
    if kind == "raw-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch, kind):
    # Even with torch's escape hatch set: robustune passes weights_only=True explicitly, which it cannot override.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = write_malicious(kind, tmp_path / "run" / "epoch_001" / "state.pt", marker)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} cannot be loaded")):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        model_weights_from(tmp_path / "run")  # a run folder: its newest epoch_*/state.pt
    assert not marker.exists()


@pytest.mark.parametrize("command", ["init_from", "calibrate-eae"])
def test_malicious_checkpoint_is_refused_by_the_cli(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    marker = tmp_path / "pwned"
    path = write_malicious("torch.save", tmp_path / "final.pt", marker)
    args = (["train", "standard", "--set", "data.name=synthetic", "--set", f"train.init_from={path}"]
            if command == "init_from" else ["calibrate-eae", "--checkpoint", str(path)])
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {path} cannot be loaded" in err, err
    assert not marker.exists()
    assert not any((tmp_path / name).exists() for name in ("mlflow.db", "runs", "mlartifacts"))


# ---------------------------------------------------------------------------------- 2. secrets never logged
def fake_secrets() -> dict[str, str]:
    tag = "rtsecret" + secrets.token_hex(10)
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
        "AWS_SECRET_ACCESS_KEY": f"{tag}aws",
        "MLFLOW_TRACKING_USERNAME": f"{tag}user",
        "MLFLOW_TRACKING_PASSWORD": f"{tag}password",
        "MLFLOW_TRACKING_TOKEN": f"{tag}token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # the local cluster's real token in this run
        "HF_TOKEN": f"hf_{tag}",
        "GITHUB_TOKEN": f"ghp_{tag}",
    }


def leaks(data: bytes, values: list[str]) -> list[str]:
    return [value for value in values if value.encode() in data]


def test_secrets_in_the_environment_never_reach_mlflow_or_the_run_folder(tmp_path):
    values = fake_secrets()
    env = {**os.environ, **values, "PYTHONUNBUFFERED": "1"}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    args = ["train", "standard", "--set", "data.name=synthetic", "--set", "train.epochs=1",
            "--set", "data.val_size=200", "--set", "validation.examples=50", "--set", "data.test_subset=100",
            "--set", "eval.points=40", "--set", "eval.checks=false", "--set", "eval.protocol=custom",
            "--set", "eval.autoattack=none", "--set", "eval.pgd_steps=2", "--set", "tracking.run_name=secrets"]
    result = subprocess.run([sys.executable, "-m", "robustune.cli", *args], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    secret_values = list(values.values())
    assert leaks(result.stdout.encode() + result.stderr.encode(), secret_values) == []

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("robustune").experiment_id])
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": sorted(run.data.metrics)})
    assert leaks(logged.encode(), secret_values) == []
    assert run.data.params and "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    scanned = 0
    # Every artifact (text and binary: checkpoints embed the config), the run folder (Ray Train's storage,
    # checkpoints, config, report) and the MLflow database file itself.
    for path in [*artifacts.rglob("*"), *(tmp_path / "runs").rglob("*"), tmp_path / "mlflow.db"]:
        if path.is_file():
            assert leaks(path.read_bytes(), secret_values) == [], path
            scanned += 1
    assert scanned >= 6
    # The scan would see a leak: plant one in a copy of the logged config and look again.
    planted = (artifacts / "config.yaml").read_bytes() + values["AWS_SECRET_ACCESS_KEY"].encode()
    assert leaks(planted, secret_values) == [values["AWS_SECRET_ACCESS_KEY"]]


def test_redact_uri_hides_only_the_password():
    from robustune.tracking import redact_uri

    assert redact_uri("postgresql://robot:fake%40pw@db.internal:5432/mlflow") == \
        "postgresql://robot:***@db.internal:5432/mlflow"
    assert redact_uri("http://user:fake@127.0.0.1:5000") == "http://user:***@127.0.0.1:5000"
    for kept in ("http://127.0.0.1:5000", "sqlite:////tmp/a:b@c/mlflow.db", "databricks", "file:///x/y", None):
        assert redact_uri(kept) == kept
    # A search's best_config.yaml is logged from a config dict: redacted too, the caller's dict untouched.
    from robustune.tracking import public_config

    config = {"tracking": {"tracking_uri": "http://u:fake@h:1", "experiment": "e"}, "train": {"lr": 0.1}}
    assert public_config(config) == {"tracking": {"tracking_uri": "http://u:***@h:1", "experiment": "e"},
                                     "train": {"lr": 0.1}}
    assert config["tracking"]["tracking_uri"] == "http://u:fake@h:1"


def test_password_in_the_tracking_uri_is_never_logged(tmp_path):
    """A real `mlflow server`, addressed as http://user:password@host (MLflow's client sends basic auth): the
    training reaches it, and the password is in no param, tag, artifact (config.yaml, final.pt) or output."""
    password = "Tr41n-" + secrets.token_hex(8)
    store = tmp_path / "server"
    store.mkdir()
    port = free_port()
    server = start_mlflow_server(port, store)
    try:
        uri = "http://robot:" + password + f"@127.0.0.1:{port}"  # (not a literal: the repository scan)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        args = ["train", "standard", "--set", "data.name=synthetic", "--set", "train.epochs=1",
                "--set", "data.val_size=200", "--set", "validation.examples=50", "--set", "data.test_subset=100",
                "--set", "eval.points=40", "--set", "eval.checks=false", "--set", "eval.protocol=custom",
                "--set", "eval.autoattack=none", "--set", "eval.pgd_steps=2", "--set", f"tracking.tracking_uri={uri}"]
        result = subprocess.run([sys.executable, "-m", "robustune.cli", *args], cwd=tmp_path, env=env, text=True,
                                capture_output=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert password not in result.stdout + result.stderr
        assert f"robot:***@127.0.0.1:{port}" in result.stdout

        client = MlflowClient(f"http://127.0.0.1:{port}")
        [run] = client.search_runs([client.get_experiment_by_name("robustune").experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.params["tracking.tracking_uri"] == f"http://robot:***@127.0.0.1:{port}"
        assert password not in json.dumps({"params": run.data.params, "tags": run.data.tags})
        downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
        files = [path for path in downloaded.rglob("*") if path.is_file()]
        assert {"config.yaml", "final.pt"} <= {path.name for path in files}
        for path in files:
            assert password.encode() not in path.read_bytes(), path
        # The run folder keeps the real URI locally: --resume must reach the same server.
        [run_json] = (tmp_path / "runs").glob("*/run.json")
        assert json.loads(run_json.read_text())["tracking_uri"] == uri
    finally:
        stop_group(server)


# Sane patterns for committed credentials; placeholders (PASSWORD, <token>, ${VAR}, paths) are not secrets.
CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "password, secret or token with a literal value": re.compile(
        r"""(?i)(?:password|passwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token)["']?\s*[:=]\s*["']"""
        r"""(?![~/.$<{])([^"'\s]{8,})["']"""),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"<>]+:([^\s/@'\"<>]{3,})@[\w.-]+"),
}
PLACEHOLDER = re.compile(r"(?i)^(?:password|passwd|pass|secret|token|x+|\*+|\$\{?\w+\}?|<[^>]*>)$"
                         r"|fake|dummy|example|placeholder|changeme|redacted|wrong|invalid|not-the-|your[-_]")


def credential_findings(text: str) -> list[str]:
    found = []
    for name, pattern in CREDENTIAL_PATTERNS.items():
        for match in pattern.finditer(text):
            value = match.group(1) if pattern.groups else match.group(0)
            if not PLACEHOLDER.search(value):
                found.append(f"{name}: {match.group(0)[:60]}")
    return found


def test_credential_scanner_finds_planted_secrets_and_ignores_placeholders():
    # Built from pieces so this file itself holds no credential-shaped string.
    planted = {
        "AWS access key id": "aws_access_key_id = " + "AKIA" + "Q3ZXLN7T2PRW4KDM",
        "private key": "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
        "GitHub token": "ghp" + "_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5",
        "password, secret or token with a literal value": 'MLFLOW_TRACKING_PASSWORD = "' + "hunter2-" + 'correct-horse"',
        "credentials in a URL": "postgresql://mlflow:" + "s3cr3tPw" + "@db.internal:5432/mlflow",
    }
    for name, text in planted.items():
        assert any(f.startswith(name) for f in credential_findings(text)), name
    placeholders = [
        "postgresql://mlflow:PASSWORD@db.internal:5432/mlflow",
        'file_mounts: {"~/.ray/auth_token": "~/.ray/auth_token"}',
        'password = os.environ["MLFLOW_TRACKING_PASSWORD"]',
        "export RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)",
        'token: "${RAY_AUTH_TOKEN}"',
        'env={"RAY_AUTH_TOKEN": "not-the-token"}',
        'MLFLOW_TRACKING_PASSWORD="your-password-here"',
        "AKIA is how AWS access key ids start",
    ]
    for text in placeholders:
        assert credential_findings(text) == [], text


def test_repository_holds_no_credentials():
    """Tracked files, and new files not ignored by git, hold no credential-shaped strings."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    findings, scanned = [], 0
    for name in filter(None, listing.decode().split("\0")):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        scanned += 1
        findings += [f"{name}: {f}" for f in credential_findings(data.decode("utf-8", "replace"))]
    assert scanned > 50
    assert findings == []


# --------------------------------------------------------------------------------- 3. localhost by default
PROBE = r"""
import http.client, ipaddress, json, os, sys, time
from robustune.cluster import ensure_ray
ensure_ray()
import ray
info = ray._private.worker.global_worker.node.address_info

@ray.remote
def ping():
    return 1
ray.get(ping.remote())  # a worker process is up as well

def descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found

def socket_inodes(pid):
    inodes = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[link[8:-1]] = pid
    except OSError:
        pass
    return inodes

def decode(address, v6):
    host, port = address.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)

def probe(host, port):
    try:
        connection = http.client.HTTPConnection(host, port, timeout=3)
        connection.request("GET", "/")
        response = connection.getresponse()
        return {"status": response.status, "body": response.read(200).decode("utf-8", "replace")}
    except Exception as error:
        return {"error": type(error).__name__}

time.sleep(2)
inodes = {}
for pid in descendants(os.getpid()):
    inodes.update(socket_inodes(pid))
listeners = []
for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN, one of the cluster's sockets
            ip, port = decode(fields[1], v6)
            pid = inodes[fields[9]]
            name = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:80]
            entry = {"ip": ip, "port": port, "process": name}
            if not ipaddress.ip_address(ip).is_loopback:
                entry["probe"] = probe(info["node_ip_address"] if ipaddress.ip_address(ip).is_unspecified else ip, port)
            listeners.append(entry)
print("PROBE" + json.dumps({"webui_url": info["webui_url"], "node_ip": info["node_ip_address"],
                            "auth_mode": os.environ.get("RAY_AUTH_MODE"), "listeners": listeners}))
ray.shutdown()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads listening sockets from /proc")
@pytest.mark.parametrize("dashboard_asked", [False, True], ids=["default", "RAY_INCLUDE_DASHBOARD=1"])
def test_local_ray_dashboard_is_loopback_only_and_other_listeners_need_the_token(tmp_path, dashboard_asked):
    """ensure_ray() on a machine without a cluster starts no dashboard (Ray's job-submission API) unless asked
    (RAY_INCLUDE_DASHBOARD=1), and then it listens on 127.0.0.1 only. Ray's gRPC servers and agents listen on
    all interfaces by Ray's design (other nodes must reach them); each of those answers an unauthenticated
    HTTP request with 401/403 (token authentication), speaks no plain HTTP (gRPC, token-checked: see the head
    test below), or serves read-only Prometheus metrics."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_INCLUDE_DASHBOARD", *RAY_AUTH_VARS)}
    if dashboard_asked:
        env["RAY_INCLUDE_DASHBOARD"] = "1"
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, text=True, capture_output=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("PROBE")]
    report = json.loads(line[len("PROBE"):])
    assert report["auth_mode"] == "token"  # Ray >= 2.59 turns token auth on for a local ray.init() cluster
    if not dashboard_asked:
        assert not report["webui_url"], report["webui_url"]
    else:
        host, port = report["webui_url"].rsplit(":", 1)
        assert host == "127.0.0.1"
        dashboard = [entry for entry in report["listeners"] if entry["port"] == int(port)]
        assert dashboard and all(entry["ip"] == "127.0.0.1" for entry in dashboard), dashboard
    open_http = []
    for entry in report["listeners"]:
        outcome = entry.get("probe")
        if outcome is None or "error" in outcome or outcome["status"] in (401, 403):
            continue
        if outcome["status"] == 200 and outcome["body"].startswith("# "):  # Prometheus text format
            continue
        open_http.append(entry)
    assert open_http == [], f"HTTP served without the token on a non-loopback address: {open_http}"


def test_mlflow_commands_bind_to_localhost():
    """Every `mlflow server` / `mlflow ui` command the project shows or prints binds to 127.0.0.1: either it
    says --host 127.0.0.1, or it relies on MLflow's default host, which is 127.0.0.1."""
    import click
    from mlflow.cli import cli as mlflow_cli

    for name in ("server", "ui"):
        command = mlflow_cli.get_command(click.Context(mlflow_cli), name)
        [host] = [p for p in command.params if p.name == "host"]
        assert host.default in ("127.0.0.1", "localhost"), (name, host.default)

    files = [REPO / "README.md", REPO / "Makefile", *REPO.glob("docs/**/*.md"), *REPO.glob("clusters/**/*"),
             *REPO.glob("platform/robustune/*.py"), *REPO.glob("scripts/*")]
    commands = []
    for path in files:
        if path.is_file():
            text = path.read_text(errors="replace").replace("\\\n", " ")
            commands += [(path.name, m.group(0)) for m in re.finditer(r"mlflow (?:server|ui)\b[^\n`]*", text)]
    assert any(name == "cli.py" for name, _ in commands)  # the command `robustune train` prints
    for name, command in commands:
        hosts = re.findall(r"(?:--host|-h)[ =](\S+)", command)
        assert all(host in ("127.0.0.1", "localhost") for host in hosts), (name, command)


# ----------------------------------------------------------------------------------- 4. Ray token auth on
def test_no_code_path_turns_ray_token_authentication_off():
    """No code or config the project ships (platform/, methods/, scripts/, clusters/, benchmarks/, Makefile) sets
    RAY_AUTH_MODE=disabled (documentation may warn against it)."""
    pattern = re.compile(r"""(?i)AUTH_MODE[^\n]{0,40}?disabled|AUTH_MODE["']?\s*\n\s*value:\s*["']?disabled""")
    for planted in ('os.environ["RAY_AUTH_MODE"] = "disabled"', "RAY_AUTH_MODE=disabled ray start --head",
                    "env_vars: {RAY_AUTH_MODE: disabled}", 'monkeypatch.setenv("RAY_AUTH_MODE", "disabled")',
                    "- name: RAY_AUTH_MODE\n  value: disabled", '_system_config={"AUTH_MODE": "disabled"}'):
        assert pattern.search(planted), planted
    assert not pattern.search("RAY_AUTH_MODE=token ray start --head")
    paths = [REPO / "Makefile", *[p for folder in ("platform", "methods", "scripts", "clusters", "benchmarks")
                                  for p in (REPO / folder).rglob("*") if p.is_file()]]
    offenders = [str(p.relative_to(REPO)) for p in paths
                 if p.suffix not in (".pyc", ".md") and pattern.search(p.read_text(errors="replace"))]  # prose may warn
    assert offenders == []


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A Ray head started as the README says: a token generated once, then `RAY_AUTH_MODE=token ray start
    --head --dashboard-host=127.0.0.1`. Its own HOME (token file), temp dir (so no other `ray.init()` on this
    machine finds it) and free ports; stopped by its process group, never by `ray stop`."""
    tmp_path = tmp_path_factory.mktemp("head")
    home, stranger = tmp_path / "home", tmp_path / "stranger"  # the head's machine; a machine without the token
    home.mkdir()
    stranger.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *RAY_AUTH_VARS)}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    token = (home / ".ray" / "auth_token").read_text().strip()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's Unix socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--temp-dir={temp_dir}", "--num-cpus=1", "--block"],
        env={**env, "RAY_AUTH_MODE": "token"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # up (and asking for the token)
            except OSError:
                assert time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(0.5)
        yield {"env": {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}"}, "token": token,
               "dashboard": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "stranger": str(stranger)}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(head, *args, **env):
    result = subprocess.run(["ray", *args], env={**head["env"], **env}, text=True, capture_output=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_job_api_refuses_clients_without_the_token(token_head):
    # `ray job submit` on a machine without the token (no RAY_AUTH_MODE, no token file).
    code, output = ray_cli(token_head, "job", "submit", "--", "echo", "should-not-run", HOME=token_head["stranger"])
    assert code != 0 and "should-not-run" not in output and "Authentication" in output, output[-2000:]
    # Plain HTTP: no token, then a wrong one.
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {secrets.token_hex(32)}"}, 403)):
        request = urllib.request.Request(f"{token_head['dashboard']}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == status
    request = urllib.request.Request(f"{token_head['dashboard']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token_head['token']}"})
    assert urllib.request.urlopen(request, timeout=10).status == 200  # the refusals were about the token


def test_driver_without_the_token_cannot_join_over_grpc(token_head):
    joined = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={token_head['gcs']!r})"],
                            env={**token_head["env"], "HOME": token_head["stranger"], "RAY_ADDRESS": ""}, text=True,
                            capture_output=True, timeout=120)
    assert joined.returncode != 0 and "token" in joined.stderr.lower(), joined.stderr[-2000:]


def test_readme_commands_submit_with_the_token(token_head):
    # On the head's machine: RAY_AUTH_MODE=token, the token in ~/.ray/auth_token.
    code, output = ray_cli(token_head, "job", "submit", "--", "echo", "robustune-job-ran", RAY_AUTH_MODE="token")
    assert code == 0 and "robustune-job-ran" in output and "succeeded" in output, output[-2000:]
    # From another machine: the same token in RAY_AUTH_TOKEN.
    code, output = ray_cli(token_head, "job", "list", HOME=token_head["stranger"], RAY_AUTH_MODE="token",
                           RAY_AUTH_TOKEN=token_head["token"])
    assert code == 0 and "robustune-job-ran" in output, output[-2000:]
