"""gradwatch fix: try remedies on your own training script and say which one works."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from gradwatch import runner
from gradwatch.errors import ConfigError

if TYPE_CHECKING:  # the fix package loads torch: imported where used, so `gradwatch --help` need not wait
    from gradwatch.fix import FixResult, Trial


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fix",
                       description="Diagnose a short baseline run of the script, then run it again with each "
                                   "candidate remedy (clipping, learning rate, initialisation, activation, "
                                   "normalisation, optimizer) applied through hooks — your files are not edited — "
                                   "and rank the trials by the harmful findings they leave and the loss they reach.")
    p.add_argument("--budget-steps", type=int, default=200, help="optimizer steps per trial (default 200)")
    p.add_argument("--out", default="runs/fix", help="directory for the trials' runs (default runs/fix)")
    p.add_argument("--order", choices=("gradwatch", "autotrainer"), default="gradwatch",
                   help="candidates from the findings (default) or AutoTrainer's fixed order")
    p.add_argument("--strategy", choices=("screen", "first", "all"), default="screen",
                   help="screen every remedy for a quarter of the budget then run the best at full length "
                        "(default); first: full trials in order until one works; all: every one at full length")
    # like python -m, everything after the module is the module's own (its --options too)
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE [args]",
                   help="run a library module as a script, like python -m")
    p.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args] | -- COMMAND [args]")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.budget_steps < 1:  # named as the user typed it, not as the library's keyword
        raise ConfigError(f"--budget-steps {args.budget_steps}: expected a whole number >= 1 (optimizer steps per trial)")
    from gradwatch.fix import fix

    command = runner.command_from_target(args.target, args.module)
    runner.output_dir(args.out)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # the running trial is killed, not orphaned
    try:
        result = fix(command, out=args.out, budget_steps=args.budget_steps, order=args.order, strategy=args.strategy)
    except KeyboardInterrupt as exc:
        from gradwatch.fix import FixInterrupted

        if isinstance(exc, FixInterrupted):
            print_interrupted(exc.result, Console(highlight=False, stderr=True))
        if (Path(args.out) / "fix.json").is_file():
            print(f"gradwatch fix: interrupted; the trials that finished are in {Path(args.out) / 'fix.json'}",
                  file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_result(result, Console(highlight=False))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: subprocess.run kills the trial's process on the way out."""
    raise KeyboardInterrupt


