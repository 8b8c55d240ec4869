"""The foundation's accuracy promise on real data (slow: `make test-slow`).

Fashion-MNIST, small CNN, epsilon 0.1, 10k training images, 3 epochs: PGD-AT and FGSM-RS must end with test
PGD-20 accuracy at least 30 points above standard training's.
"""

import pytest
import ray

from robustune.resolve import load_config
from robustune.training import run_training

from conftest import fashion_mnist_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accuracy")
    ray.init(num_cpus=2, logging_level="WARNING")
    reports = {}
    try:
        for method in ("standard", "fgsm_rs", "pgd"):
            config = load_config(method, overrides=[
                f"data.data_dir={fashion_mnist_dir()}", "data.train_subset=10000", "train.epochs=3",
                "epsilon=0.1", "eval.points=500",
                f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}", f"tracking.output_dir={folder / 'runs'}"])
            reports[method] = run_training(config, log=lambda _: None).report
    finally:
        ray.shutdown()
    print("\n| method | clean | PGD-20 | AutoAttack (fast, 500 pts) | train s |")
    for method, r in reports.items():
        print(f"| {method} | {r['clean_acc']:.4f} | {r['pgd_acc']:.4f} | {r['aa_acc']:.4f} | {r['train_seconds']:.1f} |")
    return reports


@pytest.mark.parametrize("method", ["fgsm_rs", "pgd"])
def test_adversarial_training_beats_standard_by_30_points(results, method):
    assert results[method]["pgd_acc"] >= results["standard"]["pgd_acc"] + 0.30
    assert results[method]["aa_acc"] <= results[method]["pgd_acc"] + 0.05  # AutoAttack is the stronger attack
