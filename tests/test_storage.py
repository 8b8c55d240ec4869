"""Storage as a URI (robustune.storage): runs, searches and studies kept in an object store, read and written
from any node; bad storage refused before any work.

Real parts throughout: an S3-compatible server (`moto[server]`, standalone on 127.0.0.1) reached through
pyarrow's S3 filesystem with an endpoint override, a real `mlflow server`, and for the cluster test a real
two-node Ray cluster: `ray start --head` with no CPUs (it only schedules) and a second `ray start` node in its
own mount namespace (`unshare --mount`) with a private tmpfs over /tmp, so it cannot see any file the first
node's processes write there (the test folders, the driver's working folder, the head's Ray session).
Every trial and evaluation shard runs on the second node: it holds all the CPUs.
"""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import free_port, start_mlflow_server, stop_group, wait_until_it_answers

BUCKET = "robustune-test"
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_study.yaml"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SMALL_TRAIN = ["--set", "data.name=synthetic", "--set", "data.train_subset=256", "--set", "data.val_size=128",
               "--set", "validation.examples=64", "--set", "train.epochs=1", "--set", "eval.enabled=false"]


# --------------------------------------------------------------------------------------------- helpers
def start_moto(port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """moto's standalone S3 endpoint on 127.0.0.1:port, once it answers."""
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    return wait_until_it_answers(process, f"http://127.0.0.1:{port}/", "moto server", timeout=60)


def s3_filesystem(endpoint: str, **credentials):
    import pyarrow.fs as pafs

    host = endpoint.split("://", 1)[1]
    return pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1",
                             access_key=credentials.get("access_key", CREDENTIALS["AWS_ACCESS_KEY_ID"]),
                             secret_key=credentials.get("secret_key", CREDENTIALS["AWS_SECRET_ACCESS_KEY"]),
                             allow_bucket_creation=True)