def print_result(result: FixResult, console: Console) -> None:
    from gradwatch.diagnose import DEFAULT
    from gradwatch.fix import applied, full_length
    from gradwatch.fix.touched import WRITTEN

    if result.screened:
        each = ("in full, each as far as a full trial" if result.screen_steps >= result.budget_steps else
                f"{result.screen_steps} steps each")
        if result.rung_steps:
            ahead = sum(not t.behind for t in result.screened)
            each = f"{result.rung_steps} steps each, the better {ahead} on to {result.screen_steps}"
        screen = Table(title=f"screening: {len(result.screened)} remedies, {each}")
        for col in ("remedy", "harmful findings left", "loss"):
            screen.add_column(col)
        for t in applied(result.screened) + [t for t in result.screened if t.not_applied]:
            screen.add_row(t.candidate.name, _left(t), f"{t.final_loss:.4g}" + (f" at {t.steps}" if t.behind else ""))
        console.print(screen)
    n = len(result.trials)
    # (the script's own length where it ends before the budget: a tester's 90-step script read "of 100 steps")
    length = full_length(result.baseline, result.budget_steps)
    table = Table(title=f"gradwatch fix: {n} full trial{'s' * (n != 1)} of {length} steps" if n else
                  f"gradwatch fix: the baseline, {result.baseline.steps} steps")
    for col in ("remedy", "harmful findings left", "final loss", "vs baseline"):
        table.add_column(col)
    base = result.baseline.final_loss
    for t in [result.baseline, *result.ranked]:
        table.add_row(t.candidate.name, _left(t), f"{t.final_loss:.4g}" + (f" at {t.steps} (stopped: behind)" if t.stopped else ""),
                      "" if t is result.baseline else _versus(base, t.final_loss))
    console.print(table)
    winner = result.winner
    tried = result.trials or result.screened
    if result.baseline.failed and tried:
        console.print(f"Note: your script fails on its own: the baseline exited with code {result.baseline.exit_code} "
                      f"after {result.baseline.steps} steps ({_error(result.baseline)}). A trial that fails is ranked "
                      "behind every one that runs its course.", markup=False)
    if not tried and result.origin is not None and _at_init(result):  # (`fix.at_the_origin` left nothing)
        console.print("Nothing to try: no remedy reaches where the NaN/Inf was made (below); an lr, a clipper or an "
                      "optimizer changes nothing before the first update.", markup=False)
    elif not tried:
        console.print(_nothing_tried(result.baseline), markup=False)
    elif winner is None:
        ran = [t for t in result.trials if math.isfinite(t.final_loss)]  # (not stopped on a NaN)
        if result.baseline.failed and all(t.failed for t in ran):
            best = min(ran, key=lambda t: t.final_loss, default=None)
            console.print("Every trial failed as the baseline did: fix the script's error first"
                          + (f" (before it, {best.candidate.name} reached {best.final_loss:.4g}, the baseline "
                             f"{result.baseline.final_loss:.4g})" if best is not None else "") + ".", markup=False)
        else:
            close, above = result.within_noise, result.above
            console.print("No remedy beat the baseline." + (" The baseline has no harmful finding."
                                                              if not result.baseline.harmful else "")
                          + (f" The best, {above.candidate.name}, left fewer harmful findings but ended at "
                             f"{above.final_loss:.4g}, no lower than the baseline's {result.baseline.final_loss:.4g}"
                             + (f" beyond the noise of the two (standard errors {above.final_error:.2g} and "
                                f"{result.baseline.final_error:.2g})" if above.final_loss < result.baseline.final_loss else "")
                             + ": the symptom went, the training learned no better." if above is not None else "")
                          + (f" The best, {close.candidate.name}, ended at {close.final_loss:.4g} against "
                             f"{result.baseline.final_loss:.4g}: within the noise of the two losses "
                             f"(standard errors {close.final_error:.2g} and {result.baseline.final_error:.2g})."
                             if close is not None else ""), markup=False)
    else:
        fell = None if winner.own_loss else _fall(winner)  # (a GAN's mixed loss sits at its equilibrium)
        learnt = fell is None or fell >= DEFAULT.plateau_improvement  # (flat as diagnose's plateau: < 1%)
        verdict = "repairs the run" if result.repaired and learnt else "is the best of the trials"
        barely = ""
        if not learnt:  # (then fell is measured)
            moved = f"fell only {fell:.1%}" if fell >= 0 else f"rose {-fell:.1%}"
            left = "" if winner.harmful else "no harmful finding is left, but "  # (loss_did_not_fall may be one)
            barely = f" ({left}its loss {moved} ({winner.first_loss:.4g} -> {winner.final_loss:.4g}): little was learnt in the trial)"
        console.print(f"[bold]{winner.candidate.name}[/] {verdict}{barely}. The change to make:", markup=True)
        console.print(textwrap.indent(result.change, "    "), markup=False, soft_wrap=True)
    if (note := nan_note(result)) is not None:
        console.print(note, markup=False)  # the line of code may hold [brackets]
    if (note := frozen_note(result.baseline)) is not None:
        console.print(note, markup=False)
    if (note := scale_note(result)) is not None:
        console.print(note, markup=False)
    for note, code in code_notes(result.baseline, bool(tried)):
        console.print(note, markup=False)
        console.print(textwrap.indent(code, "    "), markup=False, soft_wrap=True)
    if result.written:
        console.print(f"Note: your script wrote or deleted {_some(result.written)} during the trials. Your directory was "
                      "put back as it was after each one, so no trial started from another's files; the files "
                      f"a trial created are kept in its directory under {WRITTEN}/.", markup=False)
    if result.edited:
        console.print(f"Note: {_some(result.edited)} changed or appeared during the fix (your edits, or another "
                      "program's files: not the trials') and were left as they are; where the script imports them, the "
                      "trials after the change ran the new version.",
                      markup=False)
    if result.overwritten:
        console.print(f"Note: {_some(result.overwritten)} now hold a trial's output, not yours: your directory "
                      "held too much to copy aside first.", markup=False)


