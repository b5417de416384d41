"""Findings while training runs: the rules at flushes, each new (kind, first layer) reported once.

The rules read the whole run, so they run at a flush only when the run has grown by a tenth since
they last ran (and at least `flush_every` steps): about a dozen times over any run. The store is
read a piece at a time (`watch.stored_series()`: only the steps flushed since the last check).

A finding is said while training only once a second check still finds it (`confirmed`): the rules
judge a state by whether it lasts to the run's end or for a quarter of the run, which a partial run
cannot tell (a healthy VAE's units dead from step 40 to ~110 of 600, a DQN's one gradient burst
before its target network's schedule showed). What the last check held back, the whole run's
diagnosis at the end says.
"""

from __future__ import annotations

import json
import weakref
from typing import Callable, Iterable

from gradwatch.diagnose import diagnose
from gradwatch.diagnose.finding import KINDS, Finding
from gradwatch.errors import ConfigError, TrainingStopped
from gradwatch.say import say

LIVE_FINDING = "live_finding"  # an event: a finding said while training ([kind, first layer])
# measured facts, not states that may pass: said at the first check that finds them
AT_ONCE = ("non_finite", "stale_gradients", "late_clipping", "repeated_backward", "loss_broadcast")


def check_stop_on(stop_on: Iterable[str]) -> tuple[str, ...]:
    """`stop_on` as a tuple of finding kinds (one kind may be passed alone), each checked: a typo
    would otherwise never stop anything."""
    kinds = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"stop_on={unknown!r}: unknown finding kind; choose from {', '.join(KINDS)}")
    return kinds


class LiveDiagnosis:
    """Called by a Watch after each flush (`watch.on_flush`)."""

    def __init__(self, on_finding: Callable[[Finding], None] | None = None, stop_on: Iterable[str] = (),
                 warn: bool = True):
        if on_finding is not None and not callable(on_finding):
            raise ConfigError(f"on_finding={on_finding!r}: expected a function taking a Finding")
        self.on_finding = on_finding
        self.stop_on = check_stop_on(stop_on)
        self.warn = warn
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, str]] = set()
        self._last_step = 0
        self._watch: weakref.ref | None = None
        self._closed_at: int | None = None  # the last stored step `close` diagnosed through
        self.check_at_close = True  # `gradwatch run` diagnoses the whole run when it ends anyway
        self._latest: list[Finding] | None = None  # the last diagnosis of the run so far
        self._told: set[int] = set()  # findings whose fate at the end has been said
        self._held: set[tuple[str, str]] = set()  # (kind, first layer) the last check found
        self._failed = False  # the rules raised once: no more checks (see _diagnosed)

    def __call__(self, watch) -> None:
        self._watch = weakref.ref(watch)
        step = watch.step
        if step - self._last_step < max(watch.flush_every, step // 10):
            return
        self._last_step = step
        latest = self._diagnosed(watch.stored_series())
        if latest is None:
            return
        self._latest = latest
        self.report(self.confirmed(self._latest), watch)

    def _diagnosed(self, series) -> list[Finding] | None:
        """The findings, or None when the rules failed: a bug in them must never end the training
        they watch (a reviewer's classifier-then-GAN run died inside its optimizer's step). Said
        once; the checks stop, the recording goes on."""
        if self._failed:
            return None
        try:
            return diagnose(series)
        except Exception as exc:  # noqa: BLE001
            self._failed = True
            say(f"gradwatch: the live diagnosis failed ({type(exc).__name__}: {exc}); training and recording go on, "
                "`gradwatch diagnose` reads the run afterwards")
            return None

    def confirmed(self, findings: list[Finding]) -> list[Finding]:
        """The findings the check before found too (those of `AT_ONCE` at once, and all of them once
        the run is non-finite); the rest held till the next check. A state the run soon leaves is
        gone by then; one that lasts is said a check (a tenth of the run, at least `flush_every`
        steps) later."""
        keys = [(f.kind, _first_layer(f)) for f in findings]
        if any(f.kind == "non_finite" and f.severity == "error" for f in findings):
            self._held = set(keys)  # a run gone non-finite does not recover: what led there is confirmed
            return findings
        out = [f for f, key in zip(findings, keys) if f.kind in AT_ONCE or key in self._held]
        self._held = set(keys)
        return out

    def close(self) -> None:
        """At detach, after the last flush: the steps since the last check (up to a tenth of the
        run: a NaN at step 205 of 210 was never said) are diagnosed once more. Nothing is stopped:
        the training is over. Called again (a TensorBoard sink closes it too), it diagnoses only
        what was stored since. Then what was said while training and the whole run does not keep
        is said (once). What the last check held back (`confirmed`), the end confirms: it is said."""
        watch = self._watch() if self._watch is not None else None
        if not self.check_at_close or watch is None:
            return
        if watch.step != self._last_step:
            series = watch.stored_series()
            if len(series.steps) and int(series.steps[-1]) != self._closed_at:
                self._closed_at = int(series.steps[-1])
                self._latest = self._diagnosed(series) if not self._failed else self._latest
        if self._latest is not None:  # the run's end confirms what the last check held back
            self.report(self._latest, stop=False)
        if self.warn and self._latest is not None:
            said = [(f.first_step, f.kind, _first_layer(f)) for f in self.findings if id(f) not in self._told]
            self._told.update(id(f) for f in self.findings)
            for line in not_kept(said, self._latest):
                say(line)

    def report(self, findings: list[Finding], watch=None, stop: bool = True) -> None:
        """Tell each finding not told before (by kind and first layer); with `stop`, raise
        `TrainingStopped` on a kind in `stop_on`, after detaching `watch`."""
        for f in findings:
            key = (f.kind, _first_layer(f))  # the layers listed may grow as it spreads
            if key in self._seen:
                continue
            self._seen.add(key)
            self.findings.append(f)
            if watch is not None:
                watch.note_event(f.first_step, LIVE_FINDING, json.dumps(list(key)))
            if self.warn:
                say(f.line())
            if self.on_finding is not None:
                self.on_finding(f)
            if stop and f.kind in self.stop_on and f.severity != "info":  # info: no problem (yet), nothing to stop
                at = watch.step if watch is not None else f.first_step  # (the check's step, not the finding's first)
                if watch is not None:
                    watch.detach()
                since = f" (present since step {f.first_step})" if at != f.first_step else ""
                raise TrainingStopped(f"stopped at step {at} on {f.kind}{since}: {f.message}")


def _first_layer(f: Finding) -> str:
    return f.layers[0] if f.layers else ""


def not_kept(said: list[tuple[int, str, str]], final: list[Finding]) -> list[str]:
    """A line for each kind of finding said while training (step, kind, first layer) that the whole
    run's diagnosis has none of: judged with what came after (a gradient burst that recovered while
    the loss went on falling), it was not a problem. Said, so the two verdicts do not just disagree."""
    kept = {f.kind for f in final}
    first: dict[str, int] = {}
    for step, kind, _ in said:
        if kind not in kept:
            first[kind] = min(step, first.get(kind, step))
    return [f"gradwatch: {kind} said at step {step} while training is not kept by the whole run's diagnosis: "
            "what the rules saw then did not last" for kind, step in first.items()]
