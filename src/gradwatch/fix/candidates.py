"""Candidate remedies for a run's findings, each a JSON-able spec the trial process applies
through hooks, plus the code the user should write if it wins, in the script's own names
(`names.Names`: `opt`, `self.model`; generic ones where the script does not say)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from gradwatch.collect.layers import ACTIVATIONS
from gradwatch.diagnose.advice import ADAPTIVE, forget_bias_code
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.signals import FUNCTIONS
from gradwatch.fix.names import CYCLIC_LRS, Names
from gradwatch.store.series import RunSeries

if TYPE_CHECKING:
    from gradwatch.fix.locate import Origin

# Kinds a repair must remove. Plateau and divergence are judged through the final loss instead.
HARMFUL = ("vanishing_gradient", "exploding_gradient", "non_finite", "dead_units", "saturation", "stale_gradients")
BLOW_UP = ("exploding_gradient", "non_finite", "loss_divergence")
GENERIC = Names()


# When each part of a remedy's code runs, in the order a combination prints them: the model changes
# in the order the trial makes them (inject.py `apply_to_model`: a swap, a norm, an init, a recurrent
# change), then the optimizer swap (built on the changed model), then what acts on the optimizer that
# steps (a clipper attached, an lr scaled or capped): above the swap, it acted on the discarded one.
SWAP, NORM, INIT, RECURRENT, OPTIMIZER, ON_OPTIMIZER = range(6)


@dataclass(frozen=True)
class Part:
    """One piece of a remedy's code and its stage. `after_optimizer`: for a change that adds
    parameters, the same change made once the optimizer is built, which gives them to it."""

    stage: int
    code: str
    after_optimizer: str = ""


@dataclass(frozen=True)
class Candidate:
    name: str
    spec: dict = field(default_factory=dict)
    code: str = ""
    parts: tuple[Part, ...] = ()


def _made(name: str, spec: dict, *parts: Part) -> Candidate:
    return Candidate(name, spec, _render(parts), parts)


def _render(parts: tuple[Part, ...]) -> str:
    """The parts in stage order. A combination with no optimizer swap is one block pasted once the
    optimizer is built (where its clipper or lr goes): a change that adds parameters then gives them
    to the optimizer, or none trained them (the trial did). Alone, such a change stays before the
    optimizer is built; beside an optimizer swap too, the new optimizer taking the changed model's."""
    pasted = len(parts) > 1 and all(p.stage != OPTIMIZER for p in parts)
    ordered = sorted(parts, key=lambda p: p.stage)  # (stable: a remedy's own parts keep their order)
    return "\n".join(p.after_optimizer if pasted and p.after_optimizer else p.code for p in ordered)


def each(names: Names, code: Callable[[Names], str]) -> str:
    """`code` for every optimizer the script builds: a trial applies an optimizer remedy to each
    one that steps (a GAN's two), so the change to make does too."""
    return "\n".join(code(n) for n in names.each_optimizer())


def clip_norm(max_norm: float = 1.0, names: Names = GENERIC) -> Candidate:
    return _made(f"clip norm {max_norm:g}", {"clip": "norm", "max_norm": max_norm}, Part(ON_OPTIMIZER, _clip_code(
        names, f"gw.clip.ClipNorm({max_norm:g})",
        lambda m: f"torch.nn.utils.clip_grad_norm_({m}.parameters(), max_norm={max_norm:g})")))


def clip_value(value: float = 1.0, names: Names = GENERIC) -> Candidate:
    return _made(f"clip value {value:g}", {"clip": "value", "value": value}, Part(ON_OPTIMIZER, _clip_code(
        names, f"gw.clip.ClipValue({value:g})",
        lambda m: f"torch.nn.utils.clip_grad_value_({m}.parameters(), clip_value={value:g})")))


def zclip(names: Names = GENERIC) -> Candidate:
    """ZClip keeps statistics of the norms it has seen, so it is built once."""
    if names.manual:
        code = (f"zclip = gw.clip.ZClip()  # once, before training\n"
                f"zclip({names.model}.parameters())  # every step, {names.before_update}")
    else:
        code = _clip_code(names, "gw.clip.ZClip()", lambda m: "")
    return _made("ZClip", {"clip": "zclip"}, Part(ON_OPTIMIZER, code))


