"""diagnose: pure functions from a run's series to `Finding`s (what is wrong, where, since when,
why, and what to change). No torch needed: rules read a `RunSeries`."""

from __future__ import annotations

import bisect
import os
from dataclasses import fields, replace

import numpy as np

from gradwatch.diagnose.advice import continued
from gradwatch.diagnose.finding import KINDS, SEVERITIES, Finding, Remedy
from gradwatch.diagnose.rules import RULES
from gradwatch.diagnose.rules.late_clipping import find_late_clipping
from gradwatch.diagnose.rules.repeated_backward import find_repeated_backward
from gradwatch.diagnose.rules.loss_broadcast import find_loss_broadcast
from gradwatch.diagnose.rules.loss import find_loss_divergence, find_loss_plateau
from gradwatch.diagnose.rules.non_finite import find_non_finite, find_scaler_stuck
from gradwatch.diagnose.rules.stale_gradients import find_stale_gradients
from gradwatch.diagnose.rules.clipping import safety_limit
from gradwatch.diagnose.signals import norms_kept
from gradwatch.diagnose.thresholds import DEFAULT, Thresholds
from gradwatch.errors import ConfigError
from gradwatch.store import RunSeries, read_run

SEVERITY_ORDER = {s: i for i, s in enumerate(reversed(SEVERITIES))}  # the most severe first
LOSS_KINDS = ("loss_plateau", "loss_divergence")
# findings that explain a loss plateau: the gradient does not reach the layers
BLOCKING = ("vanishing_gradient", "dead_units", "saturation")
NOT_REACHING = "the gradient does not reach the layers that should learn"
STALE_WHY = "each update is the sum of all the past steps' gradients, not this batch's"


def diagnose(run: RunSeries | str | os.PathLike, thresholds: Thresholds | dict = DEFAULT) -> list[Finding]:
    """Findings of a run (a `RunSeries`, a run directory or a store file), earliest first.

    A run that trained one model after another (meta "phase_starts") is diagnosed phase by phase:
    the jump from one model's loss to the next is no divergence. Then one cause is one finding
    (`_one_per_cause`), a NaN follows the explosion before it, and a plateau the block that
    explains it.
    """
    if isinstance(thresholds, dict):  # gw.diagnose(run, thresholds={"vanishing_ratio": 1e-3})
        unknown = sorted(set(thresholds) - {f.name for f in fields(Thresholds)})
        if unknown:
            raise ConfigError(f"thresholds: no threshold named {', '.join(map(repr, unknown))} (see gw.Thresholds)")
        thresholds = Thresholds(**thresholds)
    if not isinstance(thresholds, Thresholds):
        raise ConfigError(f"thresholds={thresholds!r}: pass gw.Thresholds(name=value, ...) or a dict of them")
    if not isinstance(run, (RunSeries, str, os.PathLike)):
        raise ConfigError(f"run={run!r}: pass a run directory (e.g. 'runs/latest'), a store file or a RunSeries")
    series = run if isinstance(run, RunSeries) else read_run(run, compact=True)
    if len(series.steps) == 0:  # (a GradScaler may have skipped every iteration)
        return find_scaler_stuck(series, thresholds)
    starts = [int(s) for s in series.meta.get("phase_starts") or [] if s > series.steps[0]]
    phases = [series.between(a, b) for a, b in zip([int(series.steps[0]), *starts], [*starts, None])] \
        if starts else [series]
    parts = [(phase, _models_of(phase)) for phase in phases if len(phase.steps)]
    with norms_kept([p for phase, models in parts for p in (phase, *models)]):
        findings = [f for phase, models in parts for f in _findings(phase, models, thresholds)]
    if series.meta.get("own_loss_steps"):  # the recorded loss mixes two objectives (a GAN's G and D):
        findings = [f for f in findings if f.kind not in LOSS_KINDS]  # its plateau or rise says nothing
    findings = _one_per_cause(series, findings)
    findings = _nan_after_explosion(findings)
    findings = _per_phase(findings, starts, lambda found: _after_stale(_plateau_from_block(found)))
    findings = _after_broadcast(findings)
    if series.meta.get("input_derivatives"):
        findings = [_per_sample_norms(f) for f in findings]
    return sorted(findings, key=lambda f: (f.first_step, SEVERITY_ORDER[f.severity], KINDS.index(f.kind)))


