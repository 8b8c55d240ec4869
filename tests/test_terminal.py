"""A study as a person sees it in a terminal: a real `robustune study` in a tmux pane shows one live display
(stage, runs done / running / queued, best so far, elapsed and time left) while it works, and when it ends the
display is gone and its summary is the last thing on the screen. Run by `make test-ui` (installs tmux and
Chromium when missing); ROBUSTUNE_UPDATE_SCREENSHOTS=1 also refreshes docs/live-display.png."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import chromium

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_study.yaml"
COLUMNS, ROWS = 120, 30


def tmux(*args: str, socket: str) -> str:
    binary = shutil.which("tmux")
    if binary is None:
        pytest.fail("tmux is not installed: `make test-ui` installs it (apt-get install -y tmux)")
    return subprocess.run([binary, "-L", socket, *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def terminal_picture(ansi_screen: str, path: Path, folder: Path) -> Path:
    """The pane, colours included, drawn by rich as HTML and photographed by headless Chromium."""
    from PIL import Image
    from rich.console import Console
    from rich.text import Text

    console = Console(record=True, width=COLUMNS, file=open(os.devnull, "w"), force_terminal=True)
    console.print(Text.from_ansi(ansi_screen))
    page = folder / "terminal.html"
    page.write_text(console.export_html(inline_styles=True))
    chromium(f"--screenshot={path}", "--window-size=1300,640", page.as_uri(), profile=folder / "profile")
    with Image.open(path) as image:
        assert image.format == "PNG" and len(image.convert("RGB").getcolors(maxcolors=1300 * 640)) > 20
    return path


@pytest.mark.ui
@pytest.mark.timeout(900)
def test_a_study_in_a_terminal_shows_one_live_display_then_its_summary_last(tmp_path):
    definition = yaml.safe_load(TINY.read_text())
    definition.update(seeds=[0], search={"samples": 2, "epochs": 1})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(definition))
    socket = f"robustune-test-{os.getpid()}"
    command = (f"cd {tmp_path} && {sys.executable} -m robustune.cli study {study}; echo EXIT=$?; sleep 600")
    tmux("new-session", "-d", "-s", "study", "-x", str(COLUMNS), "-y", str(ROWS), command, socket=socket)
    try:
        displays: list[tuple[str, str]] = []  # (plain, with colours) screens that show the live display
        deadline = time.time() + 840
        while time.time() < deadline:
            screen = tmux("capture-pane", "-p", "-t", "study", socket=socket)
            if "EXIT=" in screen:
                break
            if "running" in screen and "queued" in screen and "elapsed" in screen:
                displays.append((screen, tmux("capture-pane", "-p", "-e", "-t", "study", socket=socket)))
            time.sleep(1)
        history = tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "study", socket=socket)
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)

    assert "EXIT=0" in history, history[-3000:]
    assert displays, "the live display never showed: " + history[-3000:]
    # One display at the bottom of the screen: the stage, the counts, the best so far (stages 1-3, which rank
    # what they train) and the time.
    ranked = [plain for plain, _ in displays if not re.search(r"stage [45]/5", plain)]
    assert ranked, "no screen of a training stage: " + history[-3000:]
    screen = next((plain for plain in ranked if "left" in plain), ranked[-1])
    assert "study tiny stage " in screen and "/5 " in screen
    assert " done · " in screen and " running · " in screen and " queued" in screen
    assert "best " in screen and "elapsed" in screen
    assert sum("elapsed" in line for line in screen.splitlines()) == 1  # one display, not one per update
    # At the end the display is gone: the summary (ending with the two ways to look at the result) is last.
    lines = [line.rstrip() for line in history.split("EXIT=")[0].splitlines() if line.strip()]
    summary = max(i for i, line in enumerate(lines) if line.startswith("study finished: "))
    assert [line.split()[0] for line in lines[summary + 1:]] == ["utilization", "leaderboard:", "MLflow:"]
    assert not any("queued" in line for line in lines[summary:])

    if os.environ.get("ROBUSTUNE_UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture on request only
        ansi = next((colours for plain, colours in displays if "stage 2/5" in plain and "left" in plain),
                    displays[-1][1])
        shutil.copyfile(terminal_picture(ansi, tmp_path / "live-display.png", tmp_path),
                        REPO / "docs" / "live-display.png")