def _clip_code(names: Names, clipper: str, by_hand: Callable[[str], str]) -> str:
    """Clipping as the trial clips: attached to each optimizer (inject.py `_attach_clipper`), which
    clips inside a `step(closure)` the gradients the closure computed and unscales a fused
    optimizer's under a GradScaler; a call written before `step()` did neither. With no optimizer
    (the script updates by hand), `by_hand(model)` after the backward."""
    if names.manual:
        return f"{by_hand(names.model)}  # {names.before_update}"
    return each(names, lambda n: f"gw.clip.attach({n.optimizer}, {clipper})  # once, after {n.optimizer} is built: "
                                 f"clips before every {n.optimizer}.step()")


def reinit(names: Names = GENERIC) -> Candidate:
    """The trial re-initialises with the model's first batch: it shows the activations called as
    functions and the order they run in, which the module list does not."""
    return _made("re-initialise per activation", {"init": "auto"},
                 Part(INIT, f"gw.init_({names.changed}, example_input=batch)"))


def adam(names: Names = GENERIC, unscheduled: bool = False) -> Candidate:
    """Adam at 1e-3 in place of the script's optimizer, under the script's schedule; `unscheduled`:
    at a constant 1e-3, where the baseline blames the schedule (`lr_ceiling`: it raised the lr until
    the run blew up). Adam at 1e-3 times a ramp's 100x blows up as SGD did (two lr-ramp scenarios:
    77 and an exploding gradient where a constant 1e-3 reaches the healthy loss)."""
    scheduled = not unscheduled and (names.run is None or names.run.scheduled)  # unknown: say it
    code = each(names, lambda n: f"{n.optimizer} = torch.optim.Adam({n.model}.parameters(), lr=1e-3)  # in place of "
                                 f"your {n.optimizer if names.optimizers else 'optimizer'}" + (
                                     f"; a checkpoint holding the old optimizer's state does not load into Adam "
                                     f"(a KeyError in {n.optimizer}.load_state_dict, or Adam at the old one's "
                                     "settings): resume from one saved with Adam"
                                     if n.optimizer in names.loaded else "") + (
                                     ", with no lr scheduler built on it (no scheduler.step()) and no line setting its "
                                     "param_groups' 'lr': your schedule raised the lr until the run blew up"
                                     if unscheduled else ""))
    if unscheduled:
        return _made("Adam (lr 1e-3, no schedule)", {"optimizer": "Adam", "lr": 1e-3, "unscheduled": True},
                     Part(OPTIMIZER, code))
    rebuilt = names.schedule_from(1e-3) if scheduled else None
    if rebuilt is not None:  # the script's OneCycleLR/CyclicLR, at the lrs the trial's Adam ran at
        return _made("Adam (lr 1e-3)", {"optimizer": "Adam", "lr": 1e-3}, Part(OPTIMIZER, f"{code}\n{rebuilt}  # "
                     f"{names.replaced_schedule}: the lrs the trial's Adam ran at"))
    return _made("Adam (lr 1e-3)", {"optimizer": "Adam", "lr": 1e-3}, Part(OPTIMIZER, code + (
        ", before a scheduler is built on it (OneCycleLR: max_lr=1e-3; CyclicLR: base_lr=1e-3)" if scheduled else "")))


def zero_grad(names: Names = GENERIC) -> Candidate:
    """Against stale gradients (a forgotten `optimizer.zero_grad()`): after each step the trial
    clears every optimizer's gradients before the next backward (inject.py `_clear_all_later`)."""
    code = each(names, lambda n: f"{n.optimizer}.zero_grad()  # every step, before loss.backward()")
    return _made("optimizer.zero_grad() every step", {"zero_grad": True}, Part(ON_OPTIMIZER, code))


def lr_scale(factor: float, names: Names = GENERIC) -> Candidate:
    code = _manual_lr_code(factor, names) if names.manual else each(names, lambda n: _optimizer_lr_code(factor, n))
    return _made(f"learning rate x{factor:g}", {"lr_scale": factor}, Part(ON_OPTIMIZER, code))


def lr_cap(cap: float, names: Names = GENERIC) -> Candidate:
    """A ceiling on the lr the script's schedule sets: the trial lowers a step's lr to `cap` where
    the schedule set it higher, and leaves the schedule as it is (by hand: the update it made,
    scaled back to the cap's, inject's `_cap_update`)."""
    if names.manual:
        lr = names.update_lr if names.update_lr and _assignable(names.update_lr) else ""
        code = (f"{lr} = min({lr}, {cap:.3g})  # every step, right before your update, after {lr} is set: "
                "a ceiling for your schedule" if lr else
                f"# every step, right before your update: the learning rate of your update "
                f"({names.update_lr or 'lr'}) at most {cap:.3g}, a ceiling for your schedule")
    else:
        code = each(names, lambda n: f"for group in {n.optimizer}.param_groups: group['lr'] = min(group['lr'], {cap:.3g})"
                                     f"  # every step, {n.before_update}: a ceiling for your schedule (or build the "
                                     f"schedule with {cap:.3g} as its peak, e.g. OneCycleLR's max_lr)")
    return _made(f"learning rate at most {cap:.3g}", {"lr_cap": cap}, Part(ON_OPTIMIZER, code))


