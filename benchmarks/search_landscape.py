"""Search landscape: measure a defense's landscape once, then replay the searchers on it many times.

search_efficiency.py runs each search a few times for real, so it can say that a target was missed but not why:
a searcher that picks badly, or a trial count too small for any searcher on this landscape. This script estimates
that, and how many trials the target needs.

Any defense and space with numeric knobs (`--defense`, `--space`; by default FGSM-RS and PGD-AT as in
search_efficiency.py); the grid has grid-points^knobs points, so keep a space to 2-3 knobs.

1. Measured: every point of a grid over the defense's space (`--grid-points` values per knob), trained with each
   of `--seeds` (training seeds; each also draws its own validation split), full length, no early stopping: one
   robustune grid search whose space adds the seed as a choice. The landscape is the mean over seeds at each
   point (where one seed collapses, the point keeps that lower mean; a trial that failed part-way,
   e.g. on a non-finite loss, counts with its best epoch before it failed); the trial-to-trial noise
   is the spread between seeds, estimated robustly (median absolute deviation) so that one collapse does not
   set the noise everywhere.
2. Replayed: the searchers as robustune ships them (TPE from the defaults and its Sobol start-up, random; the
   same samplers and start points, `robustune.search.optuna_sampler`), Optuna's GP sampler with the same
   start-up (not shipped: does a stronger model help at a few trials?), and the reference grid of search_efficiency.py
   (`--reference-grid` values per knob), each `--replays` times with other searcher seeds. A trial's result is
   the landscape, linearly interpolated (on the log scale for log-uniform knobs), plus Gaussian noise of the
   measured spread; suggestions come in batches of `--batch` (the trials at once), each batch told together, as
   in a real search; the winner is the trial with the highest result.

The table gives, per searcher and trial count, the landscape's value at the chosen knobs minus its value at the
reference grid's choice (in points): the mean over replays, the 10th percentile, and the share of replays within
1 and within 2 points (search_efficiency.py's target: mean within 1, every seed within 2). Assumptions, to read
the numbers with: linear between grid points, the same Gaussian noise everywhere, no ASHA (at 4 epochs its one
rung, epoch 3, saves a quarter of a stopped trial's compute). A seed that collapses (FGSM-RS's collapses here end
at the constant predictor: a start that never leaves it, or a fall back to it at a high learning rate) is
not a Gaussian draw: where collapses are common the robust spread rises and the replays blur, and a landscape of
2 seeds can miss them; FGSM-RS's answer changed with a third seed (benchmarks/RESULTS.md), so measure 3 or more.

    python benchmarks/search_landscape.py [--defense fgsm_rs] [--space FILE] [--grid-points 5] [--seeds 0 1 2]
        [--epochs 4] [--trials 5 8 12 16] [--reference-grid 4] [--replays 40] [--landscape RESULTS_PARQUET]
        [--markdown FILE]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from search_efficiency import FIXED, SPACES, base_config, shared_overrides  # noqa: E402  the same setting

SEARCHERS = ("tpe", "random", "gp")
REFERENCE_GRID = {"fgsm_rs": 4, "pgd": 3}  # search_efficiency.py's default grids
DEFAULT_REFERENCE_GRID = 3
NUMERIC = ("uniform", "loguniform", "int")  # knobs a landscape can interpolate along
MAD_TO_SD = 1.4826  # a normal distribution's standard deviation per median absolute deviation


def space_path(defense: str, space_file: str | None) -> Path:
    """The space searched: --space, else search_efficiency.py's for its defenses, else the defense's shipped one."""
    from robustune.search_space import default_space_path

    return Path(space_file or SPACES.get(defense) or default_space_path(defense))


def measure(defense: str, space_file: Path, *, grid_points: int, seeds: list[int], epochs: int,
            base_overrides: list[str], workdir: Path) -> Path:
    """Runs the grid x seeds search; the path of its results.parquet."""
    import yaml

    from robustune import progress
    from robustune.search import RESULTS_FILE, SearchSettings, start_search

    space_yaml = yaml.safe_load(space_file.read_text())
    space_yaml["seed"] = {"type": "choice", "values": list(seeds)}
    with_seeds = workdir / f"{defense}-landscape.yaml"
    with_seeds.write_text(yaml.safe_dump(space_yaml))
    settings = SearchSettings(defense=defense, samples=1, epochs=epochs, searcher="grid", scheduler="none",
                              grid_points=grid_points, space_file=str(with_seeds))
    with progress.showing(f"landscape {defense}"):  # trials done and time left, as a search from the CLI shows
        summary = start_search(settings, base_config(defense, f"{defense}-landscape", base_overrides, workdir),
                               log=lambda _: None)
    return Path(summary["search_dir"]) / RESULTS_FILE


class Landscape:
    """The measured grid: mean objective per point over seeds, interpolated between points; the noise's spread."""

    def __init__(self, rows, space: dict):
        from scipy.interpolate import RegularGridInterpolator

        self.space, self.keys = space, list(space)  # numeric knobs only (checked before any work)
        columns = [f"param.{key}" for key in self.keys]
        missing = [c for c in [*columns, "param.seed", "best.objective"] if c not in rows.columns]
        if missing:
            raise SystemExit(f"the landscape's results lack columns {missing}: pass the results.parquet of a grid "
                             "search over this defense's space with the seed as a choice")
        unfinished = rows[rows["best.objective"].isna()]
        if len(unfinished):
            first = unfinished.iloc[0]
            raise SystemExit(f"{len(unfinished)} landscape trial(s) have no result, e.g. "
                             f"{ {c: first[c] for c in [*columns, 'param.seed']} }: rerun them")
        # A trial that failed after some epochs (a non-finite loss) counts with its best epoch before it failed.
        self.failed = int((rows["status"] != "completed").sum()) if "status" in rows.columns else 0
        per_point = rows.groupby(columns)["best.objective"]
        counts = per_point.count()
        if counts.nunique() != 1 or counts.iloc[0] < 2:
            raise SystemExit("every landscape point needs the same number (at least 2) of seeds; got "
                             f"{sorted(set(counts))}")
        self.seeds = int(counts.iloc[0])
        means = per_point.mean()
        self.axes = [np.array(sorted(rows[c].unique()), dtype=float) for c in columns]
        shape = tuple(len(axis) for axis in self.axes)
        if len(means) != math.prod(shape):
            raise SystemExit(f"the landscape is not a full grid: {len(means)} points for axes of sizes {shape}")
        self.mean = means.to_numpy().reshape(shape)  # groupby sorts by every key, as the axes are
        residuals = (rows["best.objective"] - per_point.transform("mean")).abs()
        # With k seeds a residual from the point's own mean has variance sd^2 (k-1)/k.
        self.noise_sd = float(MAD_TO_SD * residuals.median() * math.sqrt(self.seeds / (self.seeds - 1)))
        self._interpolate = RegularGridInterpolator([self._scaled(k, axis) for k, axis in zip(self.keys, self.axes)],
                                                    self.mean)

    def _scaled(self, key: str, value):
        return np.log(value) if self.space[key].type == "loguniform" else np.asarray(value, dtype=float)

    def value(self, params: dict) -> float:
        point = [float(np.clip(self._scaled(k, params[k]), self._scaled(k, axis[0]), self._scaled(k, axis[-1])))
                 for k, axis in zip(self.keys, self.axes)]
        return float(self._interpolate([point])[0])

    def best(self) -> tuple[float, dict]:
        index = np.unravel_index(int(np.argmax(self.mean)), self.mean.shape)
        return float(self.mean[index]), {k: float(axis[i]) for k, axis, i in zip(self.keys, self.axes, index)}


