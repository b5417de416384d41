"""fix: try remedies on the user's own training in short trials and say, measured, which works.

A baseline trial is diagnosed; candidate remedies are built from its findings and each is run for
the same budget of steps through the zero-code hooks (the user's files are never changed); the
trials are ranked by the harmful findings they leave, then by the loss they reach.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from gradwatch.diagnose.advice import Context, nan_cause
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.signals import functional_activation, hidden_layers, last_weight_index, outputs_own
from gradwatch.errors import ConfigError
from gradwatch.fix.candidates import (BLOW_UP, MODEL_KEYS, Candidate, aimed, autotrainer_order, combine, findings_model,
                                      from_findings, from_origin, lr_ceiling)
from gradwatch.fix.inject import PAUSABLE
from gradwatch.fix.locate import Origin
from gradwatch.fix.names import Names, script_names
from gradwatch.fix.pause import available_memory
from gradwatch.fix.touched import Workspace, one_fix_at_a_time
from gradwatch.fix.trial import (LOCATE, OUTPUT_LOG, Trial, discard_trials, end_paused, final_error, final_loss, go_on,
                                 lower_beyond_noise, run_trial, run_trial_in_process)
from gradwatch.store import read_run, store_files
from gradwatch.store.reader import connect
from gradwatch.store.series import RunSeries

BASELINE = Candidate("baseline (no change)")


class FixInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during `fix`, once the baseline was measured: `.result` holds the trials
    that finished, so what was learnt is not lost with the ones still to run. A KeyboardInterrupt, so
    code that stops on one still does."""

    def __init__(self, result: "FixResult") -> None:
        super().__init__("gradwatch fix interrupted")
        self.result = result


@dataclass
class FixResult:
    """What `fix` measured: the baseline, the screening and full-length trials, and the winner
    (`.winner`, `.repaired`, `.change`: the code to paste; `.ranked`: the full trials, best first)."""

    baseline: Trial
    trials: list[Trial]  # the full-length trials
    budget_steps: int = 0  # steps per full-length trial
    screen_steps: int = 0  # steps per screening trial
    rung_steps: int = 0  # steps every screening trial ran before the better half ran on to screen_steps (0: none)
    spent: int = 0  # steps of screening trials since run again from their start (they could not pause)
    screened: list[Trial] = field(default_factory=list)  # the short screening trials, if any
    # files under the working directory the script wrote during the trials: each trial's copies are
    # in its run directory under written/, and the directory was put back after every trial ...
    written: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)  # ... except these (too much to copy aside)
    edited: list[str] = field(default_factory=list)  # source files changed during the fix: the user's, kept
    names: Names = field(default_factory=Names)  # how the script calls its model and optimizer
    located: Trial | None = None  # the baseline run again up to its first NaN/Inf, when the data or loss made it
    origin: Origin | None = None  # the operation and line that made it (or first held it), found by that run

    def __repr__(self) -> str:
        """One line (a notebook shows `gw.fix(...)`'s result by it), not every trial's every finding."""
        winner = self.winner
        verdict = (f"winner={winner.candidate.name!r}, repaired={self.repaired}, loss {self.baseline.final_loss:.4g} -> "
                   f"{winner.final_loss:.4g}" if winner else f"winner=None, baseline loss {self.baseline.final_loss:.4g}")
        return (f"FixResult({verdict}, {len(self.screened)} screened, {len(self.trials)} full trials of "
                f"{self.budget_steps} steps; .change for the code, .ranked for the trials)")

    @property
    def change(self) -> str | None:
        """The winner's code as it goes into the script: with the imports it needs and a comment
        for each name that stands for something of the script's."""
        return self.names.complete(self.winner.candidate.code) if self.winner else None

    @property
    def ranked(self) -> list[Trial]:
        """Best first; a final stopped halfway, behind the first (`_unless_behind`), after those run in full."""
        return sorted(self.trials, key=lambda t: (t.stopped, t.score))

    @property
    def winner(self) -> Trial | None:
        """The best full-length trial that beats the baseline with a finite loss: lower by more than
        the noise of the two losses (`lower_beyond_noise`) whatever it left, or, against a baseline
        whose loss is non-finite, any. An LSTM at chance (0.6943) "beaten" by a pair of remedies at
        0.6927, a standard error of 0.005 apart, was printed as the change to make, and pasted in it
        gave a validation accuracy of 0.48 against the baseline's 0.50. A leader that only took the
        symptom away (`above`) does not hide one further down that learnt (a reviewer's: 0.99 with
        no finding left, against one at 0.50). A GAN's mixed loss is no measure: fewer harmful
        findings win there."""
        best = self._ahead
        if best is None or self.baseline.score[0] != 0:
            return best
        if self.baseline.own_loss:
            return best if len(best.harmful) < len(self.baseline.harmful) or lower_beyond_noise(best, self.baseline) else None
        return next((t for t in self.ranked if t.score < self.baseline.score and t.score[0] == 0
                     and lower_beyond_noise(t, self.baseline)), None)

    @property
    def above(self) -> Trial | None:
        """The best full trial when it left fewer harmful findings but ended no lower than the
        baseline's finite loss, beyond the noise of the two, and no other trial won: the symptom
        gone, the learning no better (a tanh RNN saturated by raw inputs, its vanishing gone under a
        GRU + lr x10, ended at chance, 0.6962 against 0.6918, and pasted in gave a validation
        accuracy of 0.48; a post-LN transformer's lr x0.1 ended at 0.6031 against 0.6033, its pasted
        change at the majority class as before). No repair."""
        best = self._ahead
        if best is None or self.baseline.score[0] != 0 or self.baseline.own_loss or self.winner is not None:
            return None
        fewer = len(best.harmful) < len(self.baseline.harmful)  # (as many: a lower loss within the noise is `within_noise`)
        return best if best.final_loss >= self.baseline.final_loss or fewer else None

    @property
    def within_noise(self) -> Trial | None:
        """The best full trial when it ended lower than the baseline, but within the noise."""
        return self._ahead if self.winner is None and self.above is None else None

    @property
    def _ahead(self) -> Trial | None:
        """The best full trial if it ranks ahead of the baseline with a finite loss."""
        best = self.ranked[0] if self.trials else None
        return best if best is not None and best.score < self.baseline.score and best.score[0] == 0 else None

    @property
    def repaired(self) -> bool:
        return self.winner is not None and self.winner.works

    @property
    def cost_steps(self) -> int:
        ran = {id(t): t for t in [self.baseline, *self.trials, *self.screened, *filter(None, [self.located])]}
        # a final screened in full, or run on, ran once
        return sum(t.steps - t.resumed_from for t in ran.values()) + self.spent

    def save(self, out: Path) -> Path:
        """OUT/fix.json: every trial so far and the winner, rewritten after each trial, so an
        interrupted fix keeps what it measured."""
        def row(t: Trial) -> dict:
            return {"remedy": t.candidate.name, "spec": t.candidate.spec, "run_dir": t.run_dir.name, "steps": t.steps,
                    "final_loss": t.final_loss if np.isfinite(t.final_loss) else None,
                    "final_error": t.final_error if np.isfinite(t.final_error) else None, "harmful": t.harmful,
                    "not_counted": sorted({f.kind for f in t.frozen_only}),  # only in layers no optimizer trains
                    "works": t.works, "failed": t.failed, "exit_code": t.exit_code, "not_applied": t.not_applied,
                    "resumed_from": t.resumed_from, "stopped_behind": t.stopped}
        winner = self.winner
        data = {"baseline": row(self.baseline), "screened": [row(t) for t in self.screened],
                "trials": [row(t) for t in self.trials], "winner": winner.candidate.name if winner else None,
                "code": self.change, "repaired": self.repaired,
                "non_finite_origin": asdict(self.origin) if self.origin else None,
                "written_by_the_script": self.written, "left_overwritten": self.overwritten,
                "edited_during_the_fix": self.edited}
        path = out / "fix.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path


