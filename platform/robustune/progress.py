"""Where a study or search stands, shown one way to a person at a terminal and another way to a log.

On a terminal: one live display (rich) below the event lines: the stage (k of n), the stage's runs, trials or
evaluations done / running / queued, work running beside the stage (a study's evaluations of runs trained in
an earlier stage, which hold slots too), a search's compute budget and what of it is spent, the best objective
so far (in stages that rank what they run), elapsed time and the estimated time left.
Anywhere else (CI, `ray job submit` logs, a file): the same facts as one plain `[progress]` line at a steady
rate (`ROBUSTUNE_PROGRESS_S`, default 30 s), no escape codes. Event lines (a run finished, a stage started)
are printed as they happen, in both cases through `Progress.log`.

The estimate: every finished unit (a training run, a search trial, an evaluation) records its wall time under
its kind; the time left is the units not yet finished, in this stage and in the stages announced with
`plan()`, times the mean wall time of their kind (a later stage's kind not measured yet: of every kind), over
the units of that stage that run at once. Units that ran beside a stage count too (`measured`). Under a compute
budget the stage's queued units are only those the rest of the budget pays for (`budget`). It is printed with
"~", and only once a unit of the current stage's kind has finished.

A study's or search's code reaches the display through `current()`: Tune callbacks are pickled with the
experiment, so they hold no reference to it. Nothing here knows about runs, searches or studies.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, TextIO

PLAIN_INTERVAL_ENV = "ROBUSTUNE_PROGRESS_S"
DEFAULT_PLAIN_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Stage:
    number: int
    of: int
    name: str
    units: int  # how many runs / trials / evaluations this stage has
    kind: str  # "run", "trial", "evaluation", ...: units of one kind take about as long
    at_once: int = 1  # units that run at the same time
    ranked: bool = True  # its units have an objective, so a best one (evaluations and a leaderboard do not)
    started: float = field(default_factory=time.time)
    running: dict[str, float] = field(default_factory=dict)  # unit -> when it started
    done: int = 0
    failed: int = 0
    budget_s: float | None = None  # a search's compute budget, worker-seconds
    spent_s: float = 0.0
    affordable: int | None = None  # units the rest of the budget pays for, running ones included; None: not known

    @property
    def queued(self) -> int:
        queued = max(0, self.units - self.done - self.failed - len(self.running))
        if self.affordable is not None:  # `units` is an upper bound; the budget ends the stage first
            queued = min(queued, max(0, self.affordable - len(self.running)))
        return queued

    @property
    def expected(self) -> int:
        """The units this stage will have run: `units`, or fewer where a budget ends it first."""
        return self.done + self.failed + len(self.running) + self.queued


class Progress:
    """The state of one study or search, and its two ways of being shown (see the module docstring)."""

    def __init__(self, title: str, stream: TextIO | None = None, live: bool | None = None,
                 interval_s: float | None = None):
        self.title = title
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.interval_s = interval_s if interval_s is not None else float(
            os.environ.get(PLAIN_INTERVAL_ENV, DEFAULT_PLAIN_INTERVAL_S))
        self.started = time.time()
        self.stage_now: Stage | None = None
        self.later: list[tuple[int, str, int]] = []  # (units, kind, at once) of the stages still to come
        self.durations: dict[str, list[float]] = {}
        self.best_text: str | None = None
        self.alongside: dict[str, int] = {}  # kind -> units running beside the current stage
        self.lock = threading.RLock()
        self._closed = threading.Event()
        self._display = None
        self._ticker: threading.Thread | None = None

    # ------------------------------------------------------------------ what the study or search tells it
    def plan(self, later: list[tuple[int, str, int]]) -> None:
        """The stages still to come after the current one, as (units, kind, how many run at once): for the
        estimate of the time left."""
        with self.lock:
            self.later = list(later)

    def stage(self, number: int, of: int, name: str, units: int, kind: str, at_once: int = 1,
              done: int = 0, ranked: bool = True) -> None:
        """A stage begins: `units` of `kind`, `at_once` at a time; `done` of them finished before (a resume).
        `ranked`: its units report an objective, and the best so far is shown."""
        with self.lock:
            self.stage_now = Stage(number, of, name, units, kind, max(1, at_once), ranked=ranked, done=done)
            self.best_text = None
        self.refresh()

    def unit_started(self, unit: str) -> None:
        with self.lock:
            if self.stage_now is not None and unit not in self.stage_now.running:
                self.stage_now.running[unit] = time.time()
        self.refresh()

    def unit_finished(self, unit: str, ok: bool = True) -> None:
        with self.lock:
            stage = self.stage_now
            if stage is None:
                return
            began = stage.running.pop(unit, None)
            if ok:
                stage.done += 1
                if began is not None:
                    self.durations.setdefault(stage.kind, []).append(time.time() - began)
            else:
                stage.failed += 1
        self.refresh()

    def measured(self, kind: str, seconds: float) -> None:
        """A unit of `kind` that ran beside the stage (not one of its own) took `seconds`: for the estimate, in
        which the first stage still to come with units of that kind now has one fewer."""
        with self.lock:
            self.durations.setdefault(kind, []).append(seconds)
            for index, (units, later_kind, at_once) in enumerate(self.later):
                if later_kind == kind and units > 0:
                    self.later[index] = (units - 1, later_kind, at_once)
                    break

    def budget(self, spent_s: float, budget_s: float, affordable: int | None) -> None:
        """The stage runs on a compute budget of `budget_s` worker-seconds, `spent_s` of them spent so far, and
        the rest pays for `affordable` units (running ones included; None while not known)."""
        with self.lock:
            if self.stage_now is not None:
                self.stage_now.budget_s, self.stage_now.spent_s = budget_s, spent_s
                self.stage_now.affordable = affordable
        self.refresh()

    def beside(self, kind: str, running: int) -> None:
        """`running` units of `kind` run beside the current stage (not its own units): shown, so that a stage
        whose slots they hold does not look stalled."""
        with self.lock:
            self.alongside[kind] = running
        self.refresh()

    def _beside_text(self) -> str:
        return ", ".join(f"{n} {kind}{'s' if n > 1 else ''} running beside it"
                         for kind, n in self.alongside.items() if n > 0)

    @staticmethod
    def _budget_text(stage: Stage) -> str:
        if stage.budget_s is None:
            return ""
        return f"compute budget {stage.spent_s:.0f} of {stage.budget_s:.0f} worker-s spent"

    def best(self, text: str | None) -> None:
        with self.lock:
            self.best_text = text
        self.refresh()

    def log(self, text: str) -> None:
        """An event line: above the live display, or in the plain output."""
        with self.lock:
            if self._display is not None:
                self._display.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def ignore(self, text: str) -> None:
        """A line nobody asked to see (details without --verbose)."""

    # --------------------------------------------------------------------------------------- the facts
    def time_left(self) -> float | None:
        with self.lock:
            stage = self.stage_now
            if stage is None or not self.durations.get(stage.kind):
                return None
            every = [d for values in self.durations.values() for d in values]

            def mean(kind: str) -> float:
                values = self.durations.get(kind) or every
                return sum(values) / len(values)

            now = time.time()
            per_unit = mean(stage.kind)
            # Running units finish in about what is left of their mean; queued ones wait for a free slot.
            running_left = [max(0.0, per_unit - (now - began)) for began in stage.running.values()]
            left = (stage.queued * per_unit) / stage.at_once + (max(running_left) if running_left else 0.0)
            left += sum(units * mean(kind) / max(1, at_once) for units, kind, at_once in self.later)
            return left

    def status_line(self) -> str:
        with self.lock:
            elapsed = format_duration(time.time() - self.started)
            stage = self.stage_now
            if stage is None:
                return f"[progress] {self.title}: starting; {elapsed} elapsed"
            counts = (f"{stage.done}/{stage.units} {stage.kind}s done, {len(stage.running)} running, "
                      f"{stage.queued} queued" + (f", {stage.failed} failed" if stage.failed else ""))
            for extra in (self._beside_text(), self._budget_text(stage)):
                if extra:
                    counts += f"; {extra}"
            best = f"best {self.best_text or '-'}; " if stage.ranked else ""
            left = self.time_left()
            return (f"[progress] {self.title} stage {stage.number}/{stage.of} {stage.name}: {counts}; {best}"
                    f"{elapsed} elapsed, "
                    + (f"~{format_duration(left)} left" if left is not None else "time left not known yet"))

    # ------------------------------------------------------------------------------------------ showing
    def start(self) -> None:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._display = Live(self._renderable(), console=Console(file=self.stream), refresh_per_second=2,
                                 transient=True, redirect_stdout=True, redirect_stderr=True,
                                 get_renderable=self._renderable)
            self._display.start()
        else:
            self._ticker = threading.Thread(target=self._tick, name="robustune-progress", daemon=True)
            self._ticker.start()

    def refresh(self) -> None:
        if self._display is not None:
            self._display.refresh()

    def close(self) -> None:
        """Stop showing progress: nothing is printed by it afterwards (the caller's summary comes last)."""
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self.lock:
            if self._display is not None:
                self._display.stop()
                self._display = None

    def _tick(self) -> None:
        while not self._closed.wait(self.interval_s):
            with self.lock:
                if not self._closed.is_set():
                    self.stream.write(self.status_line() + "\n")
                    self.stream.flush()

    def _renderable(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self.lock:
            stage = self.stage_now
            elapsed = format_duration(time.time() - self.started)
            left = self.time_left()
            timing = f"{elapsed} elapsed" + (f" · ~{format_duration(left)} left" if left is not None else "")
            if stage is None:
                return Text(f"{self.title}: starting · {timing}", style="bold")
            head = Text.assemble((f"{self.title} ", "bold"), (f"stage {stage.number}/{stage.of} ", "cyan"),
                                 (stage.name, "bold"))
            extras = "".join(f" · {extra}" for extra in (self._beside_text(), self._budget_text(stage)) if extra)
            row = Table.grid(padding=(0, 1))
            row.add_row(ProgressBar(total=max(stage.expected, 1), completed=stage.done + stage.failed, width=30),
                        Text(f"{stage.done}/{stage.units} {stage.kind}s done · {len(stage.running)} running · "
                             f"{stage.queued} queued" + (f" · {stage.failed} failed" if stage.failed else "")
                             + extras))
            lines = [head, row]
            if stage.ranked:
                lines.append(Text(f"best {self.best_text}" if self.best_text else "best -", style="green"))
            return Group(*lines, Text(timing, style="dim"))


class _Silent(Progress):
    """What `current()` gives when no command opened a display (tests, library use): keeps the counts and shows
    nothing; the caller's own `log` gets the event lines."""

    def __init__(self):
        super().__init__("", live=False)

    def start(self) -> None:
        pass

    def log(self, text: str) -> None:
        pass


_current: Progress | None = None


def current() -> Progress:
    global _current
    if _current is None:
        _current = _Silent()
    return _current


@contextlib.contextmanager
def showing(title: str, stream: TextIO | None = None, live: bool | None = None) -> Iterator[Progress]:
    """Show the progress of what runs inside (a study or search started from the command line)."""
    global _current
    shown = Progress(title, stream=stream, live=live)
    previous, _current = _current, shown
    shown.start()
    try:
        yield shown
    finally:
        shown.close()
        _current = previous