def print_interrupted(result: FixResult, console: Console) -> None:
    """What an interrupted fix had measured: the baseline's harmful findings and loss, the trials that
    finished, best first, and the best so far, named as such (a remedy screened for a quarter of the
    budget, or without the finals, is a lead, not a verdict)."""
    base = result.baseline
    console.print(f"gradwatch fix: interrupted. The baseline ({base.steps} steps) left "
                  f"{', '.join(base.harmful) or 'no harmful finding'}, loss {base.final_loss:.4g}.", markup=False)
    ran = {id(t): t for t in [*result.trials, *result.screened]}  # a final screened in full is listed once
    done = sorted([t for t in ran.values() if not t.not_applied], key=lambda t: t.score)
    if not done:
        console.print("No remedy trial finished.", markup=False)
        return
    for t in done:
        kind = "screened" if t in result.screened else "full"
        console.print(f"  {t.candidate.name} ({kind}, {t.steps} steps): {_left(t)} left, loss {t.final_loss:.4g}",
                      markup=False)
    best = done[0]
    if best.score < base.score:
        console.print(f"The best so far, {best.candidate.name}, is a lead, not a verdict: the trials that would "
                      "have checked it did not run. Its code:", markup=False)
        console.print(textwrap.indent(result.names.complete(best.candidate.code), "    "), markup=False, soft_wrap=True)


def _at_init(result: FixResult) -> bool:
    """The baseline's located NaN/Inf came at the first step, before any update."""
    from gradwatch.fix import nan_to_locate

    fault = nan_to_locate(result.baseline)
    return fault is not None and bool(fault.evidence.get("at_init"))


def _nothing_tried(base: Trial) -> str:
    """Why no remedy was tried; for a healthy baseline, what it was checked for, so "nothing to fix"
    is a measured answer, not a silence. A baseline that crashed is not healthy: its error comes first.
    One the budget stopped says so: a script that pretrains one model, then fine-tunes another, was
    "nothing to fix" at a budget that ended in the pretraining."""
    from gradwatch.fix.candidates import tried_for
    from gradwatch.fix.trial import OUTPUT_LOG

    if base.failed:
        return (f"No remedy was tried: your script fails on its own, with exit code {base.exit_code} after "
                f"{base.steps} steps ({_error(base)}; see {base.run_dir / OUTPUT_LOG}), and its steps before that "
                "called for no remedy. Fix that error first, then run fix again.")
    if not base.findings and not base.harmful:
        fell = (f"; its loss fell from {base.first_loss:.4g} to {base.final_loss:.4g}"
                if math.isfinite(base.first_loss) and math.isfinite(base.final_loss) else "")
        cut = (f" The budget stopped your script there: what it does after step {base.steps} (a later phase, another "
               "model) was not looked at; a larger --budget-steps looks further." if base.cut else "")
        return (f"Nothing to fix: {base.steps} steps of your script showed no vanishing or exploding gradient, no "
                f"NaN/Inf, no dead or saturated units, no stalled layer, no loss plateau or divergence{fell}. No remedy was tried."
                + cut)
    kinds = sorted({f.kind + " (info: no block to training)" * (f.severity == "info") for f in base.counted})
    if not kinds and not base.harmful:  # every finding is in layers no optimizer trains: frozen_note says which
        return "Nothing to try: the baseline's findings are all in layers no optimizer trains. No remedy was tried."
    untried = {f.kind for f in base.blocking if not tried_for(f)}
    if base.blocking and len(untried) == len({f.kind for f in base.blocking}) and set(base.harmful) <= untried:
        return "No remedy was tried: what the baseline shows is a change to the code (below), not one a trial can make."
    return f"Nothing to try: the baseline's findings call for no remedy ({', '.join(kinds or base.harmful)})."