# A remedy screened at more than this many times the leader's loss (the leader's plus (margin - 1)
# times its absolute value, for a loss that can be negative) has shown it does not help beside a
# leader that repaired the run: it is not paired with it.
PAIR_MARGIN = 2.0


def pick_finals(screened: list[Trial]) -> list[Candidate]:
    """The full-length trials after screening (`screened`: best first, at least one).

    A leader that repaired the run in screening (no harmful finding, a finite loss) runs alone,
    then with the best remedy that also repaired it and screened within PAIR_MARGIN of its loss
    (that remedy alone when the two change the same thing, and then only if it screened within the
    noise of the leader's loss; nothing more when there is none): a
    remedy that left a harmful finding, or a much higher loss, has shown it does not help, and
    beside a repair it could only spoil it. A leader that did not repair it runs with the
    runner-up (alone when both change the same thing), then with the third (else the runner-up
    with the third, else the next one alone): a setup that trains usually changes several things
    at once (activation, initialisation, optimizer), and the leader is the remedy most likely to
    be one of them."""
    lead = screened[0]
    if lead.works:
        return [lead.candidate, *_partner(lead, screened[1:])]
    ranked = [t.candidate for t in screened]
    if len(ranked) == 1:
        return ranked
    first = combine(ranked[0], ranked[1]) or ranked[0]
    other = None
    if len(ranked) > 2:
        other = combine(ranked[0], ranked[2]) or combine(ranked[1], ranked[2]) or ranked[2]
    if other is None or other == first:
        other = ranked[1]
    return [first, other]


def applied(screened: list[Trial]) -> list[Trial]:
    """The screening trials whose remedy changed something, best first: the half that ran the whole
    screening before the half that ended at its first rung (`first_rung`)."""
    return sorted((t for t in screened if not t.not_applied), key=lambda t: (t.behind, t.score))


def screened_in_full(result: FixResult, cand: Candidate) -> Trial | None:
    """The screening trial of `cand` when it ran as far as a full trial would: the screening had the
    whole budget, or the trial ended before the screening's (the script's end, a loss that stayed
    non-finite). A run again would repeat it step for step."""
    return next((t for t in result.screened if t.candidate.spec == cand.spec and not t.not_applied
                 and (result.screen_steps >= result.budget_steps or not t.cut)), None)


def paused_screening(result: FixResult, cand: Candidate) -> Trial | None:
    """The screening trial of `cand` paused at the screening's length, to be run on as its final."""
    return next((t for t in result.screened if t.process is not None and t.candidate.spec == cand.spec), None)


