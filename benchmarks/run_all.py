"""Run every benchmark and write their tables, with the commands and the machine, to one Markdown file.

    python benchmarks/run_all.py                  # CPU: -> benchmarks/RESULTS.md (about 80 minutes on 2 cores)
    python benchmarks/run_all.py --gpu            # GPU machine: -> benchmarks/RESULTS-gpu.md
    python benchmarks/run_all.py --only overhead scaling --out /tmp/results.md

Each benchmark runs as its own process (its own Ray and torch state); a benchmark that fails is reported
in the file with its exit status and the end of its output, and the others still run. With --only, the
other benchmarks' sections already in the output file are kept.

The GPU variant times the defenses with PreActResNet-18 on CIFAR-shaped synthetic data (`synthetic-cifar`:
3x32x32, 50k images; PreActResNet-18 needs 32x32 inputs) and with the small CNN on Fashion-MNIST, the
Ray Train + MLflow overhead of one GPU worker, and 1 -> 2 GPU workers when the machine has two GPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CIFAR_SHAPED = ["--set", "data.name=synthetic-cifar", "--set", "model.name=preact_resnet18"]


def cpu_benchmarks() -> dict[str, tuple[str, list[str]]]:
    return {
        "defense_cost": ("Per-defense epoch time versus its declared forward/backward floor (target: within 15%)",
                         ["defense_cost.py", "--repeats", "3", "--threads", "1"]),
        "defense_cost_resnet": ("The defenses with auxiliary networks next to PreActResNet-18 (CIFAR-shaped "
                                "synthetic data, 256 images, CPU)",
                                ["defense_cost.py", "--methods", "efgsm", "fgsm_sdi", "--train-subset", "256",
                                 "--repeats", "2", "--threads", "2", *CIFAR_SHAPED]),
        "overhead": ("Ray Train + MLflow overhead per epoch versus a bare loop (target: under 10%)",
                     ["overhead.py", "--epochs", "4"]),
        "scaling": ("Data-parallel scaling, 1 -> 2 workers", ["scaling.py", "--epochs", "3"]),
        "startup": ("Fixed cost per trial and per run (targets: a reused trial reaches its first epoch within 1 s; "
                    "at most 10% of a search's trial slots outside training epochs)", ["startup.py"]),
        "search_efficiency": ("Search efficiency: TPE + ASHA versus random versus grid (target: TPE + ASHA within "
                              "1 point of the grid's best with at most a third of its compute)",
                              ["search_efficiency.py", "--seeds", "0", "1", "2"]),
        "search_landscape": ("Search landscape: FGSM-RS measured on a 5x5 grid x 3 seeds, the searchers replayed on "
                             "it (how many trials the search-efficiency target needs)", ["search_landscape.py"]),
    }


def gpu_benchmarks(gpus: int) -> dict[str, tuple[str, list[str]]]:
    benchmarks = {
        "defense_cost_cifar": ("Per-defense epoch time versus floor: PreActResNet-18, CIFAR-shaped synthetic data",
                               ["defense_cost.py", "--device", "cuda", "--train-subset", "10000", "--threads", "4",
                                *CIFAR_SHAPED]),
        "defense_cost_fmnist": ("Per-defense epoch time versus floor: small CNN, Fashion-MNIST",
                                ["defense_cost.py", "--device", "cuda", "--train-subset", "20000", "--threads", "4"]),
        "overhead": ("Ray Train + MLflow overhead per epoch versus a bare loop, 1 GPU worker, PreActResNet-18",
                     ["overhead.py", "--gpu", "--epochs", "4", "--train-subset", "20000", *CIFAR_SHAPED]),
    }
    if gpus >= 2:
        benchmarks["scaling"] = ("Data-parallel scaling, 1 -> 2 GPU workers, PreActResNet-18",
                                 ["scaling.py", "--gpu", "--epochs", "3", "--model", "preact_resnet18",
                                  "--dataset", "synthetic-cifar"])
    return benchmarks


def previous_sections(path: Path) -> dict[str, str]:
    """title -> text of each `## title` section of an earlier results file."""
    if not path.is_file():
        return {}
    parts = ("\n" + path.read_text()).split("\n## ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1].strip() for part in parts if "\n" in part}


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = (f"; GPU: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else "; no GPU")
    return (f"{os.cpu_count()} CPU cores ({cpu}){gpu}; Python {platform.python_version()}, torch {torch.__version__}"
            f", {time.strftime('%Y-%m-%d')}")


def run(name: str, argv: list[str], workdir: Path) -> tuple[int, str, float]:
    """(exit status, the benchmark's table or the end of its output, seconds)."""
    table = workdir / f"{name}.md"
    command = [sys.executable, str(HERE / argv[0]), *argv[1:], "--markdown", str(table)]
    started = time.time()
    print(f"== {name}: {' '.join(argv)}", flush=True)
    result = subprocess.run(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    print(f"== {name}: exit {result.returncode} after {seconds:.0f}s", flush=True)
    if result.returncode == 0 and table.is_file():
        return 0, table.read_text(), seconds
    return result.returncode or 1, "```\n" + "\n".join(result.stdout.splitlines()[-30:]) + "\n```\n", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU variant (needs a CUDA device)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--out", help="Markdown file (default: benchmarks/RESULTS.md, or RESULTS-gpu.md with --gpu)")
    args = parser.parse_args()

    import torch

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: this machine has no CUDA device; run the GPU variant on a GPU machine, or drop --gpu")
    benchmarks = gpu_benchmarks(torch.cuda.device_count()) if args.gpu else cpu_benchmarks()
    unknown = sorted(set(args.only or []) - set(benchmarks))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(benchmarks)}")
    chosen = {name: spec for name, spec in benchmarks.items() if not args.only or name in args.only}
    out = Path(args.out or HERE / ("RESULTS-gpu.md" if args.gpu else "RESULTS.md"))

    workdir = Path(tempfile.mkdtemp(prefix="robustune-benchmarks-"))
    header = [f"# Benchmarks{' (GPU)' if args.gpu else ''}", "",
              f"Machine: {machine()}.", "",
              f"Produced by `python benchmarks/run_all.py{' --gpu' if args.gpu else ''}`; every ratio below was "
              "measured within one run of its script. Nothing here is asserted by the tests.", ""]
    # title -> section text, in the benchmarks' order; sections of benchmarks not run now are kept from the file
    kept = previous_sections(out) if args.only else {}
    sections = {title: kept[title] for title, _ in benchmarks.values() if title in kept}
    failed = 0
    for name, (title, argv) in chosen.items():
        status, table, seconds = run(name, argv, workdir)
        failed += status != 0
        sections[title] = "\n".join([f"`python benchmarks/{' '.join(argv)}` ({seconds:.0f} s"
                                     + (f", FAILED with exit status {status}" if status else "") + ")", "",
                                     table.rstrip()])
        ordered = [title for title, _ in benchmarks.values() if title in sections]
        body = [f"## {title}\n\n{sections[title]}\n" for title in ordered]
        out.write_text("\n".join(header) + "\n" + "\n".join(body))  # after every benchmark: a crash keeps these
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