def keys_under(fs, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                        "ROBUSTUNE_OUTPUT_DIR")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def robustune(*args, cwd: Path, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustune.cli", *map(str, args)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server with one bucket; `env` points robustune at it."""
    port = free_port()
    process = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3_filesystem(endpoint)
    fs.create_dir(BUCKET)

    class S3:
        pass

    server = S3()
    server.endpoint, server.fs = endpoint, fs
    server.env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
    yield server
    stop_group(process)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process talks to the test server (a fresh filesystem per test: the cache is keyed by bucket)."""
    from robustune import storage

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    storage.object_filesystem.cache_clear()
    yield s3
    storage.object_filesystem.cache_clear()


# ------------------------------------------------------------------------------------ locations, files
def test_location_is_a_path_for_folders_and_an_object_path_for_uris(tmp_path, monkeypatch):
    from robustune.storage import ObjectPath, StorageError, location, output_root

    assert location("runs") == Path("runs") and location(f"file://{tmp_path}") == tmp_path
    uri = location("s3://bucket/some/prefix/")
    assert isinstance(uri, ObjectPath) and str(uri) == "s3://bucket/some/prefix"
    assert (uri.bucket, uri.fs_path, uri.name, str(uri.parent)) == ("bucket", "bucket/some/prefix", "prefix",
                                                                    "s3://bucket/some")
    assert str(location("gcs://b/k")) == "gs://b/k" and location(str(uri / "run")) == uri / "run"
    for bad, words in (("s3://", "names no bucket"), ("ftp://host/x", "unsupported scheme 'ftp'"),
                       ("s3://b/../x", "'..' is not allowed")):
        with pytest.raises(StorageError, match=words):
            location(bad)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROBUSTUNE_OUTPUT_DIR", raising=False)
    assert output_root(None) == tmp_path / "runs"  # absolute: it travels to other processes
    monkeypatch.setenv("ROBUSTUNE_OUTPUT_DIR", "s3://bucket/studies")
    assert output_root(None) == location("s3://bucket/studies") and output_root("here") == tmp_path / "here"


def test_object_path_reads_writes_lists_and_moves_in_a_real_s3_server(s3_env):
    from robustune.storage import location, remove_tree, write_atomic

    root = location(f"s3://{BUCKET}/unit-files")
    run = root / "run-a"
    assert not run.exists() and not run.is_dir() and list(run.iterdir()) == []
    (run / "config.yaml").write_text("seed: 1\n")
    write_atomic(run / "run.json", b'{"run_id": "x"}')
    for epoch in (1, 2, 3):
        (run / f"epoch_{epoch:03d}" / "state.pt").write_bytes(b"weights")
    assert run.is_dir() and (run / "config.yaml").is_file() and not (run / "config.yaml").is_dir()
    assert json.loads((run / "run.json").read_text()) == {"run_id": "x"}
    assert [p.name for p in run.iterdir()] == ["config.yaml", "epoch_001", "epoch_002", "epoch_003", "run.json"]
    assert [p.name for p in sorted(run.glob("epoch_*"))] == ["epoch_001", "epoch_002", "epoch_003"]
    assert [str(p) for p in root.glob("run-*/run.json")] == [f"s3://{BUCKET}/unit-files/run-a/run.json"]
    (run / "config.yaml").rename(run / "config.old")
    assert not (run / "config.yaml").exists() and (run / "config.old").read_text() == "seed: 1\n"
    (run / "config.old").unlink()
    (run / "config.old").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (run / "config.old").unlink()
    remove_tree(run / "epoch_001")
    assert [p.name for p in run.glob("epoch_*")] == ["epoch_002", "epoch_003"]
    keys = keys_under(s3_env.fs, f"{BUCKET}/unit-files")
    assert keys == [f"{BUCKET}/unit-files/run-a/{name}" for name in
                    ("epoch_002/state.pt", "epoch_003/state.pt", "run.json")]


def test_checkpoints_and_run_files_live_in_the_object_store(s3_env):
    """save/load, the newest checkpoint, setting aside an unreadable one on resume: the same as on a disk."""
    from robustune.checkpoints import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint,
                                       set_aside_unreadable_checkpoints)
    from robustune.run import finished_report, run_id_of
    from robustune.storage import location

    run = location(f"s3://{BUCKET}/unit-checkpoints/run")
    assert latest_checkpoint(run) is None and run_id_of(run) is None and finished_report(run) is None
    for epoch in (1, 2):
        save_checkpoint({"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}},
                        run / f"epoch_{epoch:03d}" / "state.pt")
    assert latest_checkpoint(run) == run / "epoch_002"
    assert torch.equal(load_checkpoint(run / "epoch_002")["model"]["w"], torch.full((2,), 2.0))
    (run / "epoch_002" / "state.pt").write_bytes(b"cut short")  # a checkpoint a kill truncated
    warnings: list[str] = []
    assert set_aside_unreadable_checkpoints(run, warnings.append) == run / "epoch_001"
    assert (run / "epoch_002" / "state.pt.unreadable").is_file() and latest_checkpoint(run) == run / "epoch_001"
    assert len(warnings) == 1 and f"{run}/epoch_002/state.pt" in warnings[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(run / "epoch_009")


# ------------------------------------------------------------------------------ bad storage, refused
def assert_refused(result: subprocess.CompletedProcess, *phrases: str, command: str = "train") -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"robustune {command}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)


def test_unreachable_endpoint_is_refused_before_any_work(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = robustune("train", "fgsm_rs", *SMALL_TRAIN, "--set", f"tracking.output_dir=s3://{BUCKET}/runs",
                       cwd=tmp_path, env=cli_env(AWS_ENDPOINT_URL=endpoint, **CREDENTIALS))
    assert_refused(result, f"cannot reach the object store at {endpoint} for s3://{BUCKET}/runs",
                   "check AWS_ENDPOINT_URL")
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store, no Ray session started here


def test_missing_bucket_is_refused_and_not_created(tmp_path, s3):
    result = robustune("train", "fgsm_rs", *SMALL_TRAIN, cwd=tmp_path,
                       env=cli_env(ROBUSTUNE_OUTPUT_DIR="s3://no-such-bucket/runs", **s3.env))
    assert_refused(result, "bucket 'no-such-bucket' of s3://no-such-bucket/runs does not exist at "
                           f"{s3.endpoint}", "aws s3 mb s3://no-such-bucket")
    import pyarrow.fs as pafs

    assert s3.fs.get_file_info("no-such-bucket").type == pafs.FileType.NotFound
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["search", "fgsm_rs", "--samples", "2"], ["study", str(TINY)]])
def test_search_and_study_check_the_storage_before_any_work_too(command, tmp_path, s3):
    result = robustune(*command, "--set", "tracking.output_dir=s3://no-such-bucket/runs", cwd=tmp_path,
                       env=cli_env(**s3.env))
    assert_refused(result, "bucket 'no-such-bucket' of s3://no-such-bucket/runs does not exist",
                   command=command[0])
    assert list(tmp_path.iterdir()) == []


def test_wrong_credentials_are_refused_and_nothing_is_written(tmp_path):
    """moto checks signatures once its first 4 requests (our readiness probe, the IAM user, its key and its
    policy) are done."""
    import boto3

    port = free_port()
    process = start_moto(port, {"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, **{"region_name": "us-east-1",
                                                             "aws_access_key_id": "setup",
                                                             "aws_secret_access_key": "setup"})
        iam.create_user(UserName="robustune")
        key = iam.create_access_key(UserName="robustune")["AccessKey"]
        iam.put_user_policy(UserName="robustune", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        good = s3_filesystem(endpoint, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
        good.create_dir(BUCKET)
        result = robustune("train", "fgsm_rs", *SMALL_TRAIN, "--set", f"tracking.output_dir=s3://{BUCKET}/runs",
                           cwd=tmp_path, env=cli_env(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
                                                     AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG",
                                                     AWS_SECRET_ACCESS_KEY="wrong"))
        assert_refused(result, f"the object store at {endpoint} refused the credentials for s3://{BUCKET}/runs",
                       "AWS_ACCESS_KEY_ID")
        assert keys_under(good, BUCKET) == [] and list(tmp_path.iterdir()) == []
    finally:
        stop_group(process)


# ------------------------------------------------------------------ a cluster whose nodes share no disk
def ray_nodes(address: str, env: dict[str, str]) -> list[dict]:
    """The cluster's alive nodes as a driver sees them (in a subprocess: this test process keeps no driver)."""
    code = ("import json, ray; ray.init(logging_level='ERROR'); "
            "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
    result = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_ADDRESS": address}, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_nodes(s3, tmp_path_factory):
    """A head that only schedules (0 CPUs) and a second node with 2 CPUs in its own mount namespace, where /tmp
    is a private tmpfs; both with token authentication. Yields the address and the drivers' environment."""
    if os.geteuid() != 0:
        pytest.fail("the two-node test needs root (unshare --mount and mount -t tmpfs); CI runs as root")
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    # The cluster's own token (not whatever ~/.ray/auth_token an earlier test may have left): every node and
    # driver reads it from the environment.
    env = {**cli_env(**s3.env), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = f"/tmp/rt-{port}"  # short: Ray's socket paths must fit 107 characters
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    # The second node's /tmp is a private tmpfs. A checkout or virtual environment under /tmp is bound back into
    # it (from the old /tmp, still the shell's working directory once the tmpfs covers it: --no-canonicalize, or
    # mount would resolve the path in the new /tmp), else that node could not even start `ray`; nothing else of
    # the driver's /tmp shows there.
    under_tmp = {os.path.relpath(path, "/tmp") for path in (str(Path(__file__).resolve().parents[1]),
                                                            os.path.realpath(sys.prefix)) if path.startswith("/tmp/")}
    needed = sorted(rel for rel in under_tmp if not any(rel.startswith(other + "/") for other in under_tmp))
    keep = "".join(f'mkdir -p "/tmp/{rel}" && mount --no-canonicalize --bind "./{rel}" "/tmp/{rel}" && '
                   for rel in needed)
    hidden = ("cd /tmp && mount -t tmpfs tmpfs /tmp && " + keep + "cd / && exec " + " ".join(
        [ray, "start", f"--address={address}", "--num-cpus=2", "--num-gpus=0", "--block"]))
    second = None
    try:
        deadline = time.time() + 120
        while not Path(temp, "session_latest").exists():
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        second = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", hidden], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while True:
            nodes = ray_nodes(address, env)
            if len(nodes) == 2:
                break
            assert second.poll() is None, f"the second node's `ray start` exited with {second.returncode}: {nodes}"
            assert time.time() < deadline, f"the second node did not join in 120 s: {nodes}"
            time.sleep(1)
        yield {"address": address, "env": {**env, "RAY_ADDRESS": address}, "nodes": nodes}
    finally:
        for process in (second, head):
            if process is not None:
                stop_group(process)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = start_mlflow_server(port, store)
    yield f"http://127.0.0.1:{port}"
    stop_group(process)


def test_local_folder_on_a_multi_node_cluster_is_refused(two_nodes, tmp_path):
    nodes = two_nodes["nodes"]
    assert sorted(node.get("CPU", 0) for node in nodes) == [0, 2]  # every task runs on the second node
    result = robustune("train", "fgsm_rs", *SMALL_TRAIN, "--set", f"tracking.output_dir={tmp_path / 'runs'}",
                       "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path,
                       env=two_nodes["env"])
    assert_refused(result, f"the storage {tmp_path / 'runs'} is a folder on this machine that 1 other node(s) of "
                           "the Ray cluster do not see", "FileNotFoundError",
                   "set tracking.output_dir (or ROBUSTUNE_OUTPUT_DIR) to an object store")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def read_until(process: subprocess.Popen, marker: str, lines: list[str], timeout: float) -> bool:
    """Collect the process's output lines until one contains `marker` (True) or it ends (False)."""
    deadline = time.time() + timeout
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if marker in line:
            return True
        assert time.time() < deadline, f"no {marker!r} within {timeout} s:\n" + "\n".join(lines[-30:])
    return False


def test_study_on_two_nodes_sharing_no_disk_lands_in_the_bucket_and_resumes_on_a_fresh_driver(
        two_nodes, s3, mlflow_server, tmp_path):
    """The tiny study (its search with 4 trials and no budget, so that it is still going after its first
    trial) with its storage in the bucket: the driver is killed during the search, a driver in another, empty
    folder resumes it (the search from Tune's state in the bucket) and it completes."""
    import yaml
    from mlflow import MlflowClient

    definition = yaml.safe_load(TINY.read_text())
    definition["search"] = {"samples": 4, "epochs": 1}
    definition["defenses"][1].pop("budget")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(definition))

    prefix = f"{BUCKET}/two-node"
    env = {**two_nodes["env"], "ROBUSTUNE_OUTPUT_DIR": f"s3://{prefix}", "MLFLOW_TRACKING_URI": mlflow_server}
    first, second = tmp_path / "driver-1", tmp_path / "driver-2"
    first.mkdir()
    second.mkdir()
    driver = subprocess.Popen([sys.executable, "-m", "robustune.cli", "study", str(study_file)], cwd=first, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    try:
        assert read_until(driver, "[search] trial", lines, timeout=400), "\n".join(lines[-40:])
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-search, with everything it held locally
        driver.wait(timeout=30)
    finally:
        stop_group(driver)
    study_uri = next(line.split()[2] for line in lines if line.startswith("study folder s3://"))
    assert study_uri.startswith(f"s3://{prefix}/study-tiny-")

    resumed = subprocess.run([sys.executable, "-m", "robustune.cli", "study", "--resume", study_uri], cwd=second,
                             env=env, text=True, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resuming study study-tiny-" in resumed.stdout and "study finished" in resumed.stdout
    assert "resuming search " in resumed.stdout and "Tune saved no state" not in resumed.stdout

    study_key = study_uri[len("s3://"):]
    keys = set(keys_under(s3.fs, study_key))
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.parquet", "robust_vs_clean.png"):
        assert f"{study_key}/leaderboard/{name}" in keys
    state = json.loads(s3.fs.open_input_stream(f"{study_key}/study.json").read())
    assert len(state["runs"]) == 6 and not any(record["failed"] for record in state["runs"].values())
    for record in state["runs"].values():
        run = record["run_dir"][len("s3://"):]
        assert record["run_dir"].startswith(study_uri)
        for name in ("run.json", "config.yaml", "final.pt", "report.json", "epoch_002/state.pt",
                     "eval-quick/report.json"):
            assert f"{run}/{name}" in keys, (run, name)
        assert record["evaluation"]["aa_acc"] is not None
    trials = {re.match(r"(.*/searches/fgsm-tuned/trials/trial-[^/]+)/", key).group(1) for key in keys
              if "/searches/fgsm-tuned/trials/trial-" in key}
    assert trials and all(f"{trial}/run.json" in keys and any(k.startswith(f"{trial}/epoch_") for k in keys)
                          for trial in trials)
    # Nothing was written to either driver's disk: everything is in the bucket and the MLflow server.
    assert not (first / "runs").exists() and not (second / "runs").exists()
    assert not (first / "mlflow.db").exists() and not (second / "mlflow.db").exists()

    client = MlflowClient(mlflow_server)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["headline"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    study_runs = [run for run in children if run.data.tags.get("kind") == "study_run"]
    assert len(study_runs) == 6 and all(run.info.status == "FINISHED" for run in study_runs)
    assert all("test/aa_acc" in run.data.metrics for run in study_runs)
    every_run = client.search_runs([parent.info.experiment_id], max_results=1000)  # trials included
    assert len(every_run) > len(children) and all(run.info.status != "RUNNING" for run in every_run), \
        [(run.info.run_name, run.info.status) for run in every_run]
    artifacts = [item.path for item in client.list_artifacts(state["parent_run_id"], "leaderboard")]
    assert "leaderboard/leaderboard.md" in artifacts


def test_data_parallel_run_keeps_ray_train_storage_in_the_bucket_and_evaluates_from_it(s3, tmp_path):
    """Two Ray Train workers (TorchTrainer with the bucket as its storage filesystem), then `robustune
    evaluate` of the run by its URI, its evaluation state written next to it in the bucket."""
    run_uri = f"s3://{BUCKET}/data-parallel/two-workers"
    env = cli_env(**s3.env)
    trained = robustune("train", "fgsm_rs", *SMALL_TRAIN, "--set", "train.epochs=2", "--set",
                        "resources.num_workers=2", "--set", "resources.cpus_per_worker=1", "--set",
                        f"tracking.output_dir=s3://{BUCKET}/data-parallel", "--set", "tracking.run_name=two-workers",
                        cwd=tmp_path, env=env, timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert f"run folder {run_uri}" in trained.stdout
    evaluated = robustune("evaluate", run_uri, "--points", "32", "--batch-size", "32", "--no-checks", cwd=tmp_path,
                          env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    keys = set(keys_under(s3.fs, f"{BUCKET}/data-parallel/two-workers"))
    run = f"{BUCKET}/data-parallel/two-workers"
    for name in ("run.json", "config.yaml", "epoch_001/state.pt", "epoch_002/state.pt", "final.pt", "report.json",
                 "eval-quick/report.json"):
        assert f"{run}/{name}" in keys, (name, sorted(keys))
    report = json.loads(s3.fs.open_input_stream(f"{run}/eval-quick/report.json").read())
    assert report["source"] == f"{run_uri}/final.pt" and report["n_pgd"] == 32
    from mlflow import MlflowClient

    run_id = json.loads(s3.fs.open_input_stream(f"{run}/run.json").read())["run_id"]
    mlflow_run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["execution"] == "torch_trainer (2 workers)"
    assert "test/pgd_acc" in mlflow_run.data.metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlartifacts", "mlflow.db"]  # no run folder here