# Screening trials kept paused at once, at most (the best so far by score: the finals come from them),
# and holding at most MEMORY_SHARE of the memory free when each pauses: every other one is ended.
PAUSED_MAX = 3
MEMORY_SHARE = 0.5


def keep_paused(screened: list[Trial], end: Callable[[Trial], None], keep: int = PAUSED_MAX) -> None:
    """End the paused screening trials that are unlikely to become finals, or that would hold too
    much memory: a final is the leader, a remedy close behind it, or their combination (a new trial)."""
    free = available_memory() * MEMORY_SHARE
    held = 0
    for rank, t in enumerate(sorted((t for t in screened if t.process is not None), key=lambda t: t.score)):
        held += t.process.channel.memory
        if rank >= keep or held > free:
            end(t)


def spare_final(result: FixResult) -> Candidate | None:
    """The best screened remedy not yet run at full length, when the screening leader had repaired
    the run but no full trial did: a quarter of the budget can flatter a remedy (an lr still too
    high climbs back up, a swap's deeper net diverges later), and the finals picked for a leader
    that repaired the run leave out everything else, so the next remedy deserves its full trial
    before fix says nothing works."""
    screened = applied(result.screened)
    if not screened or not screened[0].works or any(t.works for t in result.trials):
        return None
    tried = {t.candidate.name for t in result.trials}
    return next((t.candidate for t in screened if t.candidate.name not in tried), None)


STACKED = ("optimizer", "lr_scale")  # the spec keys of a remedy screened on top of a leader that repaired the run


def stacked(cand: Candidate) -> bool:
    return any(k in cand.spec for k in STACKED)


def on_the_leader(cand: Candidate, screened: list[Trial]) -> Candidate:
    """An optimizer swap or an lr scale, screened on top of the screening's leader when the leader
    repaired the run. On a network the fault still breaks, a new optimizer or lr measures the fault,
    not itself (Adam diverges from an init 3x too large as SGD does: 448 at 50 steps on an 8-layer
    ReLU MLP; a 35-layer MLP's Glorot init kills its ReLUs at lr x0.1 too, while He + LeakyReLU at
    lr x0.1 reached 0.30 against 1.16 without it); on the repaired network it measures what it adds.
    Alone otherwise: the optimizer or the lr may be the fault."""
    if not stacked(cand):
        return cand
    done = applied(screened)
    if not done or not done[0].works:
        return cand
    # on the best repair it combines with: a leader with an lr scale on top takes no optimizer swap
    return next((c for t in done if t.works and (c := combine(t.candidate, cand)) is not None), cand)


def blew_up(trial: Trial) -> bool:
    """Its loss went non-finite or rose by more than its own size (2.97 -> 15.8 in 15 steps: too
    short for a finding), or it left an exploding gradient or a divergence. A trial that failed
    (the change broke the script: BatchNorm on one sample a step) did not blow up: bounded, it
    fails alike."""
    if any(f.kind in BLOW_UP for f in trial.blocking):
        return True
    if trial.failed or trial.steps == 0:
        return False
    rose = np.isfinite(trial.first_loss) and trial.final_loss - trial.first_loss > abs(trial.first_loss)
    return trial.final_loss == float("inf") or bool(rose)


def bounded_retry(baseline: Trial, screened: list[Trial], offered: list[Candidate]) -> Candidate | None:
    """A change to the model that blew up in screening where the baseline did not, once more with
    its steps bounded: with the Adam `offered`, else on top of a normalisation that repaired the
    run. Such a change let the gradient through (a 10-layer sigmoid MLP's SELU + LeCun), and the
    lr the script had for the vanishing network then overshoots; Adam moves each weight by about
    its lr whatever the gradient's scale, and a weight a norm follows is scale-invariant, its
    effective step shrinking as it grows (Arora et al. 2019). That sigmoid MLP's SELU blew up
    under SGD at lr 0.1 (3 seeds), and with Adam reached 0.024-0.059, its ReLU + He + Adam
    variant 0.032-0.067, BatchNorm + LeakyReLU (picked without the retry) 0.058-0.098; a
    small-init ReLU MLP updated by hand, SELU on BatchNorm 0.032-0.044 against 0.044-0.066 and
    0.069-0.075. None when the baseline blew up: there the change did not fix the fault, and the
    lr remedies are screened for it alone."""
    if blew_up(baseline):
        return None
    tried = [t.candidate.spec for t in screened]
    done = applied(screened)
    bounds = [c for c in offered if "optimizer" in c.spec] + [t.candidate for t in done
                                                             if t.works and "norm" in t.candidate.spec]
    for t in done:
        if stacked(t.candidate) or not any(k in t.candidate.spec for k in MODEL_KEYS) or not blew_up(t):
            continue
        for bound in bounds:
            if (both := combine(t.candidate, bound)) is not None and both.spec not in tried:
                return both
        return None  # one retry, for the best-ranked change that blew up
    return None


