"""The lab's vocabulary: an `Experiment` states a claim and, run, gives a `Result` whose checks say
whether the claim held, with the numbers that decided it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol


class Progress(Protocol):
    """What an experiment reports while it runs: a phase with a number of steps, then advances."""

    def phase(self, note: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class _NullProgress:
    def phase(self, note: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


NULL_PROGRESS: Progress = _NullProgress()


@dataclass(frozen=True)
class Check:
    """One expected outcome: what was expected, whether it held, and the numbers that decided it."""

    description: str
    passed: bool
    numbers: dict[str, float | str] = field(default_factory=dict)


@dataclass
class Result:
    """What an experiment produced: a table (`columns`, `rows`), figures (PNG paths), checks."""

    columns: list[str]
    rows: list[list]
    figures: list[Path] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # setup and sizes, shown on the page
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def check(self, description: str, passed: bool, **numbers) -> None:
        self.checks.append(Check(description, bool(passed), numbers))


@dataclass(frozen=True)
class Experiment:
    """A seeded experiment: `run(quick, out, progress)` writes figures into `out` and returns a Result."""

    name: str
    title: str
    claim: str
    expected: str
    source: str  # the paper or seed claim it reproduces
    run: Callable[[bool, Path, Progress], Result]
