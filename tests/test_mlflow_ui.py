"""What a user sees opening the MLflow UI on a study's store: the study's experiment opens on its runs (not MLflow
3's GenAI overview), the runs have names people read, and the study's parent run shows the leaderboard as a table
with its plots. The `ui` tests run the tiny study, serve its store with a real `mlflow server` and load the pages
in headless Chromium; the others check the tracking helpers on a local store."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from robustune import tracking
from robustune.study import load_study
from robustune.study_state import StudyState

from helpers import chromium as headless_chromium
from helpers import free_port, run_study_in_process, start_mlflow_server, stop_group

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_study.yaml"
TABLE_FILE = "leaderboard/leaderboard_table.json"
PLOTS = ("robust_vs_clean.png", "robust_vs_compute.png")
WINDOW = (1600, 1000)
# Sorted by name, MLflow's runs table lists every run flat (by creation time it folds child runs under parents).
BY_NAME = "&orderByKey=" + urllib.parse.quote("tags.`mlflow.runName`") + "&orderByAsc=true"
GENAI_OVERVIEW = ("Token Usage", "Tokens per Trace", "Detect Issues")  # what MLflow 3's GenAI overview shows


# ------------------------------------------------------------------------------------ tracking helpers
def test_experiments_are_model_training_ones_new_and_old(mlflow_uri):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    new = tracking.experiment_id(mlflow_uri, "new")
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("made-before-the-tag")  # as older robustune versions left them
    chosen = client.create_experiment("chosen-in-the-ui", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.experiment_id(mlflow_uri, "made-before-the-tag") == old
    assert tracking.experiment_id(mlflow_uri, "chosen-in-the-ui") == chosen
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    assert tracking.ui_link("http://127.0.0.1:5000/", old, "abc") == \
        f"http://127.0.0.1:5000/#/experiments/{old}/runs/abc?workflowType=machine_learning"


def test_log_table_writes_mlflows_table_and_replaces_it(mlflow_uri, tmp_path):
    import numpy as np
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(tracking.experiment_id(mlflow_uri, "tables")).info.run_id
    rows = [{"defense": "pgd (tuned)", "aa_mean": 0.41, "seeds": np.int64(2), "knobs": ["a", "b"]},
            {"defense": "fgsm", "aa_mean": float("nan"), "notes": None}]

    def logged(folder: str) -> Path:
        return Path(client.download_artifacts(run_id, TABLE_FILE, str(tmp_path / folder)))

    tracking.log_table(mlflow_uri, run_id, rows, TABLE_FILE)
    first = json.loads(logged("first").read_text())
    assert first == {"columns": ["defense", "aa_mean", "seeds", "knobs", "notes"],  # every row's keys
                     "data": [["pgd (tuned)", 0.41, 2, '["a", "b"]', None], ["fgsm", None, None, None, None]]}
    tracking.log_table(mlflow_uri, run_id, rows[:1], TABLE_FILE)  # a rebuilt leaderboard replaces the old table
    again = logged("again")
    assert json.loads(again.read_text())["data"] == [["pgd (tuned)", 0.41, 2, '["a", "b"]']]
    read = client._read_from_file(str(again))  # how MLflow's load_table reads a table
    assert read.columns.tolist() == ["defense", "aa_mean", "seeds", "knobs"]
    assert read["defense"].tolist() == ["pgd (tuned)"] and read["aa_mean"].tolist() == pytest.approx([0.41])
    listed = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert listed == [{"path": TABLE_FILE, "type": "table"}]  # listed once, as mlflow.log_table lists it
    with pytest.raises(ValueError, match=r"\.json"):
        tracking.log_table(mlflow_uri, run_id, rows, "leaderboard/table.csv")


# ------------------------------------------------------------------------------------ a real browser
class PageText(HTMLParser):
    """The visible text of a rendered page (scripts and styles left out), and its <img> tags' attributes."""

    def __init__(self, dom: str):
        super().__init__()
        self.parts: list[str] = []
        self.images: list[dict[str, str]] = []
        self.title = ""
        self._skipping = self._in_title = False
        self.feed(dom)
        self.text = re.sub(r"\s+", " ", " ".join(self.parts))

    def handle_starttag(self, tag, attrs):
        self._skipping = tag in ("script", "style")
        self._in_title = tag == "title"
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        self._skipping = self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skipping:
            self.parts.append(data)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """A browser that never opened MLflow (its view switch on GenAI). --virtual-time-budget: let the React app
    fetch and render before the DOM is dumped or the page drawn."""
    return headless_chromium("--virtual-time-budget=20000", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args,
                             profile=profile)