def _partner(lead: Trial, others: list[Trial]) -> list[Candidate]:
    """The final beside a leader that repaired the run alone: the leader with the best other repair
    close to it, or that repair alone when the two do not combine; none when no other qualifies.
    The leader with something on top (`on_the_leader`) screened behind it has shown that what it
    adds does not help: a deep sigmoid MLP's BatchNorm + Adam (1.45 against BatchNorm's 1.26) took
    the place of BatchNorm + LeakyReLU (0.058 in full) and ended at 0.56."""
    close = [t for t in others
             if t.works and t.final_loss - lead.final_loss <= (PAIR_MARGIN - 1) * abs(lead.final_loss)
             and not lead.candidate.spec.items() <= t.candidate.spec.items()  # the leader and more, behind it
             and not _outrun(lead, t)]
    return [combine(lead.candidate, close[0].candidate) or close[0].candidate] if close else []


def _outrun(lead: Trial, other: Trial) -> bool:
    """`other` changes what the leader changes (they do not combine), so its final would be the
    other way of making the same change, alone, and it screened behind the leader beyond the noise
    of the two losses (both measured): the same comparison at full length has no reason to turn
    (a sigmoid MLP: SELU 0.329 ± 0.025, LeakyReLU 0.649 ± 0.048 screened; 0.107 and 0.134 in full).
    A remedy that combines with the leader is still paired: what it adds is not what it screened."""
    measured = np.isfinite(lead.spread_error) and np.isfinite(other.spread_error)
    return measured and combine(lead.candidate, other.candidate) is None \
        and lower_beyond_noise(lead, other, error="spread_error")


def nan_to_locate(baseline: Trial) -> Finding | None:
    """The baseline's NaN/Inf finding when measured gradient growth does not explain it (`nan_cause`
    "data" or "unknown"): the locating run names the operation that made it. With too few steps
    before it to measure the growth, the cause may still be the learning rate, but the run to find
    out is cheap: the NaN is early."""
    return next((f for f in baseline.findings
                 if f.kind == "non_finite" and nan_cause(f.evidence) in ("data", "unknown")), None)


def at_the_origin(origin: Origin, fault: Finding, candidates: list[Candidate], names: Names,
                  target: str | None = None) -> list[Candidate]:
    """The remedies worth a trial once the locating run found where a NaN/Inf that no gradient growth
    led to was made: those for that place (`from_origin`) first. A batch that already held it is the
    data's, and at the first step, before any update, only a change to the model can matter: there
    an lr, a clipper or an optimizer swap is not tried. Arithmetic the training drove out of its
    domain later (a log of a predicted variance under Adam at lr 0.1: NaN at step 57 with the
    gradients flat, none in 600 steps at lr 0.01) may still be the lr's: those stay, after.
    `candidates` are aimed at `target` already (`aimed`), the origin's remedies are aimed here."""
    own = [aimed(c, target) if target is not None else c for c in from_origin(origin, names)]
    if fault.evidence.get("at_init"):
        return [*own, *(c for c in candidates if set(c.spec) - {"target"} <= set(MODEL_KEYS))]
    return own if not origin.made_here else [*own, *candidates]


MIN_SCREEN = 10  # steps a screening runs at least (past the fault's onset)