def _after_broadcast(findings: list[Finding]) -> list[Finding]:
    """A loss whose target broadcasts into a grid (`loss_broadcast`) explains a gradient that
    vanishes, a layer that stalls and a loss that stays where it is: the model learns to predict the
    targets' mean. Its cause and fix come first there (a tester's 1D CNN was told its initialisation
    was the cause, and re-initialised, stayed at the targets' variance)."""
    grid = next((f for f in findings if f.kind == "loss_broadcast" and f.severity == "error"), None)
    if grid is None:
        return findings
    cause, fix = grid.causes[0], grid.remedies[0]
    return [replace(f, message=f"{f.message} It follows from the loss's shape: {fix.action}.",
                    causes=(cause, *f.causes), remedies=(fix, *f.remedies))
            if f.kind in ("vanishing_gradient", "stalled_layers", "loss_plateau", "dead_units", "saturation") else f
            for f in findings]


def _per_sample_norms(finding: Finding) -> Finding:
    """A loss that differentiates the model by its input (a PINN's u'') is normalised per sample
    (LayerNorm): BatchNorm mixes a batch's samples, and each sample's derivative would read the
    others' (fix's trials insert LayerNorm there too)."""
    batch, layer = "insert_norm(model, 'batch')", "insert_norm(model, 'layer')  # (per sample: not BatchNorm)"
    if not any(batch in r.code for r in finding.remedies):
        return finding
    return replace(finding, remedies=tuple(replace(r, code=r.code.replace(batch, layer)) for r in finding.remedies))


# rules of the whole run (its loss, a NaN anywhere, the script's order of calls), not of a model's depth
RUN_RULES = (find_stale_gradients, find_late_clipping, find_repeated_backward, find_loss_broadcast, find_non_finite, find_loss_divergence, find_loss_plateau)


def _models_of(run: RunSeries) -> list[RunSeries]:
    """Models trained on losses of their own (a GAN's generator and discriminator, meta
    `own_loss_steps`), each diagnosed as a depth of its own; else the run. A generator found after
    its discriminator stood behind it in one depth profile, the discriminator's first layer as the
    lowest: a generator's gradient vanishing 1e-9 toward its input was no finding. Models trained
    by one loss (an encoder and a decoder called apart) are one chain, and stay together. The
    first model's layers have plain names, the others' are prefixed with `name.`."""
    prefixes = [p for p in run.meta.get("models") or [] if p]
    if not run.meta.get("own_loss_steps") or not prefixes:
        return [run]
    owner = [next((p for p in prefixes if l.name.startswith(p + ".")), "") for l in run.layers]
    parts = [run.of_layers([c for c, o in enumerate(owner) if o == p]) for p in ["", *prefixes]]
    return [part for part in parts if part.layers] or [run]


def _findings(phase: RunSeries, models: list[RunSeries], thresholds: Thresholds) -> list[Finding]:
    """A phase's findings: every rule on the phase, as one depth in the order the layers first ran,
    and the depth rules on each model too, adding what a model alone shows. The generator's loss
    flows back through the discriminator, so the whole is its chain when the generator ran first
    (a tester's DCGAN: its vanishing stood against the discriminator's layers above it, and a
    model alone missed it); when the discriminator ran first (WGAN's critic steps), the generator's
    own depth is what shows it (1e-9 toward its input, no finding in the whole)."""
    found = [f for rule in RULES for f in rule(phase, thresholds)]
    if len(models) == 1 and models[0] is phase:  # (not ==: a RunSeries compares its arrays)
        return found
    said = {(f.kind, f.layers[:1]) for f in found}
    for rule in RULES:
        if rule in RUN_RULES:
            continue
        for part in models:
            for f in rule(part, thresholds):
                if (f.kind, f.layers[:1]) not in said:
                    said.add((f.kind, f.layers[:1]))
                    found.append(f)
    return found


def _one_per_cause(series: RunSeries, findings: list[Finding]) -> list[Finding]:
    """The findings another one explains, left out: what the user must fix is said once."""
    if any(f.kind == "saturation" for f in findings):  # tanh'(x) is exactly 0 in float32 for |x| > 9:
        findings = [f for f in findings  # zero gradients below saturated units are the saturation's
                    if not (f.kind == "dead_units" and "dead_fraction" not in f.evidence)]
    # a gradient exactly 0 is no geometric decay but a block (dead ReLUs called as functions, a
    # custom autograd.Function's backward returning zeros): the dead_units finding says it, once
    zeroed = {l for f in findings if f.kind == "dead_units" for l in f.evidence.get("zero_gradient_layers", ())}
    findings = [f for f in findings if not (f.kind == "vanishing_gradient" and f.evidence.get("backward_ratio") == 0
                                            and f.layers[0] in zeroed)]
    # no weight changes: the loss's plateau is that, and its remedy (a tenfold lr) moves no weight a
    # step never changes (a tester's zero_grad() between backward() and step() was told to raise it)
    if any(f.kind == "stalled_layers" and f.evidence.get("all_weights") for f in findings):
        findings = [f for f in findings if f.kind != "loss_plateau"]
    if any(f.kind == "exploding_gradient" and "init_backward_ratio" in f.evidence for f in findings):
        findings = [f for f in findings if not _dead_from_growth(f)]
    vanished = {l for f in findings if f.kind == "vanishing_gradient" for l in f.layers} | zeroed
    return [f for f in findings  # lower layers stalled where the gradient vanishes (or is 0): one cause
            if not (f.kind == "stalled_layers" and not f.evidence.get("frozen") and not f.evidence.get("no_gradient")
                    and (set(f.layers) & vanished or _below_blocked_units(series, f, findings)))]