def rendered(url: str, folder: Path) -> PageText:
    return PageText(chromium("--dump-dom", url, profile=folder / "profile").stdout)


def screenshot(url: str, path: Path, folder: Path) -> Path:
    from PIL import Image

    chromium(f"--screenshot={path}", url, profile=folder / "profile")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == WINDOW
        assert len(image.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])) > 50, f"{path} is blank"
    return path


def api(server: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """MLflow's REST API on `server`: GET with `query`, or POST of `body` (runs/search)."""
    request = urllib.request.Request(f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def served_study(tmp_path_factory):
    """The tiny study run in process (real local Ray, sqlite store; its leaderboard build logs the table to the
    parent run), and a real `mlflow server` on its store."""
    import ray

    folder = tmp_path_factory.mktemp("ui-study")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    study = load_study(TINY, [f"tracking.tracking_uri={uri}", f"tracking.output_dir={folder / 'runs'}"])
    try:
        study_dir = run_study_in_process(study, uri)["dir"]
    finally:
        ray.shutdown()  # its CPUs go to the server and the browser
    state = StudyState.load(study_dir)
    parent = state.parent_run_id
    rows = pq.read_table(study_dir / "leaderboard" / "leaderboard.parquet").to_pylist()  # build logged the table
    port = free_port()
    server = start_mlflow_server(port, folder)
    try:
        yield {"server": f"http://127.0.0.1:{port}", "parent": parent, "rows": rows,
               "search_results": Path(state.searches["fgsm (tuned)"].search_dir) / "results.parquet",
               "experiment": tracking.client(uri).get_run(parent).info.experiment_id,
               "shots": tmp_path_factory.mktemp("ui-screenshots")}
    finally:
        stop_group(server)


def readable_names(served_study) -> dict[str, str]:
    """Every run of the study's experiment, id -> name, as the server answers; checked against what the names
    must be: `study tiny`, `fgsm search`, `fgsm trial <k>` (k: the trial's place in results.parquet),
    `<entry label> seed <N>`."""
    found = api(served_study["server"], "runs/search",
                {"experiment_ids": [served_study["experiment"]], "max_results": 1000})["runs"]
    names = {run["info"]["run_id"]: run["info"]["run_name"] for run in found}
    tags = {run["info"]["run_id"]: {t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in found}
    index = {row["trial_id"]: row["trial_index"]
             for row in pq.read_table(served_study["search_results"]).to_pylist()}
    expected = {}
    for run_id, run_tags in tags.items():
        kind = run_tags.get("kind")
        if kind == "study":
            expected[run_id] = "study tiny"
        elif kind == "search":
            expected[run_id] = "fgsm search"
        elif kind in ("study_run", "study_refit_unused"):  # a final run, or a refit its entry did not keep
            expected[run_id] = (f"{run_tags['study_entry']} seed {run_tags['seed']}"
                                + (" (next-best config)" if run_tags.get("refit") == "next-best" else "")
                                + (" (unused refit)" if kind == "study_refit_unused" else ""))
        else:  # a search trial
            expected[run_id] = f"fgsm trial {index[run_tags['search_trial_id']]}"
    assert names == expected
    finals = [names[run_id] for run_id, run_tags in tags.items() if run_tags.get("kind") == "study_run"]
    assert sorted(name.replace(" (next-best config)", "") for name in finals) == sorted(
        f"{label} seed {seed}" for label in ("fgsm_rs", "fgsm (tuned)", "standard") for seed in (0, 1))
    assert sorted(v for v in names.values() if "trial" in v) == [f"fgsm trial {k}" for k in range(1, len(index) + 1)]
    return names


@pytest.mark.ui
@pytest.mark.timeout(1500)
def test_the_experiment_opens_on_its_runs_with_readable_names(served_study):
    server, experiment, shots = served_study["server"], served_study["experiment"], served_study["shots"]
    described = api(server, "experiments/get", experiment_id=experiment)["experiment"]
    assert {t["key"]: t["value"] for t in described["tags"]}[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    names = readable_names(served_study)

    # The experiment's own page, opened in its model-training view: MLflow picks the runs, not the GenAI overview.
    opened = rendered(f"{server}/#/experiments/{experiment}?{tracking.UI_MODEL_TRAINING_VIEW}", shots)
    assert opened.title.startswith("Runs - "), opened.title
    assert "study tiny" in opened.text and not [word for word in GENAI_OVERVIEW if word in opened.text]

    runs_page = tracking.ui_link(server, experiment) + BY_NAME  # every run, flat
    page = rendered(runs_page, shots)
    assert page.title.startswith("Runs - ") and not [word for word in GENAI_OVERVIEW if word in page.text]
    missing = [name for name in names.values() if name not in page.text]
    assert not missing, f"not on the runs page: {missing}"
    assert f"{len(names)} matching runs" in page.text
    path = screenshot(runs_page, shots / "mlflow-runs.png", shots)
    if os.environ.get("ROBUSTUNE_UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture on request only
        shutil.copyfile(path, REPO / "docs" / "mlflow-runs.png")


@pytest.mark.ui
@pytest.mark.timeout(1500)
def test_the_study_run_shows_the_leaderboard_table_and_plots(served_study):
    server, experiment, parent = served_study["server"], served_study["experiment"], served_study["parent"]
    shots, rows = served_study["shots"], served_study["rows"]
    listed = {f["path"] for f in api(server, "artifacts/list", run_id=parent, path="leaderboard")["files"]}
    assert {TABLE_FILE, *(f"leaderboard/{plot}" for plot in PLOTS)} <= listed

    page = rendered(tracking.ui_link(server, experiment, parent), shots)  # the run's overview
    assert "study tiny" in page.text and "Child runs" in page.text
    children = [f"{label} seed {seed}" for label in ("fgsm_rs", "fgsm (tuned)", "standard") for seed in (0, 1)]
    assert not [name for name in [*children, "fgsm search"] if name not in page.text]

    artifacts = f"{server}/#/experiments/{experiment}/runs/{parent}/artifacts"
    table_page = f"{artifacts}/{TABLE_FILE}?{tracking.UI_MODEL_TRAINING_VIEW}"
    table = rendered(table_page, shots)
    assert "View as table" in table.text  # MLflow recognised the artifact as a table
    for column in ("defense", "aa_mean", "clean_mean"):
        assert column in table.text
    assert not [row["defense"] for row in rows if row["defense"] not in table.text]
    assert not [plot for plot in PLOTS if plot not in table.text]  # the artifact tree beside it lists the plots
    screenshot(table_page, shots / "mlflow-leaderboard-table.png", shots)

    plot_page = f"{artifacts}/leaderboard/{PLOTS[0]}?{tracking.UI_MODEL_TRAINING_VIEW}"
    plot = rendered(plot_page, shots)
    assert any(image.get("alt") == f"leaderboard/{PLOTS[0]}" and image.get("src", "").startswith("blob:")
               for image in plot.images), plot.images  # the PNG was fetched from the server and shown
    screenshot(plot_page, shots / "mlflow-leaderboard-plot.png", shots)