def screen_steps(budget_steps: int, onset: int = 0) -> int:
    """A quarter of the budget, at least 10 steps (fewer measure nothing), never more than the budget
    (`--budget-steps 4` screened each remedy for 10 steps and ran the finals for 4), counted from
    `onset`, the step the baseline's first finding began at: a remedy is judged on what it does to
    the fault. A script that pretrains for 60 steps, then blows up in its fine-tuning, had every
    remedy screened for 37 steps of the healthy pretraining, and ranked by noise."""
    return min(budget_steps, max(budget_steps // 4, MIN_SCREEN) + max(onset, 0))


def onset(baseline: Trial, steps: np.ndarray) -> int:
    """How many of the baseline's recorded `steps` came before its first counted finding began (0
    when it has none)."""
    first = min((f.first_step for f in baseline.blocking), default=None)
    return 0 if first is None or not len(steps) else int(np.searchsorted(steps, first))


def first_rung(short: int, onset_steps: int) -> int | None:
    """Where every screening trial pauses before the better half of them runs on to `short`:
    halfway through the steps it screens past the onset (successive halving, Jamieson & Talwalkar
    2016, with η = 2: the remedies that end in the worse half cost half their screening). None when
    that half is shorter than the 10 steps a screening runs at least (fewer measure nothing)."""
    past = (short - onset_steps) // 2
    return onset_steps + past if past >= MIN_SCREEN else None


def screen_in_full(short: int, full: int, n: int) -> bool:
    """Whether to screen `n` remedies for the whole budget rather than `short` steps each (`full`:
    the steps a full trial runs, fewer than the budget when the script ends before it), where
    trials cannot pause (in process, or the free memory unknown): yes when that costs at most one
    full trial more. A quarter of the budget counted from a late fault's onset can be most of a
    trial (a GRU whose lr schedule blew it up at step 81 of 120 was screened for 117 steps, then
    its leader run again for 120); a leader that repaired the run is then a final without a run of
    its own, which saves the full trial the longer screening cost. Where trials pause, a final runs
    on from its screening's pause and pays for nothing twice, and the rungs end the worse half
    early: a screening in full would only run every remedy to the end."""
    return n * (full - short) <= full


# A fix expected to take longer than this after its baseline says so, with the time per step.
SAY_COST_AFTER = 120.0


def full_length(baseline: Trial, budget_steps: int) -> int:
    """The steps a full trial runs: the budget, or fewer where the baseline script ended on its own
    before it. A baseline that failed (a script that raises on its NaN loss) says nothing of the
    script's length: a remedy that keeps the loss finite runs on to the budget."""
    return budget_steps if baseline.cut or baseline.failed else min(budget_steps, baseline.steps)


def expected_cost(baseline: Trial, queue: list[Candidate], screen: int, finals: int,
                  full: int | None = None) -> str | None:
    """What the trials to come will cost at the baseline's pace, when that is more than
    SAY_COST_AFTER seconds: a script at 20 s a step runs for an hour, and says so at the start.
    `full`: a full trial's steps (`full_length`; the baseline's by default)."""
    if not queue or baseline.steps == 0:
        return None
    pace = baseline.seconds / baseline.steps  # start-up included: an upper bound
    budget = baseline.steps if full is None else full
    screen = min(screen, budget)  # screened in full: no further than the script's own length
    plan = ([(len(queue), screen), (min(finals, len(queue)), budget)] if screen else
            [(len(queue), budget)])
    seconds = pace * sum(n * steps for n, steps in plan)
    if seconds < SAY_COST_AFTER:
        return None
    what = (f"up to {len(queue)} full trials of {budget} steps" if not screen else
            f"{len(queue)} remedies to screen in full ({budget} steps each), then up to {min(finals, len(queue))} "
            f"full trials of them combined" if screen == budget else
            f"{len(queue)} remedies to screen for {screen} steps each, then up to {min(finals, len(queue))} "
            f"full trials of {budget}")
    return (f"gradwatch fix: the baseline took {pace:.3g} s a step; {what}: about {seconds / 60:.0f} min more "
            "(a smaller --budget-steps shortens every trial)")


def group_lrs(run_dir: Path) -> tuple[float, ...]:
    """The peak lr of each parameter group over the run (the store keeps every group's per step;
    the series only the first's)."""
    db = connect(store_files(run_dir)[0])
    try:
        rows = [json.loads(text) for (text,) in db.execute("SELECT lrs FROM steps WHERE lrs IS NOT NULL")]
    finally:
        db.close()
    width = max((len(r) for r in rows), default=0)
    peaks = [max((r[i] for r in rows if len(r) > i and np.isfinite(r[i])), default=np.nan) for i in range(width)]
    return tuple(float(lr) for lr in peaks if np.isfinite(lr))


def hidden_functions(run: RunSeries) -> set[str]:
    """The activations forward() calls as functions on the outputs of layers before the last weight
    layer (`F.relu(self.fc1(x))`, found by the watch): one on the last's is the output's own, and so
    is one the loss takes through no weight layer (`hidden_layers`)."""
    hidden = hidden_layers(run)
    return {l.activation for l in run.layers if functional_activation(l) and l.name in hidden}


def hidden_activations(run: RunSeries) -> set[str]:
    """The activations of the modules that first run before the last weight layer: one that runs
    only after it is the output's, which the swaps keep, so a swap of it alone would change nothing;
    so is a head's that another head runs after (`hidden_layers`). A run with no weight layer: all
    but those the loss takes."""
    hidden = hidden_layers(run) if last_weight_index(run.layers) >= 0 else {l.name for l in run.layers} - outputs_own(run)
    return {l.activation for l in run.layers if l.role == "activation" and l.name in hidden}


def fix(command: list[str] | Callable[[], object], *, out: str | os.PathLike = "runs/fix", budget_steps: int = 200,
        candidates: list[Candidate] | None = None, order: str = "gradwatch", strategy: str = "screen",
        finals: int = 2, progress: Callable[[str], None] | None = None, timeout: float | None = None) -> FixResult:
    """Run `command` (argv of a training process, or a function that trains in this process) as
    a baseline and with candidate remedies.

    `order="gradwatch"` builds candidates from the baseline's findings; `"autotrainer"` replays
    AutoTrainer's fixed order. `strategy`: "screen" (default) runs every candidate for a quarter
    of the budget (in two rungs where trials can pause: `_screen`; else all of it when that costs
    at most one full trial more: `screen_in_full`), then
    at most two at full length (`pick_finals`: a leader that repaired the run
    alone and beside the best other repair, stopped halfway if behind it: `_unless_behind`; else
    the leader combined with the runner-up and with the third) — every remedy gets a look for about the cost of two full trials, and the
    choice rests on measured loss, not on a fixed order; "first" runs full
    trials in order and stops at the first that works (what AutoTrainer does); "all" runs every
    one at full length.
    """
    if not isinstance(budget_steps, int) or budget_steps < 1:
        raise ConfigError(f"budget_steps={budget_steps!r}: expected a whole number >= 1")
    if order not in ("gradwatch", "autotrainer"):
        raise ConfigError(f"order={order!r}: expected 'gradwatch' or 'autotrainer'")
    if strategy not in ("screen", "first", "all"):
        raise ConfigError(f"strategy={strategy!r}: expected 'screen', 'first' or 'all'")
    say = progress or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)

    trained: list = []  # in process: the models the trials trained (weak references)

    def trial(name: str, cand: Candidate, steps: int, locate_at: int | None = None, pause: bool = False,
              paused: Trial | None = None) -> Trial:
        """`pause`: a screening trial that may be run on later (pause.py); `paused`: such a trial, run on."""
        try:
            if paused is not None:
                t = go_on(paused, steps, timeout, pause=pause)
            elif callable(command):
                t = run_trial_in_process(command, out / name, cand, steps, trained=trained, locate_at=locate_at)
            else:
                t = run_trial(command, out / name, cand, steps, timeout=timeout, locate_at=locate_at, say=say,
                              pause=pause)
        finally:  # also when interrupted: the user's directory as it was
            touched = workspace.settle(out / name)
        if touched:  # what it wrote is put aside: run on, it would miss it
            end(t)
        return t

    def end(t: Trial) -> None:
        """A paused trial ended, and what its script writes on its way out (a `finally:` that saves a
        checkpoint, an atexit log) put aside too: ended after its last put-back, it replaced the
        user's own file."""
        if t.process is not None:
            end_paused(t)
            workspace.settle(t.run_dir)

    with one_fix_at_a_time(Path.cwd(), say):
        workspace = Workspace(Path.cwd(), out)  # first: a killed fix's trials date what it left
        discard_trials(out)
        if workspace.notice:
            say(f"gradwatch fix: {workspace.notice}")
        partial: list[FixResult] = []  # the result so far, once the baseline is measured
        try:
            return _fix(trial, end, command, out, budget_steps, candidates, order, strategy, finals, say, workspace,
                        partial)
        except KeyboardInterrupt as exc:
            if partial and not isinstance(exc, FixInterrupted):
                raise FixInterrupted(partial[0]) from exc
            raise
        finally:
            for t in partial[0].screened if partial else []:
                end(t)
            workspace.close()


def _read_stdin(tail: list[str]) -> bool:
    """The failed script's traceback shows it read its standard input: not every failure while data
    was piped in is for want of it (stdin is a pipe under ssh, CI, subprocess)."""
    return any("stdin" in line or "JSONDecodeError" in line or line.startswith("EOFError") for line in tail)


def _piped_in() -> bool:
    """Data was piped or redirected into this process (its stdin a pipe or a file, not a terminal
    or /dev/null): the trials, whose stdin is /dev/null, never see it."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # (no stdin, or one without a descriptor: pytest's)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _pausable(baseline: Trial, in_process: bool) -> bool:
    """Whether the trials will pause at their budget (pause.py), as the baseline's process could:
    fix's own child with its model on the CPU (inject's PAUSABLE), started as a process, and the
    free memory known. Known before screening, trials that cannot pause are screened in full where
    that costs at most one full trial more (`screen_in_full`), in one rung: a rung's worse half
    saves nothing, since the better half runs again from its start. (A trial that writes files
    before its pause cannot run on either, but the baseline cannot tell those from the files a
    script saves at its end: the first screening trial tells, `_screen`.)"""
    return not in_process and available_memory() > 0 and (baseline.run_dir / PAUSABLE).is_file()


def _better_half(n: int) -> int:
    """How many of `n` screened remedies run on from the rung: half, rounded up."""
    return (n + 1) // 2


def _screen(trial: Callable[..., Trial], end: Callable[[Trial], None], queue: list[Candidate], result: FixResult,
            onset_steps: int, cannot_pause: bool, say: Callable[[str], None], out: Path) -> None:
    """Every candidate to the first rung, paused there (`first_rung`); the better half run on to the
    screening's length, paused again for the finals to run on. Without a rung (a short screening,
    trials that cannot pause: `_pausable`), every candidate to the screening's length. `end`: ends a paused trial."""
    short, budget = result.screen_steps, result.budget_steps
    rung = first_rung(short, onset_steps) if short < budget and not cannot_pause else None
    most = _better_half(len(queue) + 1)  # (a retry may be screened too)
    paused = False  # a trial stopped at the rung paused: trials here can

    def screen(cand: Candidate, count: str, why: str = "") -> None:
        nonlocal rung, paused
        i = len(result.screened) + 1
        say(f"gradwatch fix: screening {count} ({rung or short} steps): {cand.name}{why}")
        result.screened.append(t := trial(f"screen-{i}", cand, rung or short, pause=short < budget))
        if rung and t.cut and not paused:
            paused = t.process is not None
            if not paused:  # it could not pause (pause.py): no trial here would, each would run again
                say(f"gradwatch fix: screening {cand.name}: again from its start, to {short} steps: it could not "
                    f"pause at {rung} (it wrote files, or could not stay paused), so each remedy screens in one go")
                rung = None
                result.screened[-1] = _further(trial, result, t, t.run_dir.name, short, pause=True)
        keep_paused(result.screened, end, most if rung else PAUSED_MAX)
        result.save(out)

    queue.sort(key=stacked)  # last: screened on top of the leader by then
    own = [c for c in queue if not stacked(c)]
    for i, cand in enumerate(own, 1):
        screen(cand, f"{i}/{len(queue)}")
    if (retry := bounded_retry(result.baseline, result.screened, queue)) is not None:
        screen(retry, "one more", ": the change alone blew up where the baseline did not; its steps now bounded")
    for i, cand in enumerate(queue[len(own):], len(own) + 1):
        screen(on_the_leader(cand, result.screened), f"{i}/{len(queue)}")
    if rung is None:
        return
    result.rung_steps = rung
    n = len(result.screened)
    ahead = {id(t) for t in applied(result.screened)[:_better_half(n)]}
    for t in result.screened:
        if id(t) not in ahead:
            t.behind = True  # (ranked after the better half: also one that ended before the rung)
            end(t)
    for i, t in enumerate(result.screened):
        if id(t) in ahead and t.cut:
            anew = t.process is None  # it could not pause (it wrote files), or stay paused (memory)
            say(f"gradwatch fix: screening {t.candidate.name}: on to {short} steps (in the better half at {rung}"
                f"{'; anew: it could not stay paused' if anew else ''})")
            result.screened[i] = _further(trial, result, t, t.run_dir.name, short, pause=True)
            result.save(out)
    keep_paused(result.screened, end)  # (not before: one of the better half not yet run on would end)


