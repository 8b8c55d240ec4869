"""The self-contained HTML report (robustune.html_report): its content, and how a real browser renders it."""

import base64
import importlib.metadata
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from robustune.html_report import VERSIONED_PACKAGES, render_html, write_html

from helpers import chromium

# Solid colours that fill the two test plots, so the browser's screenshot shows whether they were drawn.
PLOT_COLOURS = {"robust_vs_clean.png": (255, 0, 255), "robust_vs_compute.png": (0, 200, 200)}

COLUMNS = [("defense", "defense"), ("tuned_knobs", "tuned knobs"), ("aa", "AutoAttack"), ("total_s", "total s")]
ROWS = [
    {"defense": "fgsm_rs<tuned>", "tuned_knobs": "epsilon_scale=1.25, alpha=0.3", "aa": "0.6312 ± 0.0041",
     "total_s": "812"},
    {"defense": "las_at", "tuned_knobs": "defaults", "aa": "0.6420 ± 0.0035", "total_s": "640"},
    {"defense": "pgd & co", "tuned_knobs": "defaults", "aa": None, "total_s": "0"},
]


def solid_plot(path: Path, colour: tuple[int, int, int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=120)
    fig.patch.set_facecolor([c / 255 for c in colour])
    ax.set_facecolor([c / 255 for c in colour])
    ax.plot([0, 1], [0, 1], color="black")
    fig.savefig(path)
    plt.close(fig)
    return path


def report(tmp_path: Path, definition: str = "name: default\nseeds: [0, 1]\n") -> dict:
    return dict(
        title="Leaderboard: default & friends",
        headline="las_at beats the best tuned baseline at equal budget, fgsm_rs<tuned>, by +1.1 points",
        header=[title for _, title in COLUMNS], cells=[[row[key] for key, _ in COLUMNS] for row in ROWS],
        notes=["Mean ± sample std over seeds."],
        sections=[("Evaluation warnings", ["fgsm_rs<tuned>: seed 1: gradient masking suspected"]),
                  ("Training diagnostics", []),
                  ("Progress", ["las_at: seed 0: policy_entropy 2.30 -> 1.41"])],
        images=[solid_plot(tmp_path / name, colour) for name, colour in PLOT_COLOURS.items()],
        definition=definition, protocol="quick: PGD-20 and APGD-CE on 1000 test points")


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text inside each <th> and <td>."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: dict[str, list[str]] = {"th": [], "td": []}
        self._cell: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in self.cells:
            self._cell = tag
            self.cells[tag].append("")

    def handle_endtag(self, tag):
        if tag == self._cell:
            self._cell = None

    def handle_data(self, data):
        if self._cell:
            self.cells[self._cell][-1] += data

    def all(self, name: str) -> list[dict]:
        return [attrs for tag, attrs in self.tags if tag == name]


def test_html_report_has_the_table_escaped_text_embedded_plots_and_versions(tmp_path):
    path = write_html(tmp_path / "report.html", **report(tmp_path))
    text = path.read_text(encoding="utf-8")
    parsed = Tags(text)

    assert parsed.cells["th"] == [label for _, label in COLUMNS]
    assert parsed.cells["td"] == ["fgsm_rs<tuned>", "epsilon_scale=1.25, alpha=0.3", "0.6312 ± 0.0041", "812",
                                  "las_at", "defaults", "0.6420 ± 0.0035", "640",
                                  "pgd & co", "defaults", "-", "0"]  # None shows as "-"
    # Escaped everywhere: no raw markup from user text reaches the document.
    assert "<tuned>" not in text and "fgsm_rs&lt;tuned&gt;" in text
    assert "<title>Leaderboard: default &amp; friends</title>" in text
    assert parsed.all("tuned") == []
    assert '<p class="headline">las_at beats' in text
    assert "<h2>Evaluation warnings</h2>" in text and "gradient masking suspected" in text
    assert "Training diagnostics" not in text  # an empty section is left out
    assert "policy_entropy 2.30 -&gt; 1.41" in text
    assert "<pre>name: default\nseeds: [0, 1]\n</pre>" in text
    assert "PGD-20 and APGD-CE on 1000 test points" in text

    images = parsed.all("img")
    assert [image["alt"] for image in images] == ["robust_vs_clean", "robust_vs_compute"]
    for image, name in zip(images, PLOT_COLOURS):
        assert image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1]) == (tmp_path / name).read_bytes()

    for name in VERSIONED_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        assert f"<li>{name} {version}</li>" in text

    # Self-contained: nothing to fetch, nothing to run.
    assert "http://" not in text and "https://" not in text
    assert parsed.all("script") == [] and parsed.all("link") == [] and parsed.all("iframe") == []
    assert all(not attrs.get("href") for _, attrs in parsed.tags)
    assert all(attrs["src"].startswith("data:") for _, attrs in parsed.tags if "src" in attrs)
    assert "url(" not in text  # no CSS resource either


def test_a_url_in_user_text_stays_text(tmp_path):
    definition = 'tracking:\n  uri: http://mlflow:5000\nnote: "<img src=https://example.com/x.png>"\n'
    text = render_html(**report(tmp_path, definition=definition))
    parsed = Tags(text)
    assert len(parsed.all("img")) == 2  # only the embedded plots
    outside_pre = re.sub(r"<pre>.*?</pre>", "", text, flags=re.DOTALL)
    assert "http://" not in outside_pre and "https://" not in outside_pre
    assert "&lt;img src=https://example.com/x.png&gt;" in text


def test_an_image_type_that_cannot_be_embedded_is_refused(tmp_path):
    (tmp_path / "plot.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(ValueError, match=r"plot\.pdf: cannot embed a \.pdf file"):
        render_html(**{**report(tmp_path), "images": [tmp_path / "plot.pdf"]})


def test_a_row_with_the_wrong_number_of_cells_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"a table row has 3 cells for 4 columns"):
        render_html(**{**report(tmp_path), "cells": [["las_at", "defaults", "0.64"]]})


# ------------------------------------------------------------------------------------ a real browser
WINDOW = (1400, 1000)


@pytest.mark.ui
@pytest.mark.timeout(600)
def test_chromium_renders_the_table_and_the_plots(tmp_path):
    from PIL import Image

    path = write_html(tmp_path / "report.html", **report(tmp_path))
    url = path.resolve().as_uri()

    dom = Tags(chromium("--dump-dom", url, profile=tmp_path / "profile").stdout)
    assert dom.cells["th"] == [label for _, label in COLUMNS]
    assert dom.cells["td"][::len(COLUMNS)] == ["fgsm_rs<tuned>", "las_at", "pgd & co"]
    assert [image["alt"] for image in dom.all("img")] == ["robust_vs_clean", "robust_vs_compute"]

    screenshot = tmp_path / "report.png"
    chromium(f"--screenshot={screenshot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url,
             profile=tmp_path / "profile")
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        counts = {colour: n for n, colour in image.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])}
    assert len(counts) > 50, "the screenshot is blank"  # text, table borders, zebra rows, plots
    # Each plot was decoded and drawn at a real size: a large area of its fill colour is on the screen.
    for name, colour in PLOT_COLOURS.items():
        drawn = sum(n for pixel, n in counts.items() if max(abs(a - b) for a, b in zip(pixel, colour)) <= 8)
        assert drawn > 20_000, f"{name} is not drawn ({drawn} pixels of its colour)"
