"""The progress display of studies and searches (robustune.progress): the facts it shows, its estimate of the
time left, plain lines at a steady rate off a terminal, and nothing printed once it is closed."""

from __future__ import annotations

import io
import re
import time

from robustune import progress
from robustune.progress import Progress, format_duration


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_durations_read_as_people_write_them():
    assert format_duration(7.4) == "7s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3 * 3600 + 7 * 60) == "3h07m"


def test_status_line_has_stage_counts_best_and_time():
    shown = Progress("study tiny", stream=io.StringIO(), live=False)
    shown.stage(2, 5, "search for fgsm", units=6, kind="trial", at_once=2)
    shown.unit_started("a")
    shown.unit_started("b")
    shown.unit_finished("a")
    shown.unit_started("c")
    shown.unit_finished("b", ok=False)
    shown.best("0.4840 (train.lr=0.06)")
    line = shown.status_line()
    assert line.startswith("[progress] study tiny stage 2/5 search for fgsm: ")
    assert "1/6 trials done, 1 running, 3 queued, 1 failed" in line
    assert "best 0.4840 (train.lr=0.06)" in line
    assert "elapsed" in line and "left" in line


def test_work_beside_the_stage_is_shown_while_it_runs_and_gone_after():
    terminal = FakeTerminal()
    shown = Progress("study", stream=terminal)
    shown.start()
    shown.stage(2, 5, "search for pgd", units=12, kind="trial", at_once=2)
    shown.beside("evaluation", 2)  # both slots evaluate earlier runs: the search is not stalled
    assert "0/12 trials done, 0 running, 12 queued; 2 evaluations running beside it;" in shown.status_line()
    shown.refresh()
    shown.beside("evaluation", 1)
    assert "; 1 evaluation running beside it;" in shown.status_line()
    shown.beside("evaluation", 0)
    assert "beside" not in shown.status_line()
    shown.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    assert "2 evaluations running beside it" in " ".join(text.split())  # the live display too (wrapped at 80)


def test_time_left_counts_queued_units_and_later_stages_over_what_runs_at_once():
    shown = Progress("study", stream=io.StringIO(), live=False)
    shown.stage(1, 5, "runs", units=6, kind="run", at_once=2)
    shown.plan([(4, "run", 2), (10, "evaluation", 1), (3, "trial", 2)])
    shown.durations = {"evaluation": [4.0]}
    assert shown.time_left() is None  # no run measured yet: no claim about this stage
    shown.durations = {"run": [10.0, 10.0], "evaluation": [4.0]}
    shown.stage_now.done = 2
    # This stage: 4 queued runs of 10 s, 2 at once; later: 4 runs 2 at once, 10 evaluations of 4 s one at a
    # time, and 3 trials 2 at once (no trial measured yet: the mean of every unit, 8 s).
    expected = 4 * 10 / 2 + 4 * 10 / 2 + 10 * 4 / 1 + 3 * 8 / 2
    assert abs(shown.time_left() - expected) < 1e-6


def test_a_running_unit_counts_what_is_left_of_its_mean():
    shown = Progress("study", stream=io.StringIO(), live=False)
    shown.stage(4, 5, "evaluation", units=2, kind="evaluation")
    shown.durations = {"evaluation": [30.0]}
    shown.stage_now.done = 1
    shown.unit_started("last")
    shown.stage_now.running["last"] = time.time() - 20
    assert 9 <= shown.time_left() <= 11


def test_off_a_terminal_it_prints_plain_lines_at_a_steady_rate_and_nothing_after_close():
    stream = io.StringIO()
    shown = Progress("search fgsm", stream=stream, live=False, interval_s=0.2)
    shown.start()
    shown.stage(1, 1, "search fgsm", units=4, kind="trial")
    shown.log("[search] trial abc finished")
    time.sleep(1.1)
    shown.close()
    closed_at = stream.getvalue()
    time.sleep(0.5)
    assert stream.getvalue() == closed_at  # the caller's summary comes last
    lines = closed_at.splitlines()
    assert "[search] trial abc finished" in lines
    assert 3 <= sum(line.startswith("[progress] search fgsm stage 1/1") for line in lines) <= 6
    assert "\x1b" not in closed_at