def lr_ceiling(run: RunSeries, findings: list[Finding]) -> float | None:
    """The lr at which the run trained best, when the script's schedule went on raising it until the
    run blew up: a warm-up with no ceiling, a peak set too high (OneCycleLR's max_lr). The best is
    the middle of the window (a tenth of the steps before the blow-up, at least 5) with the lowest
    median loss before the first exploding, non-finite or diverging finding. The schedule must have
    raised the lr at least 2x by then, and past the lr of the best loss. None otherwise. Only the
    lrs of the optimizer that stepped at the blow-up count, from the start of its phase (meta
    `phase_starts`) or from when the one before it stopped (`optimizer_stopped`): a pretraining with
    Adam at 1e-3, then a fine-tuning with SGD at 3.0, is no schedule raising the lr, and a ceiling of
    1e-3 left the fine-tuning at chance.
    """
    first = min((f.first_step for f in findings if f.kind in BLOW_UP), default=None)
    if first is None:
        return None
    phase = max((s for s in phase_changes(run.meta) if s <= first), default=None)
    keep = run.steps >= phase if phase is not None else slice(None)  # (only steps, lr and loss are read)
    steps, lrs, losses = run.steps[keep], updates_lr(run)[keep], run.loss[keep]
    lr_known = np.isfinite(lrs) & (lrs > 0)
    if not lr_known.any():
        return None
    end = int(np.searchsorted(steps, first))
    loss = losses[:end]
    finite = np.isfinite(loss) & lr_known[:end]
    if finite.sum() < 5:
        return None
    rows = np.flatnonzero(finite)
    w = max(5, len(rows) // 10)
    running = np.array([np.median(loss[rows[max(0, i - w + 1):i + 1]]) for i in range(len(rows))])
    best = rows[max(0, int(np.argmin(running)) - w // 2)]  # the middle of the best window
    known = np.flatnonzero(lr_known[:end + 1])  # (by hand: measured at sampled steps only)
    start, at_blow_up = lrs[known[0]], lrs[known[-1]]
    if not (at_blow_up >= 2 * start and at_blow_up > lrs[best]):
        return None
    return float(f"{lrs[best]:.3g}")


def updates_lr(run: RunSeries) -> np.ndarray:
    """The lr of each step: the optimizer's; where the script updates its weights by hand (no
    optimizer), the one its update applied, p -= lr·g: |Δw| / |g| per layer (update_ratio ·
    weight_norm / grad_norm), at the sampled steps (nan between), where every layer it moved
    agrees within 1% (an update by hand that is no plain gradient step, momentum or weight decay by
    hand, reads a ratio growing from the lr with no schedule: no lr is read from it). A
    hand-written loop raising its lr 5% a step reads 0.01·1.05^step to 4 digits."""
    if run.meta.get("optimizer") is not None or np.isfinite(run.lr).any():
        return run.lr
    m = run.metrics
    if not {"update_ratio", "weight_norm", "grad_norm"} <= set(m):
        return run.lr
    with np.errstate(all="ignore"):
        each = m["update_ratio"] * m["weight_norm"] / m["grad_norm"]
    each[~np.isfinite(each) | (each <= 0)] = np.nan  # (a layer the update did not move says nothing)
    measured = np.isfinite(each).any(axis=1)
    out = np.full(len(run.steps), np.nan)
    with np.errstate(all="ignore"):
        low, high = np.nanmin(each[measured], axis=1), np.nanmax(each[measured], axis=1)
    out[measured] = np.where(high <= low * 1.01, np.nanmedian(each[measured], axis=1), np.nan)
    return out


def phase_changes(meta: dict) -> list[int]:
    """The steps where a phase began: a new model trained (meta `phase_starts`), or the optimizer
    stepping before stopped (`optimizer_stopped`: a fine-tuning's SGD after a pretraining's Adam)."""
    return [int(s) for s in meta.get("phase_starts") or []] + [int(s) for s, _ in meta.get("optimizer_stopped") or []]


def _optimizer_lr_code(factor: float, names: Names) -> str:
    """The trial scales every parameter group's lr: one value where they share one, else each scaled."""
    loop = f"for group in {names.optimizer}.param_groups: "
    once = f"once, {names.optimizer_ready}, before a scheduler is built"
    if names.run is not None and names.run.scheduled:
        # the peak the budget saw is not the schedule's (a warm-up may peak later), and OneCycleLR
        # sets the lr from its own max_lr: the factor is what the trial applied to every lr it set
        if (rebuilt := names.scaled_schedule(factor)) is not None:  # the script's own line, its lrs scaled
            return f"{rebuilt}  # {names.replaced_schedule}: its lrs x{factor:g}"
        if names.schedulers and not names.schedulers & set(CYCLIC_LRS):  # StepLR & co. scale from the lr they find
            return loop + f"group['lr'] *= {factor:g}  # {once}"
        return (loop + f"group['lr'] *= {factor:g}  # {once}; a OneCycleLR or CyclicLR sets the lr from "
                f"its max_lr (CyclicLR: and base_lr): multiply that by {factor:g} instead")
    if len(set(names.group_lrs)) > 1:  # one value would flatten lrs the script set per group
        each = ", ".join(f"{lr:.3g} -> {lr * factor:.3g}" for lr in names.group_lrs)
        # (made after each load, a factor compounded at every resume; the store keeps one optimizer's
        # lrs: with several, each its own factor)
        if names.optimizer in names.loaded and len(names.optimizers) <= 1:
            values = ", ".join(f"{lr * factor:.3g}" for lr in names.group_lrs)
            return (f"for group, lr in zip({names.optimizer}.param_groups, ({values})): group['lr'] = lr  "
                    f"# each group's own lr x{factor:g} ({each}); once, {names.optimizer_ready}")
        return loop + f"group['lr'] *= {factor:g}  # each group's own lr ({each}); {once}"
    value = names.lr_value(factor)
    if value is None:
        return loop + f"group['lr'] *= {factor:g}  # {once}"
    resumed = names.optimizer in names.loaded  # load_state_dict puts the saved lr back over the option's
    option = (f"; or no change to the code: run it with {names.lr_option} {value}"
              if names.lr_option and not resumed else "")
    return loop + f"group['lr'] = {value}  # {names.run.lr:.3g} x{factor:g}; once, {names.optimizer_ready}{option}"


def _assignable(lr: str) -> bool:
    """`lr` (the update's learning rate as the script writes it) is a name or an attribute a line
    can assign to (`lr`, `args.lr`), not an expression."""
    return re.fullmatch(r"[A-Za-z_][\w.]*", lr) is not None


def _manual_lr_code(factor: float, names: Names) -> str:
    """Updates by hand: the trial scaled the gradients the update applies (p -= lr·g), which is
    scaling the lr the update multiplies them by."""
    why = f"the trial scaled the gradients your update applies by {factor:g}"
    lr, was = names.update_lr, names.update_lr_set
    if not lr:
        return (f"lr *= {factor:g}  # lr: the learning rate your update multiplies the gradients by (not found in "
                f"your script); once, after it is set: {why}")
    if not _assignable(lr):  # an expression (`0.5`, `base_lr * decay`): nothing to assign to
        return f"# multiply the learning rate of your update ({lr}) by {factor:g}: {why}"
    if was is not None:
        return f"{lr} = {was * factor:.3g}  # in place of your {lr} = {was:g} (x{factor:g}): {why}"
    return f"{lr} *= {factor:g}  # once, after {lr} is set, before training: {why}"


def swap(old: str, new: str = "LeakyReLU", init: str | None = None, present: tuple[str, ...] = (),
         names: Names = GENERIC, own: bool = False) -> Candidate:
    """An activation swap of the hidden layers (the output's activation, the one the forward applies
    after the last layer, is kept); with `init`, the weights re-initialised for the new activation
    too (the old weights were scaled for the old one: swapping alone keeps, e.g., saturating
    magnitudes). `old="*"`: every activation module, the code naming the classes `present` in the model.
    `own`: `old` is a class of the script's (`class Exp(nn.Module)`), not torch's."""
    made = "nn.LeakyReLU(0.01)" if new == "LeakyReLU" else f"nn.{new}()"
    classes = (old if own else f"nn.{old}" if old != "*" else
               f"({', '.join(f'nn.{c}' for c in present)},)" if present else "(nn.Sigmoid, nn.Tanh, nn.ReLU)")
    model = names.changed
    parts = [Part(SWAP, f"{model}, _ = gw.modify.swap_activations({model}, {classes}, lambda: {made}, "
                        "keep_output=True, example_input=batch)")]
    spec: dict = {"swap": {"from": old, "to": new, **({"own": True} if own else {})}}
    name = f"{'activations' if old == '*' else old} -> {new}"
    if init:
        spec["init"] = init
        parts.append(Part(INIT, f"gw.init_({model}, {init!r}" + (", example_input=batch)" if init == "auto" else ")")))
        auto = "Xavier" if new in ("Tanh", "Sigmoid") else "He"  # (what gw.init_ gives the new activation)
        name += f" + {auto if init == 'auto' else 'He' if init == 'he' else init} init"
    return _made(name, spec, *parts)


def swap_function(old: str, new: str = "LeakyReLU", names: Names = GENERIC) -> Candidate:
    """The swap of an activation forward() calls as a function on hidden layers' outputs
    (`torch.sigmoid(self.fc(x))`), which no module holds: the trial makes those calls the new
    function's (`gw.modify.swap_functions`), the change printed is the line of forward(); with the
    weights re-initialised for the new activation, as a module swap's are."""
    fn = "F.silu(x)" if new == "SiLU" else "F.leaky_relu(x, 0.01)"
    model = names.changed
    parts = [Part(SWAP, f"x = {fn}  # in forward(), instead of {FUNCTIONS[old]}(x) on each hidden layer's output"),
             Part(INIT, f"gw.init_({model}, 'auto', example_input=batch)")]
    spec = {"swap_fn": {"from": old, "to": "silu" if new == "SiLU" else "leaky_relu"}, "init": "auto"}
    return _made(f"{FUNCTIONS[old]} -> {new} + He init", spec, *parts)


def norm(kind: str, names: Names = GENERIC) -> Candidate:
    what, m = "BatchNorm" if kind == "batch" else "LayerNorm", names.changed
    call = f"{m}, _ = gw.modify.insert_norm({m}, {kind!r}, example_input=batch"
    return _made(f"{what} after each layer", {"norm": kind}, Part(
        NORM, f"{call})  # {names.new_parameters}",
        _given(names, call, "each norm's parameters join the group of the layer it follows")))


def forget_bias(names: Names = GENERIC) -> Candidate:
    return _made("LSTM forget-gate bias 1", {"recurrent": "forget_bias"},
                 Part(RECURRENT, "\n".join(forget_bias_code(lstm) for lstm in names.recurrent("LSTM"))))


def gru(names: Names = GENERIC) -> Candidate:
    m, alternative = names.changed, " (or build nn.GRU(...) where the nn.RNN is built)"
    call = f"{m}, _ = gw.modify.replace_rnn({m}"
    return _made("nn.RNN -> nn.GRU", {"recurrent": "gru"}, Part(
        RECURRENT, f"{call})  # {names.new_parameters}{alternative}",
        _given(names, call, "the GRU's parameters take the place of the RNN's in it" + alternative)))


def _given(names: Names, call: str, what: str) -> str:
    """`call` (a gw.modify change that adds parameters, its closing parenthesis left off) made once
    the optimizers are built, with `optimizer=` giving them the new parameters as the trial does
    (inject.py, through `gw.modify.give_added`); "" where the script updates by hand (no optimizer)."""
    if names.manual:
        return ""
    opts = [n.optimizer for n in names.each_optimizer()]
    built, resumes = f"after {' and '.join(opts)} {'is' if len(opts) == 1 else 'are'} built", ""
    if names.loads_weights or any(o in names.loaded for o in opts):  # a script that resumes from its checkpoint
        # (made after the load, its second run loaded a checkpoint holding the norms into the model without them)
        built += ", before any load_state_dict"
        resumes = "; a checkpoint saved from now on holds the new layers, one saved before does not fit (train anew)"
    given = f"optimizer={opts[0]}" if len(opts) == 1 else f"optimizer=[{', '.join(opts)}]"
    return f"{call}, {given})  # once, {built}: {what}{resumes}"


def orthogonal(names: Names = GENERIC) -> Candidate:
    """Every W_hh of every recurrent layer, one gate's chunk at a time (as the trial does)."""
    code = [f"for name, p in {rnn}.named_parameters():\n"
            f"    for chunk in p.data.split({rnn}.hidden_size) if name.startswith('weight_hh') else ():\n"
            "        nn.init.orthogonal_(chunk)" for rnn in names.recurrent("RNN", "GRU", "LSTM")]
    return _made("orthogonal W_hh", {"recurrent": "orthogonal"}, Part(RECURRENT, "\n".join(code)))


MODULE_NAMES = {name: cls.__name__ for cls, name in ACTIVATIONS.items()}  # "leaky_relu" -> "LeakyReLU"
SATURATING_MODULES = {a: MODULE_NAMES[a] for a in ("sigmoid", "tanh", "softsign", "hardtanh")}
# Adaptive optimizers whose lr is the step size itself (Adadelta's is a multiplier, default 1;
# Adafactor's is relative by default), so an lr can be called high.
STEP_SIZED = tuple(a for a in ADAPTIVE if a not in ("Adadelta", "Adafactor"))
# An adaptive optimizer moves every weight by about lr per step whatever the gradient's scale, so
# an lr well above its usual 1e-3 (Kingma & Ba 2015) can itself collapse a network (post-LN
# transformers, Xiong et al. 2020): past 5x that, a lower lr is worth a trial against vanishing too.
HIGH_ADAPTIVE_LR = 5e-3


# The finding kinds `from_findings` has trials for; another is a change to the code that no
# trial, made through hooks, can make (a zero_grad() missing from updates by hand: `tried_for`).
TRIED_FOR = frozenset({*BLOW_UP, "vanishing_gradient", "saturation", "stalled_layers", "dead_units", "loss_plateau",
                       "stale_gradients"})


def tried_for(finding: Finding) -> bool:
    """Whether `from_findings` builds a trial for this finding: stale gradients only where an
    optimizer steps (the trial clears the gradients at its steps; by hand there are none)."""
    if finding.kind == "stale_gradients":
        return bool(finding.evidence.get("optimizer"))
    return finding.kind in TRIED_FOR


def from_findings(findings: list[Finding], activations: set[str], *, layer_types: set[str] = frozenset(),
                  optimizer: str | None = "SGD", lr: float | None = None, lr_ceiling: float | None = None,
                  names: Names = GENERIC, smooth: bool = False, sparse: bool = False,
                  functions: set[str] = frozenset()) -> list[Candidate]:
    """The remedies worth a trial for these findings, without repeats, their code in `names`.

    `activations`: those of the hidden layers (a swap of the output's alone would change nothing).
    `layer_types` (module class names), `optimizer` (None: hand-written updates) and its (peak)
    `lr` decide what applies: LayerNorm rather than BatchNorm for sequence models; a GRU for a
    vanilla RNN; no optimizer swap where the script updates the weights itself (clipping and lr
    scaling then act on the gradients); a lower lr against vanishing under a high adaptive lr;
    `lr_ceiling` (see `lr_ceiling()`), a cap on a schedule that raised the lr until the run blew up.
    `smooth`: the loss differentiates the model by its input (a PINN): a saturating activation is
    swapped for SiLU, smooth (tanh saturates too), and dead ReLUs too, since a piecewise-linear net's
    u'' is 0; normalisation is per sample (LayerNorm).
    `sparse`: a model's gradients are sparse (nn.Embedding(sparse=True)), which Adam refuses: no Adam.
    `functions`: the activations forward() calls as functions on hidden layers' outputs (F.relu,
    torch.sigmoid), swapped as such (`swap_function`)."""
    kinds = {f.kind for f in findings}
    through_time = any("sequence_length" in f.evidence for f in findings)  # vanishing through time
    sequence = bool(layer_types & {"RNN", "GRU", "LSTM", "MultiheadAttention", "TransformerEncoderLayer",
                                   "TransformerDecoderLayer", "Embedding"})
    # (BatchNorm mixes a batch's samples: a PINN's per-sample ∂u/∂x would read the others too)
    normalise = norm("layer" if sequence or smooth else "batch", names)
    adams = [adam(names, unscheduled=lr_ceiling is not None)] \
        if optimizer is not None and optimizer not in ADAPTIVE and not sparse else []
    saturating = [SATURATING_MODULES[a] for a in sorted(activations) if a in SATURATING_MODULES]
    present = tuple(sorted(MODULE_NAMES[a] for a in activations if a in MODULE_NAMES))
    out: list[Candidate] = []
    if "stale_gradients" in kinds and optimizer is not None:  # the cause of the rest: its fix first
        out += [zero_grad(names)]
    if "RNN" in layer_types and kinds & {"vanishing_gradient", "exploding_gradient", "saturation"}:
        out += [gru(names)]  # the gated state fixes both directions of the recurrence (Cho et al. 2014)
    if kinds & set(BLOW_UP):
        out += [lr_cap(lr_ceiling, names)] if lr_ceiling is not None else []  # (by hand too: `updates_lr`)
        base = next((max(f.evidence.get("baseline_norm") or 0.0, f.evidence.get("early_norm") or 0.0)
                     for f in findings if f.kind == "exploding_gradient"), None)
        at_init = any(f.kind == "exploding_gradient" and f.evidence.get("at_init") for f in findings)
        # one clipping trial: at twice the level measured before the burst, else adaptive (ZClip
        # needs no level); the two screen alike, so a second one would only add cost. Growth from
        # the first step has no level before it (what was measured is already the burst), and
        # ZClip's 25 warm-up steps pass it unclipped: there, the limit diagnose names, 1.0 (a
        # tester's char-RNN at SGD lr 2: ZClip still exploding at 10.7; clipped at 1.0, 0.149)
        measured = base is not None and math.isfinite(base) and base > 0 and not at_init
        clipper = clip_norm(float(f"{2 * base:.1g}"), names) if measured else clip_norm(1.0, names) if at_init \
            else zclip(names)
        out += [lr_scale(0.1, names), *adams, clipper]
        grows_at_init = any("init_backward_ratio" in f.evidence for f in findings)
        if at_init or grows_at_init:  # too large from the first step: the init
            out += [orthogonal(names) if "RNN" in layer_types else reinit(names)]
    if kinds & {"vanishing_gradient", "saturation", "stalled_layers"}:
        # units that saturated only after training began were driven there by the updates: their
        # size, the lr's (what the diagnosis names first), whatever the optimizer
        driven = any(f.kind == "saturation" and f.evidence.get("at_init") is False for f in findings)
        if driven or optimizer in STEP_SIZED and lr is not None and lr >= HIGH_ADAPTIVE_LR:
            out += [lr_scale(0.1, names)]
        if through_time:
            out += [forget_bias(names)] if "LSTM" in layer_types else []
            out += [orthogonal(names), *adams, lr_scale(10.0, names)]
        else:
            called = [f for f in sorted(functions) if f in ("sigmoid", "tanh")]
            if smooth:  # (tanh saturates too)
                out += [swap(s, "SiLU", "auto", names=names) for s in saturating]
                out += [swap_function(f, "SiLU", names) for f in called]
            else:
                out += [swap(s, "LeakyReLU", "auto", names=names) for s in saturating]
                out += [swap_function(f, "LeakyReLU", names) for f in called]
                # activations called as functions (torch.sigmoid in forward) are no module to swap
                out += [swap("*", "SELU", "lecun", present, names)] if present else []
            out += [reinit(names), normalise, *adams]
    if "dead_units" in kinds:  # the swap re-initialises (He) too: a plain re-init only without ReLUs
        relu = "relu" in activations
        called = "relu" in functions and not relu  # (F.relu in forward(): no module to swap)
        out += [*([swap("ReLU", "SiLU" if smooth else "LeakyReLU", "auto", names=names)] if relu else []),
                *([swap_function("relu", "SiLU" if smooth else "LeakyReLU", names)] if called else []),
                lr_scale(0.1, names), *([] if relu or called else [reinit(names)]), *adams]
    if "loss_plateau" in kinds:
        # one that fell and rose back (the lr overshot, `loss_rose_back`), or stalled high on an
        # adaptive optimizer's steps too long for the weights (`first_update_ratio`): a lower lr
        too_long = any(f.kind == "loss_plateau" and {"loss_low", "first_update_ratio"} & set(f.evidence) for f in findings)
        out += [lr_scale(0.1 if too_long else 10.0, names), *adams]
    seen, unique = set(), []
    for c in out:
        if c.name not in seen:
            seen.add(c.name)
            unique.append(c)
    return unique


def combine(a: Candidate, b: Candidate) -> Candidate | None:
    """Both remedies at once, when they touch different things (a healthy setup usually changes
    activation, initialisation and optimizer together); None when they would overrule each other.
    Their code's lines in the order they must run (`_render`), whatever the order of the remedies:
    sorted as whole remedies, a norm + clip then Adam printed the clip above the Adam, on the
    discarded optimizer."""
    if set(a.spec) & set(b.spec) - {"target"} or len({"optimizer", "lr_scale", "lr_cap"} & (set(a.spec) | set(b.spec))) > 1:
        return None
    return _made(f"{a.name} + {b.name}", {**a.spec, **b.spec}, *_parts(a), *_parts(b))


def _parts(cand: Candidate) -> tuple[Part, ...]:
    """A remedy's parts; for a Candidate built with its code alone, that code as one part at the
    earliest stage its spec names."""
    if cand.parts or not cand.code:
        return cand.parts
    stages = {"swap": SWAP, "swap_fn": SWAP, "norm": NORM, "init": INIT, "recurrent": RECURRENT, "optimizer": OPTIMIZER}
    return (Part(min((stages[k] for k in cand.spec if k in stages), default=ON_OPTIMIZER), cand.code),)


def from_origin(origin: Origin, names: Names = GENERIC) -> list[Candidate]:
    """Remedies for the place the locating run found a NaN/Inf made or taken in (`locate.py`): a batch
    that already held NaN/Inf, its values set to 0 where the line takes them (the usual first
    imputation; mending or dropping those samples is better, and the note says so); an activation
    written as a class of the script's that made it (`torch.exp` overflowing), swapped for LeakyReLU
    with He init, the swap `from_findings` makes of a saturating one. An unsafe operation in the loss
    (a log, a division) has none but its own line's guard (`fix.at_the_origin` keeps the training
    remedies for it)."""
    if origin.gradient_of:
        return []
    if not origin.made_here:
        return [finite_inputs(origin)]
    return [swap(origin.module, "LeakyReLU", "auto", names=names, own=True)] if origin.module else []


def finite_inputs(origin: Origin) -> Candidate:
    """What the line that took the data's NaN/Inf takes, with it set to 0 (the trial: inject.py
    `FiniteAt`, each time that line runs), wherever the batch goes on to: the model, a teacher, the
    loss as its target. A NaN alone is cleaned where the data held NaN: a -inf mask taken on the same
    line keeps its -inf. The spec holds the operation (for the record), the file, line and value."""
    where = f"{os.path.basename(origin.file)}:{origin.line}"
    keep = "posinf=float('inf'), neginf=float('-inf')" if origin.value == "NaN" else "posinf=0.0, neginf=0.0"
    code = (f"# {where}: `{origin.code}`: the data this line takes held {origin.value}; wrap what it takes in "
            f"torch.nan_to_num(..., nan=0.0, {keep}) there (e.g. xb = torch.nan_to_num(x[idx], nan=0.0, {keep}), "
            f"as the trial did); better, mend or drop the samples that hold it")
    return _made(f"NaN/Inf from the data -> 0 ({where})",
                 {"inputs": [origin.op, origin.file, origin.line, origin.value]}, Part(ON_OPTIMIZER, code))


MODEL_KEYS = ("swap", "swap_fn", "norm", "init", "recurrent")  # the spec keys of a change to the model


def aimed(cand: Candidate, target: str) -> Candidate:
    """`cand` with its change to the model made to the module the script calls `target`, not to
    the first trained (`findings_model`); an optimizer remedy alone acts on every optimizer as it is."""
    if not any(k in cand.spec for k in MODEL_KEYS):
        return cand
    return replace(cand, name=f"{cand.name} ({target})", spec={**cand.spec, "target": target})


def findings_model(findings: list[Finding], names: Names) -> str | None:
    """The model every harmful finding is in, when it is not the first one the script trains: the
    watch records a later model's layers under its name (`disc.4`), and a model change made to the
    first (a GAN's generator) would leave the broken one (its discriminator) as it was. The name as
    the script calls it (`disc`, for `self.disc` too); None when the findings are in the first model,
    in several, or the script trains one."""
    layers = [l for f in findings if f.kind in HARMFUL for l in f.layers]
    heads = {l.split(".")[0] for l in layers}
    others = {m.split(".")[-1] for _, m in names.optimizers if m and m != names.model}
    if len(heads) != 1 or not all("." in l for l in layers) or not heads <= others:
        return None
    return heads.pop()


def autotrainer_order(findings: list[Finding], names: Names = GENERIC) -> list[Candidate]:
    """AutoTrainer's fixed repair order (Zhang et al., ICSE 2021), as a baseline: vanishing:
    SELU -> ReLU+He -> BatchNorm; exploding: SELU -> ReLU -> clip by value -> tanh -> BatchNorm."""
    kinds = {f.kind for f in findings}
    selu, relu = swap("*", "SELU", "lecun", names=names), swap("*", "ReLU", names=names)
    relu_he, tanh, batchnorm = swap("*", "ReLU", "he", names=names), swap("*", "Tanh", names=names), norm("batch", names)
    if kinds & set(BLOW_UP):
        return [selu, relu, clip_value(1.0, names), tanh, batchnorm]
    if kinds & {"vanishing_gradient", "saturation", "stalled_layers", "dead_units"}:
        return [selu, relu_he, batchnorm]
    return []