def code_notes(base: Trial, tried: bool) -> list[tuple[str, str]]:
    """The baseline's findings that call for a change to the code no trial can make (a missing
    `optimizer.zero_grad()`), each as (the finding's words, its code); when remedies were tried,
    the words say that every trial ran with the fault too, so the change comes first."""
    from gradwatch.fix.candidates import tried_for

    also = (" Every trial above ran with it too: make this change first, then run fix again." if tried else
            " Make this change, then run fix again to see what is left.")
    return [(f"{f.kind} (step {f.first_step}) is a change to your code, which no trial can make: {f.message}{also}",
             f.remedies[0].code if f.remedies else "")
            for f in base.blocking if not tried_for(f)]


def _fall(trial: Trial) -> float | None:
    """How much of its first loss the trial's loss lost by its end (None: not measured). An RNN's
    orthogonal W_hh took its vanishing away and ended at 0.6887 from 0.6935, chance being 0.693, and
    was said to repair the run."""
    first, last = trial.first_loss, trial.final_loss
    if not (math.isfinite(first) and math.isfinite(last)) or first == 0:
        return None
    return (first - last) / abs(first)


def scale_note(result: FixResult) -> str | None:
    """The baseline's first cause was the loss's scale (a regression on raw targets), and the best
    trial still ends on that scale: no trial changes the loss or the targets, so the change that
    does is said (a tester's multi-task model, its regression target ~313: Adam ended at 3.9e4, its
    printed change left the fault, pasted in it predicted worse than the mean)."""
    from gradwatch.diagnose.advice import LARGE_INITIAL_LOSS, LOSS_TO_ORDER_1

    cause = next((f.causes[0] for f in result.baseline.blocking if f.causes and f.causes[0].startswith("loss scale:")), None)
    best = result.winner or (result.ranked[0] if result.ranked else None)
    if cause is None or best is None or not abs(best.final_loss) >= LARGE_INITIAL_LOSS:
        return None
    said = cause.split(":", 1)[1].split(" (")[0].strip()  # "the loss is 4.85e+04 at the first step, before any update"
    return (f"The best trial still ends at {best.final_loss:.4g}. The baseline's first cause was the loss's scale "
            f"({said}): a constant factor, a sum over a large batch or targets far from unit scale, in the loss or "
            f"the data, which no trial changes. {LOSS_TO_ORDER_1.action}, then run fix again:\n"
            f"{textwrap.indent(LOSS_TO_ORDER_1.code, '    ')}")


def frozen_note(base: Trial) -> str | None:
    """The baseline's findings in layers no optimizer trains (a frozen body): kept out of the
    ranking, since no change to the training can touch them, but said, since they are there."""
    found = base.frozen_only
    if not found:
        return None
    said = "; ".join(f"{f.kind} in {', '.join(f.layers)}" for f in found)
    one = len({layer for f in found for layer in f.layers}) == 1
    return (f"Not counted: {said}. No optimizer trains {'that layer' if one else 'those layers'}"
            " (frozen: in no optimizer, requires_grad=False or at lr 0), so no change to the training can touch "
            "them and no trial is ranked by them; `gradwatch diagnose` on the baseline's run says more.")


def _error(trial: Trial) -> str:
    return trial.error_line() or "no output"