def replay(landscape: Landscape, searcher: str, trials: int, replay_seed: int, batch: int, defense: str,
           base: dict) -> float:
    """One search on the landscape: the landscape's value at its winner (the trial with the best noisy result)."""
    import optuna

    from robustune.search import SearchSettings, optuna_sampler

    settings = SearchSettings(defense=defense, samples=trials, seed=replay_seed,
                              searcher="tpe" if searcher == "gp" else searcher)
    sampler, start_points = optuna_sampler(settings, landscape.space, base)
    if searcher == "gp":  # the same start-up, then a Gaussian-process model (qLogEI over a batch's running trials)
        sampler = optuna.samplers.GPSampler(seed=replay_seed, n_startup_trials=max(1, len(start_points)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for point in start_points:
        study.enqueue_trial(point)
    distributions = {key: dist.to_optuna() for key, dist in landscape.space.items()}
    noise = np.random.default_rng([replay_seed, trials, SEARCHERS.index(searcher)])
    results = []  # (noisy result, params)
    while len(results) < trials:
        asked = [study.ask(distributions) for _ in range(min(batch, trials - len(results)))]
        for trial in asked:  # the batch is told together, after all of it was suggested
            result = landscape.value(trial.params) + noise.normal(0, landscape.noise_sd)
            study.tell(trial, result)
            results.append((result, trial.params))
    return landscape.value(max(results, key=lambda r: r[0])[1])


def reference_grid(landscape: Landscape, points: int, replay_seed: int) -> float:
    """The reference grid once, with noise: the landscape's value at its winner."""
    from robustune.search import grid_values

    noise = np.random.default_rng([replay_seed, 1_000_003])
    values = grid_values(landscape.space, points)  # the grid searcher's own values per knob
    grid = [dict(zip(values, point)) for point in itertools.product(*values.values())]
    results = [landscape.value(p) + noise.normal(0, landscape.noise_sd) for p in grid]
    return landscape.value(grid[int(np.argmax(results))])


def landscape_table(landscape: Landscape) -> list[str]:
    """The measured means as a Markdown table (two knobs: rows x columns; otherwise nothing)."""
    if len(landscape.keys) != 2:
        return []
    rows_key, columns_key = landscape.keys
    lines = [f"| {rows_key} \\ {columns_key} | " + " | ".join(f"{v:.3g}" for v in landscape.axes[1]) + " |",
             "|---|" + "---|" * len(landscape.axes[1])]
    for i, value in enumerate(landscape.axes[0]):
        lines.append(f"| {value:.3g} | " + " | ".join(f"{m:.3f}" for m in landscape.mean[i]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defense", default="fgsm_rs", help="any defense (`robustune methods`; default fgsm_rs)")
    parser.add_argument("--space", metavar="FILE",
                        help="search-space YAML, numeric knobs only (default: search_efficiency.py's for fgsm_rs and "
                             "pgd, the defense's shipped space otherwise); the grid has grid-points^knobs points")
    parser.add_argument("--grid-points", type=int, default=5, help="values per knob of the measured grid")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="training seeds at every point (at least 2; default 0 1 2: with 2, FGSM-RS's landscape "
                             "missed most of its collapses)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--landscape", metavar="RESULTS_PARQUET",
                        help="replay on this grid search's results.parquet instead of measuring (a previous run's)")
    parser.add_argument("--trials", nargs="+", type=int, default=[5, 8, 12, 16], help="trial counts to replay")
    parser.add_argument("--reference-grid", type=int,
                        help="values per knob of the grid the searches are compared with (default: "
                             "search_efficiency.py's: " + ", ".join(f"{d} {n}" for d, n in REFERENCE_GRID.items())
                             + f"; {DEFAULT_REFERENCE_GRID} for others)")
    parser.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=SEARCHERS)
    parser.add_argument("--replays", type=int, default=40, help="searcher seeds per searcher and trial count")
    parser.add_argument("--batch", type=int, default=2, help="trials suggested at once (a search's trials at once)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE")
    args = parser.parse_args()
    args.reference_grid = args.reference_grid or REFERENCE_GRID.get(args.defense, DEFAULT_REFERENCE_GRID)
    if len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least 2 distinct training seeds: the noise is their spread")
    if min(args.trials) < 1 or args.replays < 1 or args.batch < 1 or args.grid_points < 2 or args.reference_grid < 1:
        parser.error("--trials, --replays, --batch and --reference-grid must be >= 1, --grid-points >= 2")
    if args.landscape and not Path(args.landscape).is_file():
        parser.error(f"--landscape {args.landscape}: no such file")

    import optuna
    import pandas as pd

    from robustune.config import ConfigError, merge
    from robustune.data import DataError, check_available
    from robustune.defense import list_defenses
    from robustune.resolve import load_config
    from robustune.search import grid_size
    from robustune.search_space import load_space

    if args.defense not in list_defenses():
        parser.error(f"unknown defense {args.defense}; choose from {', '.join(list_defenses())}")
    searched = space_path(args.defense, args.space)
    try:
        space = load_space(args.defense, searched)
    except ConfigError as error:
        parser.error(str(error))
    choices = sorted(key for key, dist in space.items() if dist.type not in NUMERIC)
    if choices:
        parser.error(f"a landscape is interpolated between points, so every knob must be numeric: {choices} in "
                     f"{searched} are choices; pass --space with them left out (fix them with --set)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    base_overrides = shared_overrides(args.train_subset, args.overrides)
    if args.landscape:
        results = Path(args.landscape)
        workdir = results.parent  # only named in the replays' config; nothing is written there
    else:
        try:  # the settings and the data, before a folder is made or anything trains
            config = load_config(args.defense, overrides=base_overrides)
            check_available(config.data.name, config.data.data_dir, config.data.download)
        except (ConfigError, DataError) as error:
            parser.error(str(error))
        workdir = Path(tempfile.mkdtemp(prefix="robustune-search-landscape-"))
        points = grid_size(space, args.grid_points)
        print(f"measuring {args.defense}'s landscape: {points} points x {len(args.seeds)} seeds = "
              f"{points * len(args.seeds)} trials of {args.epochs} epochs, in {workdir}", flush=True)
        results = measure(args.defense, searched, grid_points=args.grid_points, seeds=args.seeds,
                          epochs=args.epochs, base_overrides=base_overrides, workdir=workdir)
    landscape = Landscape(pd.read_parquet(results), space)
    base = merge(base_config(args.defense, "replay", base_overrides, workdir), {"method": {"name": args.defense}})

    best, where = landscape.best()
    reference = [reference_grid(landscape, args.reference_grid, seed) for seed in range(args.replays)]
    reference_size = grid_size(space, args.reference_grid)
    lines = [f"**{args.defense}**: landscape of {landscape.mean.size} points x {landscape.seeds} seeds "
             f"(`{results}`); fixed: {', '.join(FIXED.get(args.defense, [])) or 'nothing'}", "",
             *landscape_table(landscape), "",
             f"Best measured point {best:.4f} at " + ", ".join(f"{k}={v:.3g}" for k, v in where.items())
             + f"; trial-to-trial noise (robust spread between seeds) {100 * landscape.noise_sd:.1f} points; the "
             f"reference grid ({args.reference_grid} per knob, {reference_size} trials) chooses knobs worth "
             f"{np.mean(reference):.4f} on average ({args.replays} replays). A third of its compute buys "
             f"{reference_size // 3} trials."
             + (f" {landscape.failed} landscape trial(s) failed part-way (see the results' `error`); each counts "
                "with its best epoch before it failed." if landscape.failed else ""), "",
             "| searcher | trials | mean gap to the grid's choice (points) | 10th percentile | within 1 point "
             "| within 2 points |", "|---|---|---|---|---|---|"]
    for searcher in args.searchers:
        for trials in args.trials:
            gaps = 100 * (np.array([replay(landscape, searcher, trials, seed, args.batch, args.defense, base)
                                    for seed in range(args.replays)]) - np.array(reference))
            lines.append(f"| {searcher} | {trials} | {gaps.mean():+.1f} | {np.quantile(gaps, 0.1):+.1f} "
                         f"| {np.mean(gaps >= -1):.0%} | {np.mean(gaps >= -2):.0%} |")
            print(lines[-1], flush=True)
    lines.append("")
    print("\n".join(lines), flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