def _dead_from_growth(f: Finding) -> bool:
    """ReLUs dead for the whole batch at the first step of a net whose backward signal already grows
    ≥ 1e3x toward the input: the growth adds a component common to every sample (a residual sum of
    ReLU outputs drifts positive), so each unit is on or off for all of them. A 40-block He-init
    residual MLP had 50-58% dead in 18 blocks at step 0 and was told to re-initialise with He init,
    which it had; BatchNorm, the explosion's first remedy, repaired both. Zero weights stay said."""
    return f.kind == "dead_units" and bool(f.evidence.get("at_init")) and "dead_fraction" in f.evidence \
        and "zero_weight_layers" not in f.evidence


def _per_phase(findings: list[Finding], starts: list[int], pair) -> list[Finding]:
    """`pair` (a finding explained by another) within each phase apart: one model's stale
    gradients say nothing of the next model's plateau or dead units."""
    groups: dict[int, list[Finding]] = {}
    for f in findings:
        groups.setdefault(bisect.bisect_right(starts, f.first_step), []).append(f)
    return [f for k in sorted(groups) for f in pair(groups[k])]


def _plateau_from_block(findings: list[Finding]) -> list[Finding]:
    """A loss plateau beside a finding that explains it follows from it: the plateau says so and
    advises that finding's fix, not a tenfold lr. Stale gradients (a forgotten zero_grad())
    explain a plateau and a divergence alike; a block of the gradient (BLOCKING, then an error)
    and clipping active on nearly every step (the limit, not the lr, sets the step) a plateau. A
    plateau on adaptive steps too long for the weights (Adam at lr 0.3 killed the ReLUs) does not
    follow from the block: the lr caused both."""
    stale = next((f for f in findings if f.kind == "stale_gradients"), None)
    blocking = next((f for f in findings if f.kind in BLOCKING), None)
    clipped = next((f for f in findings if f.kind == "exploding_gradient" and "clip_active_share" in f.evidence), None)
    cause = stale or blocking or clipped
    if cause is None:
        return findings
    why, fix = STALE_WHY if cause is stale else NOT_REACHING, None
    if cause is clipped:
        why, fix = _clipped_plateau(cause)
    follows = {id(f) for f in findings  # not one at its floor, on steps too long, or fallen and risen back (the block follows)
               if f.kind == "loss_plateau" and f.severity != "info" and not {"first_update_ratio", "loss_low"} & set(f.evidence)
               and not (cause is blocking and _began_after(cause, f))
               or f.kind == "loss_divergence" and cause is stale}
    if not follows:
        return findings
    # the loss does not move and this is why: no longer a warning (a recurrent net's short
    # memory, some dead units) but what stops the training
    return [_follows_from(f, cause, why, fix) if id(f) in follows else
            replace(f, severity="error") if f is blocking and cause is blocking else f for f in findings]


def _began_after(block: Finding, plateau: Finding) -> bool:
    """The block began after the loss's first two windows: the loss was flat before it, so it does
    not explain the plateau (a tester's contrastive model, flat from step 0, was told its plateau
    followed from units that died at step 230 of 300)."""
    w = plateau.evidence.get("window_steps")
    return isinstance(w, (int, float)) and block.first_step > plateau.first_step + 2 * w