def _some(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _versus(base: float, loss: float) -> str:
    """The change from the baseline's loss: a percentage, or a factor once it is below 1% of it
    (117 -> 0.197 is x0.0017, not -100%)."""
    if math.isfinite(loss) and not math.isfinite(base):
        return "finite (was not)"
    if not (math.isfinite(base) and math.isfinite(loss)) or base == 0:
        return ""
    if base > 0 and 0 <= loss < 0.01 * base:
        return f"x{loss / base:.2g}"
    change = (loss - base) / abs(base)
    return f"{change:+.1%}" if abs(change) < 0.1 else f"{change:+.0%}"


def _left(trial: Trial) -> str:
    from gradwatch.fix.trial import OUTPUT_LOG

    if trial.not_applied:
        return f"not tried: {trial.not_applied}"
    if trial.failed:  # what it showed before it failed too: a script that exits 2 at its end trained all along
        failure = f"the script failed (exit {trial.exit_code}, step {trial.steps}): see {trial.run_dir / OUTPUT_LOG}"
        return ", ".join([*(trial.harmful if trial.steps else []), failure])
    if trial.steps == 0:  # ran to its end, but no step was stored (the watch could not start: its log says why)
        return f"no step recorded: see {trial.run_dir / OUTPUT_LOG}"
    return ", ".join(trial.harmful) or "none"


def nan_note(result: FixResult) -> str | None:
    """Where the baseline's NaN/Inf was made, when measured gradient growth does not explain it. No
    training remedy repairs a NaN from the data or the arithmetic, so a winner may only have put it
    off; one that came too soon to measure the growth may also be the learning rate's, so neither
    is claimed for it."""
    from gradwatch.diagnose.advice import nan_cause
    from gradwatch.fix import nan_to_locate
    from gradwatch.fix.inject import own_class
    from gradwatch.fix.locate import GUARDED

    if (f := nan_to_locate(result.baseline)) is None:
        return None
    known = nan_cause(f.evidence) == "data"
    if result.repaired:
        if result.origin is None:
            return None
        spec = result.winner.candidate.spec
        if spec.get("inputs"):  # (`from_origin`)
            return (f"Note: the baseline's NaN/Inf came with the data: {result.origin.describe()}. The winner sets it "
                    "to 0 where that line takes it; mending or dropping those samples is better still.")
        if own := own_class(spec):
            return (f"Note: the baseline's NaN/Inf was made here: {result.origin.describe()}. The winner replaces the "
                    f"{own} module that made it.")
        said = ("came from the data or the arithmetic, not from training" if known else
                "came too soon to tell whether growing gradients led to it; it was made here")
        # (a guard for what has one, a log or a division; a matmul's overflow is values grown too large,
        # the scale the winner keeps in range: "guard aten.addmm" was no advice a user could act on)
        guard = "; guard that operation too." if result.origin.kind in GUARDED else "."
        return (f"Note: the baseline's NaN/Inf {said}: {result.origin.describe()}. The winner may only put it off "
                f"past {result.budget_steps} steps" + ("" if known else " if it is the data or the arithmetic")
                + guard)
    where = (f"{result.origin.describe()}." if result.origin else
             "look for it in the data or the loss function (a NaN in a batch, log or sqrt of a negative, a division "
             "by zero).")
    growth = f.evidence.get("grad_growth_before", math.nan)
    before = (" before any update" if f.evidence.get("at_init") else
              f" with no gradient growth before it (x{growth:.2g} over the previous steps)" if known else
              ", too soon to tell whether growing gradients led to it (too few finite steps before it)")
    verdict = (" No training remedy repairs that." if known else
               " No remedy tried repaired it; if it is the data or the arithmetic, none will.")
    return (f"The NaN/Inf first appears at step {f.first_step} in the {f.evidence.get('first_seen_in', 'run')}"
            f"{before}: {where}{verdict}"
            + ("" if f.first_step == 0 else f" Meanwhile `guard = gw.guard({result.names.optimizer})` skips such steps, "
               "so one bad batch cannot ruin the weights."))