def test_on_a_terminal_it_draws_a_live_display_and_prints_event_lines_above_it():
    terminal = FakeTerminal()
    shown = Progress("study tiny", stream=terminal)
    assert shown.live
    shown.start()
    shown.stage(1, 5, "2 untuned defense(s) x 2 seed(s)", units=4, kind="run")
    shown.unit_started("fgsm_rs seed 0")
    shown.log("[study] fgsm_rs seed 0 finished (3s)")
    shown.refresh()
    shown.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    assert "[study] fgsm_rs seed 0 finished (3s)" in text
    assert "stage 1/5" in text and "0/4 runs done" in text and "1 running" in text and "3 queued" in text


def test_without_a_display_the_counts_are_kept_and_nothing_is_shown(capsys):
    silent = progress.current()
    silent.stage(1, 1, "x", units=1, kind="run")
    silent.log("not shown")
    assert capsys.readouterr().out == ""


def test_showing_makes_the_display_current_for_the_callbacks_and_restores_it():
    before = progress.current()
    with progress.showing("search", stream=io.StringIO(), live=False) as shown:
        assert progress.current() is shown
    assert progress.current() is before


def test_a_stage_that_ranks_nothing_shows_no_best():
    terminal = FakeTerminal()
    shown = Progress("study", stream=terminal)
    shown.start()
    shown.stage(4, 5, "evaluation on the test split", units=12, kind="evaluation", at_once=2, ranked=False)
    assert "best" not in shown.status_line()
    shown.refresh()
    shown.stage(3, 5, "tuned defenses retrained", units=6, kind="run", at_once=2)
    assert "best -;" in shown.status_line()  # runs rank by validation accuracy: none finished yet
    shown.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    assert "0/12 evaluations done" in text


def test_units_measured_beside_earlier_stages_give_the_estimate_when_their_stage_begins():
    shown = Progress("study", stream=io.StringIO(), live=False)
    shown.stage(3, 5, "runs", units=2, kind="run", at_once=2)
    shown.plan([(6, "evaluation", 2)])
    shown.measured("evaluation", 30.0)  # evaluations that ran beside the training stages
    shown.measured("evaluation", 50.0)
    assert shown.later == [(4, "evaluation", 2)]  # two fewer still to come
    shown.plan([])  # as a study does: the evaluation stage is the last one planned
    shown.stage(4, 5, "evaluation", units=6, kind="evaluation", at_once=2, done=2, ranked=False)
    assert shown.time_left() == 4 * 40.0 / 2


def test_a_budget_counts_only_the_units_it_still_pays_for_and_is_shown():
    shown = Progress("study", stream=io.StringIO(), live=False)
    shown.stage(2, 5, "search for pgd", units=12, kind="trial", at_once=2)
    shown.budget(0.0, 52.0, None)  # nothing measured yet: 12 is all that is known
    assert "0/12 trials done, 0 running, 12 queued; compute budget 0 of 52 worker-s spent;" in shown.status_line()
    shown.unit_started("a")
    shown.unit_started("b")
    shown.budget(16.0, 52.0, 3)  # the rest pays for 3 trials, a and b included
    shown.durations = {"trial": [40.0]}
    assert "0/12 trials done, 2 running, 1 queued; compute budget 16 of 52 worker-s spent;" in shown.status_line()
    assert shown.stage_now.expected == 3  # the progress bar fills at the trials the budget pays for
    shown.stage_now.running = {"a": time.time(), "b": time.time()}
    assert 55 <= shown.time_left() <= 60  # a and b (40 s), then one more trial in a free slot (40 / 2)
