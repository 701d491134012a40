"""How the demo speaks: numbered steps, what each one does, results in green or red, timings and a summary.

Owns the look of ``postbridge demo`` on a rich console and the score of every step (:class:`StepOutcome`).
Lines that carry data a user may copy (greetings, messages, commands) are printed unwrapped (``soft_wrap``), so a
narrow terminal folds them but never breaks them with inserted newlines. Every dynamic text is escaped: a
greeting such as ``* OK [CAPABILITY IMAP4rev1]`` is shown as it is, never read as markup.

Must not: run anything or decide what a step expects; steps tell it what they saw.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

INDENT = 3


@dataclass(frozen=True)
class StepOutcome:
    """The score of one step. ``seconds`` is ``None`` for a step that did not run."""

    number: int
    title: str
    passed: bool
    detail: str
    seconds: float | None


class Narrator:
    """Prints the story and keeps the score. One step is open at a time: :meth:`begin` ... :meth:`end`."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.outcomes: list[StepOutcome] = []
        utf = (console.encoding or "").lower().startswith("utf")
        self._tick = "✓" if utf else "+"
        self._cross = "✗" if utf else "x"
        self._number = 0
        self._title = ""
        self._started = 0.0
        self._failures: list[str] = []

    @property
    def tick(self) -> str:
        """The mark of a good outcome: ✓, or + on a console that cannot show it."""
        return self._tick

    @property
    def all_passed(self) -> bool:
        return bool(self.outcomes) and all(outcome.passed for outcome in self.outcomes)

    # -- free text ----------------------------------------------------------------------------------------------

    def title(self, text: str) -> None:
        self.console.print(f"[bold]{escape(text)}[/]", highlight=False)

    def line(self, text: str, *, style: str = "", indent: int = 0) -> None:
        """One unwrapped line of data (copyable), optionally styled."""
        shown = Text(" " * indent + text, style=style)
        self.console.print(shown, soft_wrap=True, highlight=False)

    # -- steps --------------------------------------------------------------------------------------------------

    def begin(self, number: int, title: str, what: str) -> None:
        """Open step ``number``: print its title and, dimmed and wrapped, what it does."""
        self._number, self._title = number, title
        self._failures = []
        self._started = time.monotonic()
        self.console.print()
        self.console.print(f"[bold cyan]Step {number}[/]  [bold]{escape(title)}[/]", highlight=False)
        for text in textwrap.wrap(what, width=max(40, self.console.width - INDENT - 1), break_on_hyphens=False):
            self.line(text, style="dim", indent=INDENT)

    def info(self, text: str) -> None:
        self.line(text, indent=INDENT)

    def passed(self, text: str) -> None:
        self.line(f"{self._tick} {text}", style="green", indent=INDENT)

    def failed(self, text: str) -> None:
        """Print a red line and count the open step as failed."""
        self._failures.append(text)
        self.line(f"{self._cross} {text}", style="red", indent=INDENT)

    def expect(self, condition: bool, good: str, bad: str) -> bool:
        """Green ``good`` when ``condition`` holds, else red ``bad`` (and the step fails). Returns ``condition``."""
        if condition:
            self.passed(good)
        else:
            self.failed(bad)
        return condition

    def show(self, renderable: Table) -> None:
        self.console.print(Padding(renderable, (0, 0, 0, INDENT), expand=False))

    def end(self, error: str | None = None) -> StepOutcome:
        """Close the open step; it passed when nothing failed and no ``error`` (an exception's text) is given."""
        seconds = time.monotonic() - self._started
        if error is not None:
            self.failed(error)
        passed = not self._failures
        detail = "ok" if passed else self._failures[0]
        outcome = StepOutcome(self._number, self._title, passed, detail, seconds)
        self.outcomes.append(outcome)
        if passed:
            self.line(f"step {self._number} passed in {seconds:.2f} s", style="bold green", indent=INDENT)
        else:
            count = len(self._failures)
            what = "expectation" if count == 1 else "expectations"
            self.line(
                f"step {self._number} FAILED in {seconds:.2f} s ({count} {what} not met)",
                style="bold red",
                indent=INDENT,
            )
        return outcome

    def skip(self, number: int, title: str, why: str) -> StepOutcome:
        """Record a step that could not run (it counts as failed)."""
        outcome = StepOutcome(number, title, False, f"skipped: {why}", None)
        self.outcomes.append(outcome)
        self.console.print()
        self.console.print(
            f"[bold cyan]Step {number}[/]  [bold]{escape(title)}[/]  [red]skipped: {escape(why)}[/]", highlight=False
        )
        return outcome

    # -- the end ------------------------------------------------------------------------------------------------

    def summary(self) -> None:
        """Print the summary table: every step, its result and its time."""
        self.console.print()
        self.console.print("[bold cyan]Summary[/]", highlight=False)
        table = Table("step", "what", "result", "time", title=None, show_lines=False)
        for outcome in self.outcomes:
            result = Text("passed", style="green") if outcome.passed else Text(outcome.detail, style="red")
            took = "-" if outcome.seconds is None else f"{outcome.seconds:.2f} s"
            table.add_row(str(outcome.number), outcome.title, result, took)
        self.show(table)
        if self.all_passed:
            self.line("every step met its expectation", style="bold green", indent=INDENT)
        else:
            failed = [str(outcome.number) for outcome in self.outcomes if not outcome.passed]
            self.line(f"step(s) {', '.join(failed)} did not meet their expectation", style="bold red", indent=INDENT)