def _unless_behind(trial: Callable[..., Trial], end: Callable[[Trial], None], result: FixResult,
                   start: Trial | str, cand: Candidate, half: int, lead: Trial, say: Callable[[str], None]) -> Trial:
    """A final after a first that repaired the run, run to `half` its steps and paused there; on to
    the budget unless its loss is then above the first final's at the same step beyond the noise of
    the two (`behind_then`): a remedy that far behind halfway has shown what the rest would show
    (the median stopping rule of Golovin et al. 2017, with the noise of the batches in it).
    Replayed on the benchmark's finals, it saved 200 steps and changed no winner.
    `start`: its paused screening trial, or the name of a new trial's directory."""
    paused = start if isinstance(start, Trial) else None
    name = paused.run_dir.name if paused is not None else start
    first = trial(name, cand, half, pause=True, paused=paused)  # (the screening trial's steps stay counted in it)
    if not first.cut:  # the script ended, or its loss stayed non-finite: measured in full
        return first
    try:
        behind = behind_then(first, lead)
    except BaseException:  # (Ctrl-C: in no list fix ends at its end, it would wait on)
        end(first)
        raise
    if behind:
        first.stopped = True
        end(first)
        say(f"gradwatch fix: {cand.name}: stopped at step {first.steps}, its loss {first.final_loss:.4g} above "
            f"{lead.candidate.name}'s there beyond the noise")
        return first
    if first.process is None:
        say(f"gradwatch fix: {cand.name}: runs again from its start to {result.budget_steps} steps: it wrote files, "
            "put aside, that it would miss if run on")
    return _further(trial, result, first, f"{name}-again", result.budget_steps)


