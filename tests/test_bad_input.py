"""Bad input is refused before any work, with a message that names it and says what to do (docs/bad-input.md).

Each CLI case runs `robustune.cli.main` in an empty working directory and checks the exit code (2), the
message, and that nothing was started: no MLflow store, no run folder, and (where the refusal comes before
Ray) no Ray. Real parts throughout: real IDX files, real checkpoints, a real local Ray where Ray is needed.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from robustune import cli
from robustune.checkpoints import save_checkpoint
from robustune.config import ConfigError
from robustune.resolve import load_config
from robustune.data import dataset_info
from robustune.defense import create_defense, defense_class, list_defenses
from robustune.models import create_model
from robustune.cluster import ALLOW_PENDING_ENV, check_cluster_fits

SYNTHETIC = ["--set", "data.name=synthetic"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory; no tracking server or cluster from the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", ALLOW_PENDING_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def refused(workdir: Path, capsys, *args: str) -> str:
    """Run the CLI; assert exit code 2 and that no work started; return stderr."""
    ray_was_running = ray.is_initialized()
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"robustune {args[0]}: error: "), err
    leftovers = {p.name for p in workdir.iterdir()} & {"mlflow.db", "mlartifacts", "runs", "mlruns"}
    assert not leftovers, f"work started before the refusal: {leftovers}"
    if not ray_was_running:
        assert not ray.is_initialized(), "Ray was started before the refusal"
    return err


# ------------------------------------------------------------------------------------ names and values
@pytest.mark.parametrize("args, message", [
    pytest.param(["train", "nope"], "unknown method 'nope'; available: ", id="unknown-defense"),
    pytest.param(["train", "fgsm_rs", "--set", "data.name=imagenet"],
                 "data.name: unknown dataset 'imagenet'; valid datasets are: ", id="unknown-dataset"),
    pytest.param(["train", "fgsm_rs", *SYNTHETIC, "--set", "model.name=vit"],
                 "model: unknown model 'vit'; valid models: ", id="unknown-model"),
    pytest.param(["train", "fgsm_rs", *SYNTHETIC, "--set", "epsilon=1.5"], "epsilon must be in [0, 1]",
                 id="epsilon-above-1"),
    pytest.param(["train", "fgsm_rs", *SYNTHETIC, "--set", "epsilon=-8/255"], "epsilon must be in [0, 1]",
                 id="epsilon-negative"),
    pytest.param(["train", "fgsm_rs", *SYNTHETIC, "--set", "method.alpha_ratio=0"],
                 "method: alpha_ratio must be > 0, got 0.0", id="step-ratio-zero"),
    pytest.param(["train", "pgd", *SYNTHETIC, "--set", "method.alpha_ratio=-0.25"],
                 "method: alpha_ratio must be > 0, got -0.25", id="step-ratio-negative"),
    pytest.param(["train", "fgsm_rs", *SYNTHETIC, "--set", "validation.pgd_alpha_ratio=-1"],
                 "validation.pgd_alpha_ratio > 0", id="validation-step-negative"),
])
def test_bad_names_and_values(workdir, capsys, args, message):
    assert message in refused(workdir, capsys, *args)


def test_no_defense_accepts_a_step_or_radius_ratio_below_zero():
    """Every `*_ratio(s)` field of every defense (step sizes, radii, noise scales in units of epsilon) refuses
    a negative value, naming the field."""
    checked = 0
    for name in list_defenses():
        cls = defense_class(name)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not field.name.endswith(("_ratio", "_ratios")):
                continue
            value = [-0.5] if typing.get_origin(hints[field.name]) is list else -0.5
            with pytest.raises(ConfigError, match=field.name):
                create_defense(name, {field.name: value})
            checked += 1
    assert checked >= 15  # every defense with a step has at least one such field


# ----------------------------------------------------------------------------------------- config files
def test_malformed_config_yaml(workdir, capsys):
    bad = workdir / "my.yaml"
    bad.write_text("train:\n  epochs: [3\n")
    err = refused(workdir, capsys, "train", "fgsm_rs", "--config", bad)
    assert f"config file {bad} is not valid YAML" in err


def test_config_file_with_an_unknown_key(workdir, capsys):
    bad = workdir / "my.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    err = refused(workdir, capsys, "train", "fgsm_rs", "--config", bad)
    assert "unknown key 'train.epoch'; valid keys here: " in err and "epochs" in err


# ---------------------------------------------------------------------------------------- search spaces
@pytest.mark.parametrize("space, message", [
    pytest.param({"train.nope": {"type": "uniform", "low": 0.1, "high": 1.0}},
                 "key 'train.nope': not a knob of this run", id="unknown-key"),
    pytest.param({"method.alpha_ratio": {"type": "uniform", "low": 0.5, "high": 2.0, "mean": 1.0}},
                 "unknown field(s) mean for type 'uniform'", id="unknown-distribution-field"),
    pytest.param({"method.alpha_ratio": {"type": "uniform", "low": 2.0, "high": 0.5}},
                 "empty or inverted range low=2.0 high=0.5", id="low-above-high"),
    pytest.param({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}},
                 "loguniform needs low > 0, got 0.0", id="log-with-low-0"),
    pytest.param({"method.steps": {"type": "int", "low": 1, "high": 10}},
                 "key 'method.steps': not a knob of this run (defense 'fgsm_rs' has fields: alpha_ratio",
                 id="not-a-field-of-the-defense"),
])
def test_bad_search_space(workdir, capsys, space, message):
    path = workdir / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    err = refused(workdir, capsys, "search", "fgsm_rs", "--space", path, "--samples", "2", *SYNTHETIC)
    assert f"search space {path}" in err and message in err


# ------------------------------------------------------------------------------------------------- data
IDX_STEMS = {"train-images-idx3-ubyte": (40, 28, 28), "train-labels-idx1-ubyte": (40,),
             "t10k-images-idx3-ubyte": (20, 28, 28), "t10k-labels-idx1-ubyte": (20,)}


def idx_bytes(shape: tuple[int, ...], magic: int | None = None) -> bytes:
    data = (np.arange(int(np.prod(shape))) % 10).astype(np.uint8)
    magic = 0x0800 + len(shape) if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + data.tobytes()


def idx_folder(folder: Path, *, gz: bool = True) -> Path:
    """A Fashion-MNIST folder in the real IDX format (small)."""
    folder.mkdir()
    for stem, shape in IDX_STEMS.items():
        payload = idx_bytes(shape)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(payload) if gz else payload)
    return folder


def test_data_folder_missing(workdir, capsys):
    missing = workdir / "nowhere"
    err = refused(workdir, capsys, "train", "fgsm_rs", "--set", f"data.data_dir={missing}")
    assert "dataset 'fashion-mnist' not found; searched (in order):" in err and str(missing) in err
    assert "To fix:" in err


def test_idx_file_with_a_wrong_magic_number(workdir, capsys):
    folder = idx_folder(workdir / "fmnist")
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes((20, 28, 28), magic=0x00000804)))
    err = refused(workdir, capsys, "train", "fgsm_rs", "--set", f"data.data_dir={folder}")
    assert f"IDX file {bad} has magic number 0x00000804, expected magic 0x00000803" in err
    assert "replace it" in err


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_truncated_idx_file(workdir, capsys, gz):
    folder = idx_folder(workdir / "fmnist", gz=gz)
    bad = folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    err = refused(workdir, capsys, "train", "fgsm_rs", "--set", f"data.data_dir={folder}")
    assert f"IDX file {bad} is truncated" in err and "replace it" in err


def test_intact_idx_folder_passes_the_check(workdir):
    """The header check accepts good files (gzip and plain), so the refusals above are not false alarms."""
    from robustune.data import check_available

    check_available("fashion-mnist", idx_folder(workdir / "gz"))
    check_available("fashion-mnist", idx_folder(workdir / "plain", gz=False))


# ------------------------------------------------------------------------------------------ checkpoints
def model_state(name: str, dataset: str = "synthetic", **kwargs) -> dict:
    info = dataset_info(dataset)
    return create_model(name, num_classes=info.num_classes, input_shape=info.input_shape, mean=info.mean,
                        std=info.std, **kwargs).state_dict()


def test_init_from_a_checkpoint_of_another_model(workdir, capsys):
    path = save_checkpoint({"model": model_state("wide_resnet", "cifar10", depth=10, width=1)},
                           workdir / "wrn" / "final.pt")
    err = refused(workdir, capsys, "train", "standard", *SYNTHETIC, "--set", f"train.init_from={path}")
    assert f"checkpoint {path} does not fit model 'small_cnn'" in err
    assert "missing keys: " in err and "unexpected keys: " in err and "stages.conv1.0.weight" in err


def test_resume_with_a_checkpoint_whose_shapes_do_not_match(workdir, capsys):
    """A run folder whose newest checkpoint was saved from a wider model than its config says."""
    run_dir = workdir / "old" / "standard-run"
    config = load_config("standard", overrides=["data.name=synthetic",
                                                f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                                                f"tracking.output_dir={run_dir.parent}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (run_dir / "run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": config.tracking.tracking_uri}))
    state = save_checkpoint({"epoch": 1, "model": model_state("small_cnn", width=2)}, run_dir / "epoch_001" / "state.pt")
    err = refused(workdir, capsys, "train", "--resume", run_dir)
    assert f"checkpoint {state} does not fit model 'small_cnn' (shape mismatch: " in err
    assert " vs " in err and "expected" in err


# ---------------------------------------------------------------------------------- Ray cluster capacity
@pytest.fixture(scope="module")
def two_cpu_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["resources.num_workers=8"],
                 "resources: 8 workers with 1 CPU each cannot fit the Ray cluster (1 node, 2 CPUs; room for 2 such "
                 "workers); lower resources.num_workers", id="more-workers-than-cpus"),
    pytest.param(["resources.cpus_per_worker=3"], "1 worker with 3 CPUs each cannot fit the Ray cluster",
                 id="more-cpus-per-worker-than-a-node-has"),
    pytest.param(["resources.use_gpu=true", "resources.cpus_per_worker=1"],
                 "1 worker with 1 CPU and 1 GPU each cannot fit the Ray cluster (1 node, 2 CPUs, 0 GPUs; room for 0 "
                 "such workers); set resources.use_gpu=false", id="gpu-without-gpus"),
])
def test_more_than_the_cluster_has(two_cpu_ray, workdir, capsys, overrides, message):
    if ray.cluster_resources().get("CPU") != 2 or ray.cluster_resources().get("GPU"):
        pytest.fail("this test needs the 2-CPU, GPU-free local cluster of its fixture")
    args = [a for o in overrides for a in ("--set", o)]
    err = refused(workdir, capsys, "train", "standard", *SYNTHETIC, *args)
    assert message in err and f"set {ALLOW_PENDING_ENV}=1 to submit anyway" in err


def test_autoscaling_clusters_may_opt_in_to_waiting(two_cpu_ray, monkeypatch):
    config = load_config("standard", overrides=["data.name=synthetic", "resources.num_workers=8"])
    with pytest.raises(ConfigError, match="cannot fit the Ray cluster"):
        check_cluster_fits(config)
    monkeypatch.setenv(ALLOW_PENDING_ENV, "1")
    check_cluster_fits(config)  # the autoscaler may add nodes: no refusal
    check_cluster_fits(load_config("standard", overrides=["data.name=synthetic", "resources.num_workers=2",
                                                          "resources.cpus_per_worker=1"]))


# ---------------------------------------------------------------------------------------- NaN / inf loss
def test_non_finite_loss_fails_the_run_with_epoch_and_step(two_cpu_ray, workdir, capsys):
    """Not refused up front (it happens mid-training): the CLI exits 2 naming the epoch and step, and the
    MLflow run is FAILED."""
    code = cli.main(["train", "standard", *SYNTHETIC, "--set", "train.epochs=1", "--set", "train.lr=1e30",
                     "--set", "train.momentum=0", "--set", "data.val_size=200", "--set", "validation.examples=50",
                     "--set", "eval.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "loss became " in err and "at epoch 1, step " in err and "lower train.lr" in err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("robustune").experiment_id])
    assert run.info.status == "FAILED"