def _clipped_plateau(clipped: Finding) -> tuple[str, Remedy | None]:
    """A flat loss under clipping on nearly every step. Each step is lr x the limit. Where the loss's
    scale (the finding's first cause) or a norm that grew under the clipping (steps too long for the
    curvature) explains it, the finding's own fix does. Otherwise the step is too short to move the
    loss, and the fix lengthens it: the limit at twice the typical norm, the lr kept (SGD lr 1e-3
    clipped at 0.01: 69.3 as it was, and with the exploding finding's fix, which keeps the step's
    length; 1.93 with the limit raised to 39)."""
    ev = clipped.evidence
    share = f"clipping on {ev['clip_active_share']:.0%} of the steps"
    if (clipped.causes and clipped.causes[0].startswith("loss scale:")) or ev.get("clip_norm_growth", 1.0) >= 10:
        return f"{share}: {clipped.causes[0] if clipped.causes else 'see that finding'}", None
    limit = safety_limit(ev)
    why = (f"{share} cuts each one to lr x the limit {ev['clip_limit']:.3g}, {1 / ev['clip_kept']:.3g}x shorter "
           "than lr·g: too short to move the loss")
    return why, Remedy(f"Raise the clipping limit to twice the typical norm ({limit}) at the same learning rate, "
                       "so clipping catches spikes only",
                       f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={limit})  # before optimizer.step()")


def _after_stale(findings: list[Finding]) -> list[Finding]:
    """Units that died, saturated or overflowed after stale gradients began were pushed there by
    updates that sum every past gradient (a ReLU net under a forgotten zero_grad() lost 92% of a
    layer's units, told only of the learning rate): the stale gradients come first among their
    causes, and their fix first. (The exploding finding names them itself: `stale_first`.)"""
    stale = next((f for f in findings if f.kind == "stale_gradients"), None)
    if stale is None or not stale.remedies:
        return findings
    fix = stale.remedies[0]
    return [replace(f, message=f"{f.message} It follows the stale gradients found: {fix.action}.",
                    causes=(f"stale_gradients: {STALE_WHY}", *f.causes), remedies=(fix, *f.remedies))
            if f.kind in ("dead_units", "saturation", "non_finite") and f.first_step > stale.first_step
            and not f.evidence.get("at_init") else f
            for f in findings]


def _below_blocked_units(series: RunSeries, stalled: Finding, findings: list[Finding]) -> bool:
    """Stalled layers below a layer of dead ReLUs or of saturated sigmoid/tanh units: a dead unit
    passes no gradient down, a saturated one less than 1% of it (tanh' is exactly 0 in float32
    for |x| > 9), so the layers under it stall for that one reason (a faster optimizer would not
    move them)."""
    blocked = [series.column(l) for f in findings if f.kind in ("dead_units", "saturation") for l in f.layers]
    return bool(blocked) and all(series.column(l) < max(blocked) for l in stalled.layers)


def _nan_after_explosion(findings: list[Finding]) -> list[Finding]:
    """A NaN too early to measure the gradient's growth before it (fewer than two finite steps:
    a vanilla RNN whose first update was 83x its weights) was blamed on the data. When an
    exploding_gradient finding came before it, that finding's numbers are the growth: it comes
    first among the causes, and its first remedy first."""
    burst = next((f for f in findings if f.kind == "exploding_gradient"), None)
    if burst is None:
        return findings
    out = []
    for f in findings:
        if f.kind == "non_finite" and burst.first_step < f.first_step \
                and not np.isfinite(f.evidence.get("grad_growth_before", 0.0)):
            said = burst.message.split(". ")[0]
            f = replace(f, message=f"{f.message.rsplit('. ', 1)[0]}. It follows the exploding gradient found: "
                                   f"{_first_remedy(burst)}.",
                        causes=(f"exploding_gradient: {continued(said)}, before any NaN", *f.causes),
                        remedies=(*burst.remedies[:1], *f.remedies))
        out.append(f)
    return out


def _follows_from(loss: Finding, cause: Finding, why: str = NOT_REACHING, fix: Remedy | None = None) -> Finding:
    """A loss that does not move (or rises) because of `cause`: raising (or lowering) the learning
    rate does not help (a vanishing or zero gradient times ten is still one), fixing the cause
    does (`fix`, else the cause's first remedy)."""
    ev = loss.evidence
    end = ev.get("loss_end", ev.get("loss_max"))
    said = "has not improved" if loss.kind == "loss_plateau" else "rises"
    first = [fix] if fix is not None else list(cause.remedies[:1])
    action = fix.action if fix is not None else _first_remedy(cause)
    return replace(loss, message=f"The loss {said} ({ev['loss_start']:.4g} -> {end:.4g}): it "
                                 f"follows from the {cause.kind.replace('_', ' ')} found. {action}.",
                   causes=(f"{cause.kind}: {why}", *loss.causes),
                   remedies=(*first, *(r for r in loss.remedies
                                       if not r.action.startswith(("Raise the learning rate", "Lower the learning rate")))))


def _first_remedy(cause: Finding) -> str:
    """What a finding that follows from `cause` tells to do first: the cause's own first remedy."""
    return cause.remedies[0].action if cause.remedies else "fix that first"


__all__ = ["diagnose", "Finding", "Remedy", "Thresholds", "KINDS"]