def _further(trial: Callable[..., Trial], result: FixResult, t: Trial, again: str, steps: int,
             pause: bool = False) -> Trial:
    """`t`, cut at its last step, run on to `steps` in its place: from its pause, its steps counted in
    the trial that takes its place; where it could not pause (it wrote files, or could not stay
    paused), again from its start in the directory `again`, the steps it ran paid for (`spent`)."""
    if t.process is None:
        result.spent += t.steps - t.resumed_from
        return trial(again, t.candidate, steps, pause=pause)
    more = trial(t.run_dir.name, t.candidate, steps, pause=pause, paused=t)
    more.resumed_from = t.resumed_from  # (in t's place: t's steps are counted in it)
    return more


def behind_then(trial: Trial, lead: Trial) -> bool:
    """`trial` ended above `lead`'s loss at the same step (`trial.steps`) beyond the noise of the two
    losses, each read as `measure` reads a trial that ends there; non-finite where the lead's is
    finite. Not where either noise is unmeasured (fewer than 2 losses in the last tenth): one loss
    against another says nothing of the batches (a remedy stopped at step 12 on one loss each ended
    3.7x below the winner when run in full)."""
    series = read_run(lead.run_dir, compact=True)
    loss = series.loss[series.steps < series.steps[0] + trial.steps] if len(series.steps) else series.loss
    then = replace(lead, final_loss=final_loss(loss), spread_error=final_error(loss, robust=False), process=None)
    if not np.isfinite(trial.final_loss):
        return bool(np.isfinite(then.final_loss))
    measured = np.isfinite(then.spread_error) and np.isfinite(trial.spread_error)
    return bool(measured) and lower_beyond_noise(then, trial, error="spread_error")


