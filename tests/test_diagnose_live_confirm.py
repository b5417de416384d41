"""Live checks say a finding only once a second check still finds it: a state the run soon leaves
(a healthy VAE's units dead for ~70 of 600 steps) was printed as a warning the whole run dropped."""

from __future__ import annotations

import sys

import pytest

from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.live import LiveDiagnosis
from gradwatch.errors import TrainingStopped

live_mod = sys.modules["gradwatch.diagnose.live"]  # gradwatch.diagnose is also the function


class FakeWatch:
    """What LiveDiagnosis reads of a Watch: the step, the flush size, the stored series, events."""

    def __init__(self):
        self.step, self.flush_every, self.events, self.detached = 0, 10, [], False

    def stored_series(self):
        return None

    def note_event(self, *event):
        self.events.append(event)

    def detach(self):
        self.detached = True


def _checks(monkeypatch, scripted: list[list[Finding]], **kw) -> tuple[LiveDiagnosis, FakeWatch, list]:
    """Run the live check at steps 10, 20, ... with the diagnosis of each check scripted."""
    said: list[Finding] = []
    live = LiveDiagnosis(on_finding=said.append, warn=False, **kw)
    watch, plan = FakeWatch(), iter(scripted)
    monkeypatch.setattr(live_mod, "diagnose", lambda series: next(plan))
    for k in range(len(scripted)):
        watch.step = 10 * (k + 1)
        live(watch)
    return live, watch, said


DEAD = Finding("dead_units", "warning", 4, ("act1",), "dead")
NAN = Finding("non_finite", "error", 12, ("fc0",), "nan")


def test_a_state_gone_at_the_next_check_is_never_said(monkeypatch):
    live, watch, said = _checks(monkeypatch, [[DEAD], [], []])
    assert said == [] and watch.events == []


def test_a_state_found_by_two_checks_is_said_once_at_the_second(monkeypatch):
    live, watch, said = _checks(monkeypatch, [[], [DEAD], [DEAD], [DEAD]])
    assert said == [DEAD] and len(watch.events) == 1


def test_a_nan_is_said_and_stops_at_the_first_check(monkeypatch):
    with pytest.raises(TrainingStopped):
        _checks(monkeypatch, [[NAN]], stop_on=("non_finite",))


def test_what_the_last_check_held_the_end_says(monkeypatch):
    live, watch, said = _checks(monkeypatch, [[], [DEAD]])
    live.close()  # the last check was at the watch's last step: nothing new to diagnose
    assert said == [DEAD]


def test_what_led_to_a_nan_is_said_with_it(monkeypatch):
    """A run gone non-finite does not recover: the explosion found with the NaN is not held back."""
    burst = Finding("exploding_gradient", "error", 8, ("fc0",), "burst")
    live, watch, said = _checks(monkeypatch, [[burst, NAN]])
    assert said == [burst, NAN]


def test_the_stop_names_the_step_training_stopped_at_and_when_the_finding_began(monkeypatch):
    """A tester's run raised at step 99 on a vanishing gradient present since step 0, and was told
    "stopped at step 0"."""
    with pytest.raises(TrainingStopped, match=r"stopped at step 20 on dead_units \(present since step 4\)"):
        _checks(monkeypatch, [[DEAD], [DEAD]], stop_on=("dead_units",))