def _fix(trial: Callable[[str, Candidate, int], Trial], end: Callable[[Trial], None],
         command: list[str] | Callable[[], object], out: Path, budget_steps: int, candidates: list[Candidate] | None,
         order: str, strategy: str, finals: int, say: Callable[[str], None], workspace: Workspace,
         partial: list[FixResult]) -> FixResult:
    say(f"gradwatch fix: baseline trial ({budget_steps} steps)")
    baseline = trial("baseline", BASELINE, budget_steps)

    if baseline.steps == 0:
        why = ("it ran to its end without one: no loss.backward() (outside torch.no_grad()) followed by "
               "optimizer.step() or an update of the weights by hand was seen, so there is no training to repair"
               if baseline.exit_code == 0 else f"exit code {baseline.exit_code}")
        tail = baseline.output_tail(3)
        if any(line.startswith("EOFError") for line in tail):  # input(): trials run with no input to read
            why += ("; it asked for input, and the trials run without any (unattended, their output in a log): "
                    "give the answer as an argument or in an environment variable instead")
        elif baseline.exit_code != 0 and _piped_in() and _read_stdin(baseline.output_tail(40)):
            # (`cat cfg.json | gradwatch fix -- python train.py`)
            why += ("; the trials run without input, so what was piped into gradwatch fix did not reach the script: "
                    "give it the file as an argument instead")
        raise ConfigError(f"the baseline run recorded no training step ({why}); "
                          f"see {out / 'baseline' / OUTPUT_LOG}" + "".join(f"\n    {line}" for line in tail))
    run = read_run(baseline.run_dir)
    if run.meta.get("optimizer") is None and not np.nan_to_num(run.metrics["update_ratio"]).any():
        raise ConfigError("the baseline run changed no weight: no optimizer.step() and no update by hand was "
                          "seen, so no remedy can change how it trains; call optimizer.step() after "
                          f"loss.backward() (see {out / 'baseline' / OUTPUT_LOG})")
    names = replace(script_names(command, Context(run)), group_lrs=group_lrs(baseline.run_dir))
    if (target := findings_model(baseline.blocking, names)) is not None:
        names = names.aimed_at(target)
    chosen = candidates is not None
    if candidates is None:
        if order == "autotrainer":
            candidates = autotrainer_order(baseline.blocking, names)
        else:
            lrs = run.lr[np.isfinite(run.lr)]
            candidates = from_findings(baseline.blocking, hidden_activations(run),
                                       layer_types={l.type for l in run.layers}, optimizer=run.meta.get("optimizer"),
                                       lr=float(lrs.max()) if len(lrs) else None,
                                       lr_ceiling=lr_ceiling(run, baseline.findings), names=names,
                                       smooth=bool(run.meta.get("input_derivatives")),
                                       sparse=bool(run.meta.get("sparse_gradients")),
                                       functions=hidden_functions(run))
    if target is not None:
        candidates = [aimed(c, target) for c in candidates]
    result = FixResult(baseline, [], budget_steps=budget_steps, names=names)
    partial.append(result)
    if (fault := nan_to_locate(baseline)) is not None:
        why = ("did not come from growing gradients" if nan_cause(fault.evidence) == "data" else
               "came too early to tell whether growing gradients led to it")
        say(f"gradwatch fix: the NaN/Inf of step {fault.first_step} {why}; "
            f"running the baseline to it again to find the operation that makes it")
        result.located = trial(LOCATE, BASELINE, fault.first_step + 1, locate_at=fault.first_step)
        result.origin = Origin.load(result.located.run_dir)
        if not chosen and order != "autotrainer" and result.origin is not None and nan_cause(fault.evidence) == "data":
            candidates = at_the_origin(result.origin, fault, candidates, names, target)
    result.save(out)
    queue = list(candidates)
    screening = strategy == "screen" and len(queue) > 1
    if screening:
        start = onset(baseline, run.steps)
        short = screen_steps(budget_steps, start)
        pausable = _pausable(baseline, callable(command))
        result.screen_steps = budget_steps if not pausable and screen_in_full(
            short, full_length(baseline, budget_steps), len(queue)) else short
    if (cost := expected_cost(baseline, queue, result.screen_steps, finals,
                              full_length(baseline, budget_steps))) is not None:
        say(cost)
    if screening:
        _screen(trial, end, queue, result, start, not pausable, say, out)
        screened = applied(result.screened)
        queue = pick_finals(screened)[:max(finals, 1)] if screened else []

    def final(i: int, n: int, cand: Candidate, why: str = "", lead: Trial | None = None) -> None:
        half = full_length(baseline, budget_steps) // 2
        paused = paused_screening(result, cand)
        if (done := screened_in_full(result, cand)) is not None:
            say(f"gradwatch fix: trial {i}/{n}: {cand.name}: its screening trial ran as far as a full one")
            result.trials.append(done)
        elif lead is not None and (paused is not None or result.rung_steps) \
                and half >= 2 * MIN_SCREEN and half - (paused.steps if paused is not None else 0) >= MIN_SCREEN:
            say(f"gradwatch fix: trial {i}/{n} ({budget_steps} steps): {cand.name}: to step {half} first, "
                f"where it stops if its loss is above trial 1's beyond the noise")
            result.trials.append(_unless_behind(trial, end, result, paused or f"trial-{i}", cand, half, lead, say))
        elif paused is not None:
            say(f"gradwatch fix: trial {i}/{n} ({budget_steps} steps): {cand.name}: its screening trial runs on "
                f"from step {paused.steps}{why}")
            result.trials.append(trial(paused.run_dir.name, cand, budget_steps, paused=paused))
        else:
            say(f"gradwatch fix: trial {i}/{n} ({budget_steps} steps): {cand.name}{why}")
            result.trials.append(trial(f"trial-{i}", cand, budget_steps))
        result.save(out)

    for i, cand in enumerate(queue, 1):
        lead = result.trials[0] if strategy == "screen" and result.trials and result.trials[0].works else None
        final(i, len(queue), cand, lead=lead)
        if strategy == "first" and result.trials[-1].works:
            break
    if strategy == "screen" and (spare := spare_final(result)) is not None:
        n = len(result.trials) + 1
        final(n, n, spare, " (the leader of the screening did not hold at full length)")
    for t in result.screened:  # (before what the trials wrote is listed: they may write as they end)
        end(t)
    result.written, result.overwritten = sorted(workspace.written), sorted(workspace.overwritten)
    result.edited = sorted(workspace.edited)
    result.save(out)
    return result


__all__ = ["fix", "FixResult", "FixInterrupted", "Trial", "Candidate"]
