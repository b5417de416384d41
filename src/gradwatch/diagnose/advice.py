"""Causes (ranked by what the run shows) and remedies (as code) for each kind of finding.

Rules decide *that* something is wrong; this module says *why it likely is* and *what to type*.
Each cause starts with a stable key ("saturating activation: ...", "learning rate: ...") so
tools can match on it; the rest is the run's own numbers.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import replace

import numpy as np

from gradwatch.diagnose.finding import Remedy
from gradwatch.diagnose.signals import functional_activation, hidden_layers, outputs_own, profile_columns, recurrent_layers
from gradwatch.store.series import WEIGHT_ROLES, RunSeries

RELU_FAMILY = {"relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "celu", "selu", "gelu", "silu", "mish"}
SATURATING = {"sigmoid", "tanh", "softsign", "hardtanh", "hardsigmoid"}
# ~x/2 near 0 and ~ReLU far from it: no weight scale keeps their signal through depth. Under He's
# √2 the variance shrinks into the x/2 regime (backward gain ~1/2 a layer); under the gain that
# makes unit variance a fixed point, 1/√E[f(z)²], that fixed point is unstable and the variance
# grows (20 SiLU layers: 2.8 -> 47 -> 1050). Measured on a 20-layer SiLU MLP on digits, SGD 0.05,
# 300 steps: default init ∂L/∂s ratio 6e-11, loss 2.30; gw.init_ 1.9e-3, loss 2.30; BatchNorm
# after each layer: loss 0.20, no finding. Normalisation is their first remedy.
SMOOTH_RELUS = {"gelu", "silu", "mish", "hardswish"}
# An unnormalised stack of more weight layers than this is repaired by normalisation, not by a new
# initialisation or activation: no per-layer scale keeps a deep plain net trainable under SGD, nor
# any scale a residual sum's growth (each block adds its branch's variance). Measured on digits, SGD
# 0.05 momentum 0.9, 300 steps, 2 seeds, accuracy: tanh/sigmoid MLPs swapped to Leaky ReLU + He init
# reached 0.90-0.97 at 10 layers, 0.10-0.52 at 13, 0.09-0.28 at 16-30; BatchNorm 0.80-0.98 at every
# depth (under Adam both worked). A 40-block He-init residual MLP: loss 8.7e7 at step 0, NaN; after
# gw.init_ 7.4e8, NaN; BatchNorm 0.12.
PLAIN_DEPTH = 10
# A NaN the gradient norm grew less than this much toward (over the steps before it) did not come
# from training dynamics but from the data or the loss (a NaN in a batch, log of 0, a division by 0).
NAN_FROM_GROWTH = 10.0
# Adam's default step is 1e-3 (Kingma & Ba 2015) and each step moves a weight by about lr: at 1e-2,
# a hundred steps can move it by 1, ten times a typical initial weight (1/sqrt(fan_in)).
ADAPTIVE_HIGH_LR = 1e-2
# An update ratio ‖Δw‖/‖w‖ of 1 overshoots the weights (the exploding rule's bar); a tenth of it is
# the most a step should change them (healthy steps are ~1e-3). Δw is proportional to the learning
# rate under SGD (lr·g) and Adam (lr·m/√v) alike, so the cut that brings a measured ratio r under
# this is the lr divided by 10r, rounded to a power of ten. Measured: a tanh MLP under SGD at lr 8
# (ratio 1.9 at step 0) stayed at 10% accuracy at lr 0.8 (ratio 0.19) and reached 93% at 0.08.
UPDATE_TARGET = 0.1
# A loss this large at the first step, before any update, is its scale, not the training's doing:
# cross-entropy starts near log(classes) (< 12 for 100k classes) and a standardised regression's
# squared error near 1; AutoTrainer (ICSE 2021) calls a loss >= 1e3 exploding. Every gradient
# scales with the loss, so the fix is the loss's scale (a loss x1e6 under SGD at lr 0.01: first
# update 1.2e3x the weights, NaN at step 3), and a tenfold lower lr is nowhere near enough.
LARGE_INITIAL_LOSS = 1e3
ADAPTIVE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Adafactor", "Lion")
# Quasi-Newton optimizers pick each step's length themselves (a line search, or lr times an inverse
# Hessian estimate along the gradient): the step is not lr·g, and a step as long as the weights is
# the method working (L-BFGS on a full batch: loss 2.34 -> 1.06 in its first step, update 2.6x the
# weights). They also stop stepping by design once converged (tolerance_grad / tolerance_change).
LINE_SEARCH = ("LBFGS",)

# Code that several remedies paste, written once.
ADAM_CODE = "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)"
INSERT_NORM_CODE = "model, _ = gw.modify.insert_norm(model, 'batch')"
GUARD_CODE = "guard = gw.guard(optimizer)"
CLIP_CODE = "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"
LOSS_SCALE_CODE = ("loss = loss_fn(output, target)  # reduction='mean' (the default), no constant factor\n"
                   "target = (target - target_train.mean()) / target_train.std()  # regression: standardise the targets")
NORMALISE = Remedy("Normalise the pre-activations", INSERT_NORM_CODE)
RECURRENT_NORM_CAUSE = ("recurrent weight norm: the gradient through time grows like the product of "
                        "diag(f'(h_t))·W_hh; a spectral norm of W_hh above 1/γ lets it grow geometrically")
CLEAR_BEFORE_BACKWARD = Remedy("Clear the gradients before backward() and step after it, in this order, every step",
                               "optimizer.zero_grad()\nloss.backward()\noptimizer.step()")
STANDARDISE_INPUTS = Remedy("Standardise the inputs: mean 0 and std 1 per feature, from the training set",
                            "x = (x - x_train.mean(0)) / (x_train.std(0) + 1e-8)")


def forget_bias_code(lstm: str) -> str:
    """The code that opens an LSTM's forget gates (gate order i, f, g, o; the gate sees b_ih + b_hh)."""
    return (f"for n, p in {lstm}.named_parameters():  # the gate sees b_ih + b_hh: 1 in total\n"
            "    if n.startswith('bias'): p.data[p.numel() // 4: p.numel() // 2] = float(n.startswith('bias_ih'))")


def listed(items, shown: int = 3, quote: bool = True) -> str:
    """`'a', 'b', 'c' and 2 more`: the first `shown` items of a list a message names."""
    items = list(items)
    text = ", ".join(f"'{i}'" if quote else str(i) for i in items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def continued(sentence: str) -> str:
    """A sentence continued after a colon within another: its first letter lowered."""
    return sentence[:1].lower() + sentence[1:]


def module_ref(name: str) -> str:
    """`net.0.fc` -> `model.net[0].fc`: how the user reaches the module in code."""
    out = "model"
    for part in name.split("."):
        out += f"[{part}]" if re.fullmatch(r"\d+", part) else f".{part}"
    return out


class Context:
    """The facts about a run that causes and remedies depend on."""

    def __init__(self, run: RunSeries):
        self.run = run
        # {activation: the hidden layers whose output forward() passes through it as a function (F.relu);
        # not the last weight layer's, the output's own (a sigmoid giving BCELoss its probabilities),
        # nor any the loss takes through no weight layer (a head's that another head runs after)}
        hidden, own = hidden_layers(run), outputs_own(run)
        self.functional: dict[str, list[str]] = {}
        for l in sorted(run.layers, key=lambda l: l.index):
            if functional_activation(l) and l.name in hidden:
                self.functional.setdefault(l.activation, []).append(l.name)
        self.modules = {l.activation for l in run.layers if l.role == "activation"}
        acts = [l.activation for l in run.layers if l.role == "activation" and l.name not in own] + \
            [act for act, called in self.functional.items() for _ in called]
        self.saturating = sorted({a for a in acts if a in SATURATING})
        self.n_saturating = sum(a in SATURATING for a in acts)
        self.relu_like = sorted({a for a in acts if a in RELU_FAMILY})
        self.smooth_relus = sorted({a for a in acts if a in SMOOTH_RELUS})
        self.rnn_types = sorted({l.type for l in run.layers if l.role == "recurrent"})
        self.depth = sum(l.role in WEIGHT_ROLES and "Norm" not in l.type for l in run.layers)
        self.has_norm = any("Norm" in l.type for l in run.layers)
        self.attention = any(l.type == "MultiheadAttention" for l in run.layers)  # residual by construction
        self.post_ln = _post_ln(run)
        self.optimizer = run.meta.get("optimizer") or "manual updates"
        self.adaptive = any(self.optimizer.startswith(a) for a in ADAPTIVE)
        self.line_search = self.optimizer in LINE_SEARCH
        lr = run.lr[np.isfinite(run.lr)] if len(run.lr) else np.empty(0)
        # under a schedule the lr the script configures is its peak (a warm-up may start at 0)
        self.lr = float(lr.max()) if len(lr) else float("nan")
        self.scheduled = bool(len(lr)) and float(lr.min()) < self.lr
        # the loss differentiates the model by its input (a PINN's u''): a swap keeps it smooth
        self.smooth_needed = bool(run.meta.get("input_derivatives"))
        # Adam refuses sparse gradients (an nn.Embedding(sparse=True)): pasted, it raised
        self.adam_fits = not run.meta.get("sparse_gradients")
        # SGD's heavy-ball momentum β adds the steps up to lr/(1-β): 100x the lr at 0.99
        self.momentum = 0.0 if self.adaptive else float(run.meta.get("momentum") or 0.0)

    def swap_target(self, act: str) -> tuple[str, str]:
        """(the class a saturating `act` is swapped for, its name as said): Leaky ReLU; where the
        loss differentiates the model by its input, a smooth one, since a piecewise-linear
        network's second derivative is 0 (a tester's PINN, sigmoid swapped for Leaky ReLU, could
        not fall below the residual's mean square; with tanh it fell 5000x, with SiLU further): SiLU,
        smooth and not saturating above 0."""
        if not self.smooth_needed:
            return "LeakyReLU(0.01)", "Leaky ReLU"
        return "SiLU()", "SiLU"  # (tanh saturates too: a reviewer's PINN saturated at 72% was offered it)

    @property
    def init_code(self) -> str:
        """`gw.init_` finds the activation after each layer from module order; activations called
        as functions (F.relu) only show in a forward pass."""
        if self.modules and not self.functional:
            return "gw.init_(model)"
        return "gw.init_(model, example_input=batch)  # batch: one input batch; the forward shows F.relu & co."

    @property
    def lr_said(self) -> str:
        return (f"{self.lr:.3g}" + (" (the schedule's peak)" if self.scheduled else "")
                + (f" at momentum {self.momentum:g} (steps that add up to {1 / (1 - self.momentum):.3g}x the lr)"
                   if self.high_momentum else ""))

    @property
    def high_momentum(self) -> bool:
        return HIGH_MOMENTUM <= self.momentum < 1

    def lower_momentum(self) -> Remedy:
        """Momentum 0.9: steps that add up to 10x the lr, not 1/(1-β)x. A tester's MLP under SGD at
        lr 0.3 and momentum 0.99 blew up; lr 0.03 (tenfold) fell to 0.11 and collapsed to 2.35,
        momentum 0.9 at lr 0.03 reached 0.0027 (92%)."""
        return Remedy(f"Lower the momentum to 0.9 and the learning rate tenfold (to {self.lr_text(0.1)}): the steps "
                      f"then add up to 10x the lr, not {1 / (1 - self.momentum):.3g}x",
                      f"for group in optimizer.param_groups: group['momentum'] = 0.9; group['lr'] = {self.lr_text(0.1)}")

    def lr_text(self, factor: float = 0.1) -> str:
        return f"{self.lr * factor:.3g}" if math.isfinite(self.lr) and self.lr > 0 else f"{factor} * your current lr"

    def lr_cut(self, ratio: float | None = None) -> float:
        """The factor to multiply the learning rate by: tenfold lower, or more where an update ratio
        needs more to fall below `UPDATE_TARGET` (`ratio`, else the largest ratio of the weight
        layers at the first sampled step where one exceeded it)."""
        if ratio is None:  # the first sampled step whose update was too long: later ones measure
            u = self.run.metrics.get("update_ratio")  # weights the long steps have already wrecked
            cols = profile_columns(self.run)  # the weight layers (a gate or a bias starting near 0 has no scale)
            u = u[:, cols] if u is not None and cols else None
            top = np.nanmax(np.where(np.isfinite(u), u, np.nan), axis=1, initial=0.0) if u is not None else np.empty(0)
            over = np.flatnonzero(top > UPDATE_TARGET)
            ratio = float(top[over[0]]) if len(over) else 0.0
        if not (math.isfinite(ratio) and ratio > UPDATE_TARGET):
            return 0.1
        return min(0.1, 10.0 ** math.floor(math.log10(UPDATE_TARGET / ratio)))

    def lower_lr(self, factor: float = 0.1) -> Remedy:
        fold = "tenfold" if factor == 0.1 else f"{1 / factor:.0f}-fold" if factor >= 1e-4 else f"{1 / factor:.0e}-fold"
        return Remedy(f"Lower the learning rate {fold} (to {self.lr_text(factor)})", self.lr_code(factor))

    def lr_code(self, factor: float) -> str:
        if self.scheduled:  # a scheduler recomputes group['lr'] from the lr it was built with
            return f"peak_lr = {self.lr_text(factor)}  # give it to the optimizer and the scheduler (e.g. OneCycleLR's max_lr)"
        return f"for group in optimizer.param_groups: group['lr'] = {self.lr_text(factor)}"


def vanishing(ctx: Context, layers: tuple[str, ...], evidence: dict, through_time: bool) -> tuple[list[str], list[Remedy]]:
    causes, remedies = [], []
    if through_time:
        rnn = ", ".join(ctx.rnn_types) or "recurrent layer"
        causes.append(f"recurrent weight norm: the gradient through time shrinks like the product of "
                      f"diag(f'(h_t))·W_hh; with ‖W_hh‖ < 1/γ it decays geometrically ({rnn})")
        if "RNN" in ctx.rnn_types:
            # a GRU takes and returns the hidden state as nn.RNN does: an LSTM's (h, c) pair broke a
            # tester's loop that passes h0 (IndexError), pasted as printed
            remedies.append(Remedy("Replace the vanilla RNN by a GRU, whose gates keep long-range gradients (a drop-in: "
                                   "the same hidden state in and out; an LSTM needs an (h, c) pair)",
                                   "model, _ = gw.modify.replace_rnn(model, optimizer=optimizer)  # each nn.RNN -> nn.GRU of its sizes"))
        if "LSTM" in ctx.rnn_types:  # first: measured (docs/probe.md), an LSTM's gradient horizon went from
            # 14 steps to 38 with forget bias 1, and to 12 with orthogonal W_hh
            remedies.append(Remedy("Open the LSTM forget gates at the start: forget-gate bias 1",
                                   forget_bias_code(module_ref(layers[0]))))
        remedies.append(Remedy("Initialise the recurrent weights orthogonally (all singular values 1)",
                               f"gw.init_({module_ref(layers[0]) if layers else 'model'}, scheme='orthogonal')"))
        return causes, remedies
    if zeros := evidence.get("zero_weight_layers"):  # the first cause; re-initialised, a sigmoid net may still vanish
        causes, remedies = vanishing(ctx, layers, {k: v for k, v in evidence.items() if k != "zero_weight_layers"}, False)
        zero_causes, zero_remedies = zero_weights(ctx, zeros)
        return ([*zero_causes, *(c for c in causes if not c.startswith("initial weight scale"))],
                [*zero_remedies, *(r for r in remedies if r.code != ctx.init_code)])
    if ctx.saturating:
        acts = ", ".join(ctx.saturating)
        causes.append(f"saturating activation: {ctx.n_saturating} {acts} layers; sigmoid' ≤ 0.25 and tanh' ≤ 1, "
                      "so each one shrinks the backward signal")
        said = ctx.swap_target(ctx.saturating[0])[1]
        smooth = (": the loss differentiates the model by its input, and a ReLU's second derivative is 0"
                  if ctx.smooth_needed else "")
        remedies.append(Remedy(f"Swap the saturating activations for {said}{smooth}", _swap_code(ctx, ctx.saturating[0])))
    if evidence.get("at_init"):
        causes.append("initial weight scale: the gradient already collapses at the first step, before any update")
    if ctx.depth >= 6:
        causes.append(f"depth: {ctx.depth} weight layers multiply {ctx.depth - 1} backward factors")
    init = Remedy("Initialise each layer for the activation that follows it (He for ReLU, Xavier for tanh/sigmoid)",
                  ctx.init_code)
    norm = Remedy("Normalise the pre-activations so each layer's backward gain stays near 1", INSERT_NORM_CODE)
    if ctx.smooth_relus and not ctx.saturating and not ctx.has_norm:
        causes.insert(0, f"activation: {', '.join(ctx.smooth_relus)} is ~x/2 near 0, so no initial weight scale keeps "
                      "the signal through depth (it shrinks toward that regime or grows away from it)")
        remedies += [norm, init]
    else:
        remedies += [init] + ([] if ctx.has_norm else [norm])
    if ctx.depth >= 6 and not ctx.attention:  # (attention blocks have their residual sums already)
        remedies.append(Remedy("Add residual connections around the shape-preserving blocks",
                               "model, _ = gw.modify.add_residual(model, example_input=batch)  # batch: one input batch"))
    if ctx.post_ln and not evidence.get("at_init"):  # (collapsed before any update: no lr caused it)
        # a tester's post-LN char transformer at Adam 2e-2 without warm-up sat at the unigram loss (2.88):
        # re-initialised 2.878; with its 30-step warm-up 0.17; pre-LN 0.11
        causes.insert(0, POST_LN_CAUSE)
        remedies = [*([] if ctx.scheduled else [WARM_UP]), ctx.lower_lr(), PRE_LN, *remedies]
    elif not causes:  # no saturating activation, not at the start, shallow: something between the layers
        # (a tester's binarised MLP, BatchNorm before a straight-through estimator whose backward passed
        # |x| <= 1e-3 only, had no cause and was told to re-initialise, which made it worse)
        causes.append(BETWEEN_LAYERS_CAUSE)
        remedies.insert(0, FIND_THE_CUT)
    return causes, _norm_first_when_deep(ctx, remedies)


POST_LN_CAUSE = ("post-LN transformer: the LayerNorm after each residual sum divides the gradient the lower blocks get, "
                 "and at a high learning rate without warm-up the lower blocks stop learning (Xiong et al. 2020)")
WARM_UP = Remedy("Warm the learning rate up over the first few hundred steps",
                 "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=300)  "
                 "# scheduler.step() after each optimizer.step()")
PRE_LN = Remedy("Normalise before each sub-layer instead (pre-LN), which needs no warm-up",
                "x = x + attn(ln1(x)); x = x + mlp(ln2(x))  # nn.TransformerEncoderLayer(..., norm_first=True)")


def _post_ln(run: RunSeries) -> bool:
    """An attention layer followed, in its own block, by a LayerNorm before any LayerNorm ran in that
    block (forward order: the layers' index): `ln(x + attn(x))`, not `x + attn(ln(x))`."""
    first_norm: dict[str, int] = {}  # block -> the index of its first LayerNorm
    for l in run.layers:
        if l.type == "LayerNorm":
            block = l.name.rpartition(".")[0]
            first_norm[block] = min(first_norm.get(block, l.index), l.index)
    # (not the model's own attention, an attention pooling between top-level layers: no block)
    return any(l.type == "MultiheadAttention" and (block := l.name.rpartition(".")[0]) and first_norm.get(block, -1) > l.index
               for l in run.layers)


BETWEEN_LAYERS_CAUSE = ("an operation between the layers passes almost no gradient back: a module or function of the "
                        "script's own (a custom autograd.Function's backward, a straight-through estimator's window, "
                        "torch.round, sign or clamp, a mask); torch.autograd.gradcheck checks a custom backward "
                        "against its forward")
FIND_THE_CUT = Remedy("Find the module whose backward shrinks the gradient: print the gradient at each module's "
                      "output (the backward prints the top first; the cut is where the norm falls)",
                      "def show(name):\n"
                      "    def hook(m, args, out):\n"
                      "        if torch.is_tensor(out) and out.requires_grad:\n"
                      "            out.register_hook(lambda g: print(name, g.norm().item()))\n"
                      "    return hook\n"
                      "for name, m in model.named_modules():  # for one backward, then remove the hooks\n"
                      "    m.register_forward_hook(show(name))")


def _norm_first_when_deep(ctx: Context, remedies: list[Remedy]) -> list[Remedy]:
    """Past `PLAIN_DEPTH` unnormalised weight layers, normalisation is the remedy that worked."""
    if ctx.depth <= PLAIN_DEPTH or ctx.has_norm:
        return remedies
    norm = next((r for r in remedies if r.code == INSERT_NORM_CODE), NORMALISE)
    return [norm, *(r for r in remedies if r is not norm)]


def exploding(ctx: Context, layers: tuple[str, ...], evidence: dict, through_time: bool) -> tuple[list[str], list[Remedy]]:
    causes, remedies = [], []
    # a blow-up from the first step in a recurrent net: its W_hh is a suspect whatever the through-time
    # profile showed (a tester's RNN at 3x orthogonal W_hh was told of its lr alone; the probe named ρ = 3)
    recurrent_init = not through_time and bool(evidence.get("at_init")) and bool(ctx.rnn_types)
    if through_time:
        causes.append(RECURRENT_NORM_CAUSE)
    grows_at_init = ("init_backward_ratio" in evidence or "init_forward_growth" in evidence) and not through_time
    if "init_backward_ratio" in evidence and not through_time:  # measured at the first step, before any update
        causes.append(f"initial weight scale: the backward signal already grows "
                      f"{evidence['init_backward_ratio']:.3g}x toward the input at the first step")
    elif grows_at_init:
        causes.append(f"initial weight scale: the activations already grow {evidence['init_forward_growth']:.3g}x "
                      "through the layers at the first step (weights too large for their fan-in)")
    if not ctx.adaptive and (evidence.get("growth_over_steps") or evidence.get("max_update_ratio")
                             or evidence.get("predicted_update_ratio")):
        causes.insert(len(causes) if grows_at_init else 0,
                      f"learning rate: {ctx.lr_said} with {ctx.optimizer}; each update feeds the next gradient")
    if recurrent_init:
        causes.append(RECURRENT_NORM_CAUSE)
    loss_scaled = not (through_time or grows_at_init) and _loss_scale(ctx) is not None
    if loss_scaled:
        causes.insert(0, _loss_scale(ctx))
    if ctx.depth >= 6 and (evidence.get("backward_ratio") or grows_at_init):
        causes.append(f"depth: {ctx.depth} weight layers multiply {ctx.depth - 1} backward factors")
    # an adaptive optimizer moves each weight by about lr per step whatever the gradient's size:
    # weights that grow, or a learning rate far above Adam's 1e-3, are the step's size, which
    # clipping the gradient does not shorten
    step_bound = ctx.adaptive and ("weight_growth" in evidence or ctx.lr >= ADAPTIVE_HIGH_LR)
    if step_bound:
        causes.insert(0, f"learning rate: {ctx.lr_said} with {ctx.optimizer}, which moves each weight by about the "
                         "learning rate per step whatever the gradient's size (its usual range is 1e-4 to 1e-3)")
    if not causes:
        causes.append(f"learning rate: {ctx.lr_said} with {ctx.optimizer}")
    # the healthy level; none where the blow-up starts at the first step: the level of its first steps
    # is the blow-up's (a tester's RNN at 3x orthogonal W_hh was told 330000, which left its loss at
    # 9.6e9; at 1.0, as fix's trial clips there, 0.60)
    clip = 0.0 if evidence.get("at_init") else max(evidence.get("baseline_norm") or 0.0, evidence.get("early_norm") or 0.0)
    max_norm = two_digits(2 * clip) if clip and math.isfinite(clip) and clip > 0 else "1.0"
    told = f"; the run clips {evidence['grad_clip']} now" if evidence.get("grad_clip") else ""
    action = (f"Clip the gradient norm at 1.0: from the first step there is no healthy level to scale it to{told}"
              if evidence.get("at_init") else f"Clip the gradient norm at about twice its healthy level ({max_norm}{told})")
    clips = told_norm_limit(evidence.get("grad_clip"))
    if not (clips and clips <= float(max_norm)):  # (clipping there already: it did not stop this)
        remedies.append(Remedy(action,
                               f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm})  # before optimizer.step()"))
    if not evidence.get("at_init"):  # ZClip's 25 warm-up steps pass a blow-up from the first step unclipped
        # (a tester's RNN: the same loss, 0.1253, and the same finding as with no clipping)
        remedies.append(Remedy("Or clip adaptively: ZClip rejects spikes against a running z-score of the norm",
                               "gw.clip.attach(optimizer, gw.clip.ZClip())"))
    # an update larger than the weights from a gradient no larger than the weights (update ratio
    # over lr, ‖g‖/‖w‖ under SGD, at most 1) and no burst: the step is too long, not the gradient
    # too large; clipping at 1.0 left a tanh MLP under SGD at lr 8 at 35% accuracy, lr / 100 gave 93%.
    # A gradient far larger than its weights (a vanilla RNN's 8e5 at lr 1e-4) is the gradient's fault.
    overshoot = evidence.get("max_update_ratio") or evidence.get("predicted_update_ratio")
    lr_bound = bool(overshoot) and not ctx.adaptive and "growth_over_steps" not in evidence and not grows_at_init \
        and ctx.lr > 0 and overshoot / ctx.lr <= 1.0
    lower = ctx.lower_lr(ctx.lr_cut(overshoot) if lr_bound else 0.1)
    if step_bound or lr_bound:
        remedies.insert(0, lower)
    elif not ctx.adaptive or evidence.get("growth_over_steps"):
        remedies.append(lower)
    if loss_scaled:
        remedies.insert(0, LOSS_TO_ORDER_1)
    if through_time:
        remedies.append(Remedy("Initialise the recurrent weights orthogonally (spectral norm 1)",
                               f"gw.init_({module_ref(layers[0]) if layers else 'model'}, scheme='orthogonal')"))
    elif recurrent_init:  # (the finding may name a layer above the recurrent one: the whole model, per layer)
        remedies.append(Remedy("Re-initialise: the recurrent weights orthogonally (spectral norm 1), every other "
                               "layer for its activation", ctx.init_code))
    elif grows_at_init:
        remedies.insert(0, Remedy("Initialise each layer for the activation that follows it", ctx.init_code))
        remedies = _norm_first_when_deep(ctx, remedies)
    if ctx.high_momentum and not (through_time or grows_at_init):
        remedies.insert(0, ctx.lower_momentum())
    remedies.append(Remedy("Skip any step whose gradients are not finite, so one bad batch cannot ruin the weights",
                           GUARD_CODE))
    return _inputs_first(evidence, causes, remedies)


def _inputs_first(evidence: dict, causes: list[str], remedies: list[Remedy]) -> tuple[list[str], list[Remedy]]:
    """The inputs' scale first, where the first layer's activations start far from unit scale
    (`first_layer_std`): a tester's tabular MLP with numeric columns in the thousands was told its
    learning rate and to clip; standardised, its MAE halved and no finding was left."""
    if "first_layer_std" not in evidence:
        return causes, remedies
    cause = (f"input scale: the first layer's activations have std {evidence['first_layer_std']:.3g} at the first "
             "step, as inputs far from unit scale give (features in the hundreds or thousands, raw pixel values)")
    return [cause, *causes], [STANDARDISE_INPUTS, *(r for r in remedies if r is not STANDARDISE_INPUTS)]


LOSS_TO_ORDER_1 = Remedy("Bring the loss to order 1: average rather than sum, drop the constant factor, "
                         "standardise regression targets", LOSS_SCALE_CODE)


def _loss_scale(ctx: Context) -> str | None:
    """The loss-scale cause, when the loss is >= LARGE_INITIAL_LOSS at the first step under an
    optimizer whose step follows the gradient (Adam divides a common scale out of its step)."""
    first_loss = float(ctx.run.loss[0]) if len(ctx.run.loss) else float("nan")
    if ctx.adaptive or not math.isfinite(first_loss) or first_loss < LARGE_INITIAL_LOSS:
        return None
    return (f"loss scale: the loss is {first_loss:.3g} at the first step, before any update (cross-entropy "
            "starts near log(classes), a standardised regression near 1), and every gradient scales with "
            "it: a constant factor, a sum over a large batch, or targets far from unit scale")


def nan_cause(evidence: dict) -> str:
    """What a non_finite finding's evidence says led up to it; diagnose and fix both decide by this.
    "data": it came at the first step, before any update, or the gradient norm grew at most
    NAN_FROM_GROWTH-fold before it: the data or the model's or loss's arithmetic, which no training
    remedy repairs. "growth": the norm grew more (training dynamics, the learning rate). "unknown":
    too few finite steps before it to measure, so either may be the cause. "weights": weights
    non-finite at the first recorded step, before any update (the initialisation or a loaded
    checkpoint): no operation of the script's steps makes it, so there is none to locate."""
    growth = evidence.get("grad_growth_before")
    if evidence.get("nonfinite_weights_at_start"):
        return "weights"
    if evidence.get("at_init"):
        return "data"
    if growth is None or math.isnan(growth):
        return "unknown"
    return "growth" if growth > NAN_FROM_GROWTH else "data"


def non_finite(ctx: Context, layers: tuple[str, ...], evidence: dict) -> tuple[list[str], list[Remedy]]:
    if evidence.get("nonfinite_weights_at_start"):
        return _loaded_non_finite(ctx, evidence["nonfinite_weights_at_start"], evidence)
    causes, remedies = [], []
    growth = evidence.get("grad_growth_before", float("nan"))
    cause = nan_cause(evidence)
    if cause != "growth":
        causes.append("bad input data: a NaN/Inf in a batch, or a numerically unsafe operation (log of 0, "
                      "division by 0, sqrt of a negative, exp of more than ~88 in float32: a softmax or "
                      "log-sum-exp written by hand) in the model or loss; " +
                      ("it came at the first step, before any update" if evidence.get("at_init") else
                       "gradients were not growing before it" if cause == "data" else
                       "too few finite steps before it to tell whether gradients grew"))
        remedies.append(Remedy("Check the batches and guard the unsafe operations (" + _fix_command(ctx) + " runs "
                               "the script again to that step and names the operation and the line that make it)",
                               "assert torch.isfinite(x).all(), 'non-finite input'\n"
                               "p = p.clamp(1e-7, 1 - 1e-7)  # before log(p), log(1 - p) or a division; or use a *_with_logits loss\n"
                               "log_p = torch.log_softmax(logits, dim=-1)  # not logits.exp() / logits.exp().sum(): it shifts by the max first"))
    # an adaptive optimizer moves each weight by about lr a step: only a high lr blows it up that soon
    if cause == "growth" or not ctx.adaptive or (cause == "unknown" and ctx.lr >= ADAPTIVE_HIGH_LR):
        causes.insert(0 if cause == "growth" else len(causes),
                      f"learning rate: {ctx.lr_said} with {ctx.optimizer}" +
                      (f"; the gradient norm grew {growth:.3g}x in the steps before" if cause == "growth" else ""))
        remedies.append(Remedy(f"Lower the learning rate tenfold (to {ctx.lr_text(0.1)}) and clip the norm",
                               ctx.lr_code(0.1) + "\n" + CLIP_CODE))
    if cause != "data" and (scale := _loss_scale(ctx)) is not None:
        # (a regression on targets x10 at SGD 3e-3: NaN at step 9, told to lower the lr tenfold and
        # clip at 1.0; both pasted, the loss stayed at 9.9e6: the targets' scale was the fault)
        causes.insert(0, scale)
        remedies.insert(0, LOSS_TO_ORDER_1)
    if not evidence.get("guard_skipped_steps"):  # gw.guard is there already: it kept them from the weights
        remedies.append(Remedy("Never let a non-finite step reach the weights", GUARD_CODE))
    return causes, remedies


def _loaded_non_finite(ctx: Context, loaded: list[str], evidence: dict) -> tuple[list[str], list[Remedy]]:
    """Weights non-finite before the first update: no learning rate or clipping repairs what the
    model started from; re-initialising it (or a sound checkpoint) does."""
    causes = [f"initial weights: {listed(loaded)} hold NaN/Inf before any update (an initialisation that divides "
              "by 0, a write into .data, or a checkpoint saved after a NaN)"]
    remedies = [Remedy(f"Re-initialise {listed(loaded)} or load a checkpoint saved before the NaN, and check the "
                       "weights before training", "assert all(torch.isfinite(p).all() for p in model.parameters()), "
                       "'non-finite weights before training'\n" + ctx.init_code)]
    if not evidence.get("guard_skipped_steps"):
        remedies.append(Remedy("Never let a non-finite step reach the weights", GUARD_CODE))
    return causes, remedies


def _fix_command(ctx: Context) -> str:
    """`gradwatch fix -- python SCRIPT ARGS` for the run's own command where it was a script; in a
    notebook, whose argv is its kernel's launcher (`ipykernel_launcher.py -f kernel.json`), `gw.fix`."""
    argv = [str(a) for a in ctx.run.meta.get("command") or ctx.run.meta.get("argv") or []]  # (`gradwatch run`'s; in code)
    if argv and "kernel_launcher" in argv[0]:
        return "`gw.fix(train_fn)`, train_fn a function that builds your model and trains,"
    script = " ".join(map(shlex.quote, argv)) if argv and argv[0].endswith(".py") else "train.py"
    distributed = ctx.run.meta.get("distributed") or {}
    # (LOCAL_WORLD_SIZE is torchrun's: an mp.spawn run has none, and is on one node)
    one_node = "local_world_size" in distributed and distributed["local_world_size"] < (distributed.get("world_size") or 0)
    return f"`gradwatch fix -- {_launcher(distributed)} {script}`" + (" on one node" if one_node else "")


def _launcher(distributed: dict) -> str:
    """`python`, or the torchrun that starts the run's processes (each rank's argv is the script's).
    A multi-node run's trials run on one node, with its processes: `--nnodes=2` with no rendezvous
    options waits for the other node forever (a reviewer's)."""
    world = distributed.get("world_size") or 1
    if world <= 1:
        return "python"
    local = distributed.get("local_world_size") or world
    return f"torchrun --nproc_per_node={min(local, world)}"


def _swap_code(ctx: Context, act: str, layers: tuple[str, ...] = ()) -> str:
    """The swap as code that works when pasted: the output's own sigmoid (BCELoss's probabilities)
    kept, also a head's that another head runs after (found in a forward of the batch), and the
    weights re-initialised for the new activation. Swapped alone, a 10-layer sigmoid
    MLP with torch's default init (variance 1/(3 fan_in), a sixth of the signal per Leaky ReLU
    layer) still vanished: 10% accuracy after 300 SGD steps; with gw.init_ after it, 95%."""
    target, said = ctx.swap_target(act)
    init = "He" if said in ("Leaky ReLU", "SiLU") else "Xavier"
    if act in ctx.functional and act not in ctx.modules:
        return (f"{_functional_swap(ctx, act, target, layers)}\n"
                f"gw.init_(model, example_input=batch)  # batch: one input batch; {init} init for the new activation")
    return (f"model, _ = gw.modify.swap_activations(model, nn.{_cls(act)}, lambda: nn.{target}, keep_output=True, "
            "example_input=batch)\n"
            f"{ctx.init_code}  # {init} init for the new activation")


# How forward() calls each activation `functional_acts` finds, and each swap target as a function.
FUNCTION_CALLS = {"relu": "F.relu(x) / torch.relu(x)", "sigmoid": "torch.sigmoid(x)", "tanh": "torch.tanh(x)"}
AS_FUNCTION = {"LeakyReLU(0.01)": "F.leaky_relu(x, 0.01)", "SiLU()": "F.silu(x)"}


def _functional_swap(ctx: Context, act: str, target: str, layers: tuple[str, ...] = ()) -> str:
    """The line of forward() to change where `act` is called as a function: no module to swap. On
    the outputs of `layers` (a finding's), of those `ctx.functional` holds; all of those without."""
    layers = [n for n in ctx.functional[act] if n in layers] or ctx.functional[act]
    after = ", ".join(module_ref(n) for n in layers[:3]) + (" ..." if len(layers) > 3 else "")
    return f"x = {AS_FUNCTION[target]}  # in forward(), instead of {FUNCTION_CALLS[act]} on the output of {after}"


def zero_weights(ctx: Context, zeros: list[str]) -> tuple[list[str], list[Remedy]]:
    """Layers below the output that start all zero: the first cause, whichever finding shows it (dead
    units under ReLU or tanh, a vanishing gradient under sigmoid, whose units all give 0.5)."""
    return ([f"initial weights: {listed(zeros)} start with all parameters exactly 0, so every unit computes the same "
             "0 and no gradient passes down through them (units that start equal and get equal gradients stay equal)"],
            [Remedy("Re-initialise the weights (He for ReLU, Xavier for tanh/sigmoid) instead of zeros", ctx.init_code)])


def dead_units(ctx: Context, layers: tuple[str, ...], evidence: dict) -> tuple[list[str], list[Remedy]]:
    causes = []
    at_init = evidence.get("at_init")
    zeros = evidence.get("zero_weight_layers")
    if zeros:  # measured: all-zero weights give every unit the same output, 0, and no gradient
        return zero_weights(ctx, zeros)
    if "dead_fraction" not in evidence and layers and set(layers) <= recurrent_layers(ctx.run):
        # a recurrent layer has no ReLU to die (a tester's tanh RNN on raw sensor values, ±700, was told
        # to use Leaky ReLU): its own tanh and sigmoid gates pinned at their asymptotes pass a derivative
        # that rounds to 0 in float32
        return ([f"saturation: the tanh and sigmoid gates inside {listed(layers)} are pinned at their asymptotes, "
                 "where their derivative rounds to exactly 0: inputs of a large scale (raw values in the hundreds) or "
                 "weights a large step grew",
                 f"learning rate: {ctx.lr_said}, if the weights grew before the gradient stopped"],
                [STANDARDISE_INPUTS, ctx.lower_lr()])
    if ctx.saturating and not ctx.relu_like and "dead_fraction" not in evidence:
        # no ReLU to be dead (a 1000-block tanh net was told "ReLU passes no gradient"): exact zeros
        # below saturating units that are not saturated are a product of derivatives < 1 underflowed
        return ([f"depth: {ctx.depth} weight layers of {', '.join(ctx.saturating)} multiply derivatives below 1, and "
                 "the product underflows to exactly 0 in float32 before it reaches these layers",
                 "initial weights: a layer above initialised to all zeros passes no gradient down "
                 "(gw.check_constant_init(model) lists such layers)"],
                [NORMALISE, Remedy("Re-initialise with Xavier/Glorot, scaled for the activation", ctx.init_code)])
    kind = _dead_class(ctx, layers)
    start = evidence.get("dead_at_start")
    if at_init:  # dead before any update: no learning rate killed them
        causes.append("initial weight scale: units are already dead at the first step (biases or weights start too negative)")
    elif not ctx.adaptive or ctx.lr >= ADAPTIVE_HIGH_LR:
        causes.append(f"learning rate: a large step ({ctx.lr_said}) can push a {kind} unit's bias so far that it never "
                      "fires again" + (f": {start:.0%} were dead at the first step, the updates killed the rest"
                                       if start is not None else ""))
    if start is not None:
        causes.append(f"initial weight scale: {start:.0%} of the units were already dead at the first step")
    causes.append(f"activation: {kind} passes no gradient for negative inputs, so a dead unit cannot recover" if kind == "ReLU"
                  else f"activation: {kind} passes almost no gradient for inputs far below 0, where a large step left "
                       "these units")
    # (ReLUs called as functions, recorded alive, are no cause of the zero gradients alone seen)
    if "dead_fraction" in evidence or ctx.modules & RELU_FAMILY:
        refs = ", ".join(module_ref(l) for l in layers[:3])
        cls, where = (f"nn.{kind}", "") if kind in NN_ACTIVATIONS else (kind, f"; {kind}: imported from its library")
        target, said = ctx.swap_target(kind)  # (a ReLU PINN: Leaky ReLU's u'' is 0 too; a reviewer's stayed
        # at 45.69, SiLU reached 0.0003)
        why = "smooth, whose second derivative the loss can train" if ctx.smooth_needed else \
            "which keeps a small gradient for negative inputs"
        if ctx.smooth_needed:
            causes.insert(0, "activation: the loss differentiates the model by its input, and a piecewise-linear "
                             "network's second derivative is 0")
        code = f"model, _ = gw.modify.swap_activations(model, {cls}, lambda: nn.{target})  # {refs}{where}"
        if kind == "ReLU" and "relu" in ctx.functional and set(layers) <= set(ctx.functional["relu"]):
            code = _functional_swap(ctx, "relu", target, layers)
        leaky = Remedy(f"Use {said}, {why}", code)
    else:  # only the zero gradients were seen: the ReLUs are called as functions in forward()
        causes.append("initial weights: a layer above initialised to all zeros passes no gradient down "
                      "(gw.check_constant_init(model) lists such layers)")
        causes.append("activation: a function in forward() whose derivative is 0 there passes nothing back "
                      "(torch.round, sign, a custom autograd.Function's backward: torch.autograd.gradcheck "
                      "checks one against its forward)")
        leaky = Remedy("Use Leaky ReLU, which keeps a small gradient for negative inputs",
                       f"x = {AS_FUNCTION['LeakyReLU(0.01)']}  # in forward(), instead of {FUNCTION_CALLS['relu']}")
    remedies = [leaky, Remedy("Re-initialise with He init and zero biases", ctx.init_code)]
    if at_init:
        remedies.reverse()  # the initialisation is what went wrong
    elif kind == "ReLU":
        remedies.append(Remedy(f"Lower the learning rate (to {ctx.lr_text(0.1)})", ctx.lr_code(0.1)))
    else:  # a smooth ReLU (GELU, SiLU ...) is dead only far below 0, where steps too long took it: a
        # tester's GPT-2 at lr 3 was told to swap its GELUs with code that swaps ReLUs
        remedies.insert(0, Remedy(f"Lower the learning rate (to {ctx.lr_text(0.1)})", ctx.lr_code(0.1)))
    return _inputs_first(evidence, causes, remedies)


# torch.nn's ReLU-family classes: others (Hugging Face's NewGELUActivation) are the script's imports
NN_ACTIVATIONS = {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish"}


def _dead_class(ctx: Context, layers: tuple[str, ...]) -> str:
    """The class of the dead layers named when they are one smooth ReLU (GELU, SiLU, ELU ...);
    ReLU otherwise (the ReLU family's hard zero, F.relu in forward() whose zero gradients are all
    that was seen, or a mix)."""
    names = {l.name: l for l in ctx.run.layers}
    found = [names[l] for l in layers if l in names and names[l].role == "activation"]
    types = {l.type for l in found}
    smooth = found and all(l.activation in SMOOTH_RELUS | {"elu", "celu", "selu"} for l in found)
    return types.pop() if smooth and len(types) == 1 else "ReLU"


def saturation(ctx: Context, layers: tuple[str, ...], evidence: dict) -> tuple[list[str], list[Remedy]]:
    if layers and set(layers) <= recurrent_layers(ctx.run):
        return _recurrent_saturation(ctx, layers, evidence)
    acts = sorted({a for a in evidence.get("activations", []) if a}) or ctx.saturating or ["sigmoid"]
    causes = [f"saturating activation: {', '.join(acts)} outputs pinned at an asymptote pass almost no gradient (derivative < 0.01)"]
    if evidence.get("at_init"):
        causes.append("initial weight scale: pre-activations are already too large at the first step")
    elif ctx.line_search:  # the step's length is the line search's, not lr's: a lower lr is no cut
        causes.append(f"learning rate: {ctx.optimizer}'s steps (their length set by its own search) drove "
                      "pre-activations into the flat region")
    else:
        causes.append(f"learning rate: updates ({ctx.lr_said}) drove pre-activations into the flat region")
    remedies = [
        Remedy("Initialise with Xavier/Glorot, scaled for the activation", ctx.init_code),
        NORMALISE,
        Remedy("Or swap to a non-saturating activation", _swap_code(ctx, acts[0], layers)),
    ]
    if not evidence.get("at_init"):  # the initial weights were fine: the updates pushed them there
        if ctx.line_search:
            del remedies[0]
        else:
            remedies[0] = ctx.lower_lr(ctx.lr_cut())
    if evidence.get("first_layer"):  # raw inputs (pixels 0..255) saturate the first layer whatever its init
        causes.insert(1, "input scale: the first layer saturates from the first step, as it does when the inputs "
                         "are not standardised (raw pixel values, features in the thousands)")
        remedies.insert(0 if len(layers) == 1 else 1, STANDARDISE_INPUTS)
    return causes, remedies


def _recurrent_saturation(ctx: Context, layers: tuple[str, ...], evidence: dict) -> tuple[list[str], list[Remedy]]:
    """A recurrent layer's own tanh saturated: no activation module to swap. Fed raw inputs of a large
    scale (a tester's sensor values, ±700: 99% of |h| > 0.99, accuracy at chance, told only of its
    W_hh), the inputs are the fault; later in training, the weights' growth (the lr)."""
    causes = [f"saturation inside {listed(layers)}: its tanh (and gates) pinned at their asymptotes pass a derivative "
              "near 0, through the inputs and through time"]
    remedies = []
    if evidence.get("first_layer"):
        causes.insert(0, "input scale: the recurrent layer the inputs feed saturates from the first step, as it does "
                         "when the inputs are not standardised (raw sensor values, features in the hundreds)")
        remedies.append(STANDARDISE_INPUTS)
    elif evidence.get("at_init"):
        causes.append("initial weight scale: the recurrent weights (W_hh, W_ih) are too large from the first step")
        remedies.append(Remedy("Initialise the recurrent weights orthogonally (spectral norm 1)",
                               f"gw.init_({module_ref(layers[0])}, scheme='orthogonal')"))
    else:
        causes.append(f"learning rate: {ctx.lr_said}: the updates grew the weights until the gates saturated")
        remedies.append(ctx.lower_lr())
    return causes, remedies


def stalled(ctx: Context, layers: tuple[str, ...], evidence: dict) -> tuple[list[str], list[Remedy]]:
    if evidence.get("outside_optimizers"):
        causes = ["these parameters are in no optimizer (or only at lr 0): left out by mistake, or frozen on "
                  "purpose with requires_grad left on"]
        return causes, [give_parameters(ctx, layers),
                        Remedy("Or, if they are frozen on purpose, stop their gradients", _freeze_code(layers))]
    if evidence.get("frozen") and ctx.run.meta.get("optimizer"):
        # in an optimizer that steps, their group's lr above 0 (at lr 0 they count as outside it),
        # gradients arriving: the step never sees them (a tester's zero_grad() between backward()
        # and step() was told to add the parameters to the optimizer again, which raised)
        causes = [f"gradients cleared before the step: backward() gives these weights gradients and {ctx.optimizer} "
                  f"steps them at lr {ctx.lr_said}, yet they never change: optimizer.zero_grad() (or p.grad = None) "
                  "runs between loss.backward() and optimizer.step(), step() runs before backward(), or the weights "
                  "are put back after each step (a load_state_dict, a copy of the first weights)"]
        return causes, [CLEAR_BEFORE_BACKWARD]
    if evidence.get("frozen"):
        causes = ["learning rate: the weights do not change although gradients arrive; the learning rate is 0, "
                  "or these parameters are not in the optimizer"]
        return causes, [give_parameters(ctx, layers)]
    if evidence.get("lr_scale"):  # their own param group's lr, far below any fine-tuning scheme's
        lowest = min(evidence["lr_scale"].values())
        causes = [f"learning rate: their param group's lr is {lowest:.2g} of the largest group's, so they barely "
                  "move: a config meant for a pretrained backbone applied to a fresh one, or a freeze"]
        return causes, [Remedy("Raise their group's learning rate (fine-tuning keeps a backbone at 0.1x-0.01x the head's)",
                               "top = max(g['lr'] for g in optimizer.param_groups)\n"
                               "for g in optimizer.param_groups: g['lr'] = max(g['lr'], 0.01 * top)"),
                        Remedy("Or, if they are frozen on purpose, stop their gradients", _freeze_code(layers))]
    causes = ["learning rate: one learning rate for layers whose gradients differ by orders of magnitude"]
    if ctx.saturating:
        causes.append(f"saturating activation: {', '.join(ctx.saturating)} shrinks the signal reaching the lower layers")
    remedies = [NORMALISE]
    if not ctx.adaptive and ctx.adam_fits:  # an adaptive optimizer already scales each parameter's step
        remedies.insert(0, Remedy("Use an optimizer with per-parameter step sizes", ADAM_CODE))
    elif ctx.adaptive:
        remedies.append(Remedy("Initialise each layer for the activation that follows it", ctx.init_code))
    return causes, remedies


def cut_off(layers: tuple[str, ...], above: str) -> tuple[list[str], list[Remedy]]:
    """Layers that ran but got no gradient: something between them and `above` leaves the graph."""
    causes = [f"graph cut: the output reaching '{above}' does not require grad: a .detach(), .data, "
              "torch.no_grad(), a round trip through .item(), .tolist() or .numpy(), or "
              "torch.utils.checkpoint(..., use_reentrant=True) on an input that needs no grad, at or below "
              f"'{layers[-1]}'"]
    find = Remedy(f"Remove what cuts the graph below '{above}' (checkpoint with use_reentrant=False)",
                  "loss.backward()  # then list the trainable weights no gradient reached: the cut is just above them\n"
                  "print([n for n, p in model.named_parameters() if p.requires_grad and p.grad is None])")
    return causes, [find, Remedy("Or, if they are frozen on purpose, stop their gradients", _freeze_code(layers))]


def loss_plateau(ctx: Context, evidence: dict) -> tuple[list[str], list[Remedy]]:
    causes = [f"learning rate: {ctx.lr_said} may be too small to move the loss"]
    remedies = [Remedy(f"Raise the learning rate tenfold (to {ctx.lr_text(10)})", ctx.lr_code(10)),
                Remedy("Check every trainable parameter is given to the optimizer and gets a gradient",
                       "assert all(p.grad is not None for p in model.parameters() if p.requires_grad)")]
    if not ctx.adaptive and ctx.adam_fits:
        remedies.append(Remedy("Try an adaptive optimizer", ADAM_CODE))
    return causes, remedies


def zero_gradient_plateau(pinned: str | None) -> tuple[list[str], list[Remedy]]:
    """A plateau whose gradient is exactly 0 everywhere: the loss is flat where the model sits, so
    the learning rate is no cause. `pinned`: the type of the output's own saturating activation,
    pinned at its asymptotes."""
    find = replace(FIND_THE_CUT, action="Find where the gradient stops: print the gradient at each module's output "
                   "(the backward prints the top first; it stops where the norm is 0)")
    if pinned is None:
        return (["the gradient is exactly 0 in every layer: every unit dead, or a loss that does not depend on the "
                 "weights (a prediction detached, an argmax or a comparison in the loss)"], [find])
    cause = (f"the output's {pinned} is pinned at its asymptotes, where its derivative rounds to 0: the loss is flat "
             "there, so no step moves the weights")
    if pinned.lower() != "sigmoid":
        return [cause], [Remedy(f"Take the loss on the output before its {pinned}, or scale that layer's initial "
                                "weights down", ""), find]
    logits = Remedy("Take the loss on the logits: drop the final Sigmoid and use nn.BCEWithLogitsLoss (exact where "
                    "the sigmoid rounds to 0 or 1)",
                    "loss_fn = nn.BCEWithLogitsLoss()  # on the model's output without its last Sigmoid\n"
                    "# (in an nn.Sequential: model[-1] = nn.Identity()); torch.sigmoid(model(x)) gives probabilities")
    return [cause + " (BCELoss clamps its log at -100)"], [logits, find]


def loss_rose_back(ctx: Context, evidence: dict) -> tuple[list[str], list[Remedy]]:
    """A loss that fell, then rose back to its start: an lr too large for where training got to,
    not too small to move it (the plateau's usual cause, whose remedy, a tenfold lr, would make it worse)."""
    causes = [f"learning rate: {ctx.lr_said} with {ctx.optimizer} overshoots once the loss is low"
              + (" (the schedule raised it past what training could take)" if ctx.scheduled else "")]
    return causes, [ctx.lower_lr(), Remedy("Clip the gradient norm", CLIP_CODE)]


def lr_schedule_ended(ctx: Context, since: int, last: int, evidence: dict) -> tuple[list[str], list[Remedy]]:
    """A plateau since the schedule took the learning rate to ~0 long before the run's end."""
    causes = [f"learning rate: the schedule took it from {evidence['lr_peak']:.3g} to {evidence['lr_since']:.3g} by step "
              f"{since}, {last - since} steps before the run's end, while the loss ({evidence['loss_run_start']:.4g} at "
              "the start) had not yet halved: a scheduler stepped per batch with a step size or decay meant per "
              "epoch, or one sized for a shorter run"]
    remedies = [Remedy("Step the scheduler once per epoch, or size it to the run's total steps",
                       "scheduler.step()  # once per epoch, after its batches: StepLR, MultiStepLR, ExponentialLR count epochs\n"
                       "# or: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lr, total_steps=epochs * len(loader))")]
    return causes, remedies


def loss_divergence(ctx: Context, evidence: dict) -> tuple[list[str], list[Remedy]]:
    causes = [f"learning rate: {ctx.lr_said} with {ctx.optimizer} overshoots; the loss rises instead of falling"]
    remedies = [ctx.lower_lr(ctx.lr_cut()),  # more than tenfold where the measured updates need it
                Remedy("Clip the gradient norm", CLIP_CODE)]
    if ctx.high_momentum:
        remedies.insert(0, ctx.lower_momentum())
    if not ctx.scheduled:  # a schedule is there already (and may warm up)
        remedies.append(Remedy("Warm the learning rate up over the first steps",
                               "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=100)"))
    return causes, remedies


# the groups that hold them at lr 0 given the others' lr, the rest added: add_param_group alone raised
# "some parameters appear in more than one parameter group" on a fine-tune's head left at lr 0
GIVE_CODE = ("held = [g for g in optimizer.param_groups if any(p is q for p in params for q in g['params'])]\n"
             "for group in held:  # a group at lr 0: the others' lr\n"
             "    group['lr'] = group['lr'] or max(g['lr'] for g in optimizer.param_groups)\n"
             "new = [p for p in params if not any(p is q for g in held for q in g['params'])]\n"
             "if new:\n    optimizer.add_param_group({'params': new})\n")
# "the total norm to 1 (max_grad_norm)", as integrations/_trainer.py and the watch keep a run's clipping;
# clipping by value ("each entry to ±0.5") changes the direction, not a step length, and is not read
_NORM_LIMIT = re.compile(r"total norm to ([0-9.]+(?:e[+-]?[0-9]+)?)", re.IGNORECASE)


def told_norm_limit(told: object) -> float | None:
    """The limit of a clipping by norm as the run's meta `grad_clip` says it, else None."""
    match = _NORM_LIMIT.search(told) if isinstance(told, str) else None
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


HIGH_MOMENTUM = 0.95  # SGD momentum from which it is named with the lr: steps that add up to 20x it or more
SPARSE_CAPABLE = ("SGD", "Adagrad", "SparseAdam")  # optimizers whose step takes sparse gradients (without weight decay)


def give_parameters(ctx: Context, layers: tuple[str, ...], shown: int = 6) -> Remedy:
    """Their weights added to the optimizer the run has, not a new Adam over the model (which drops
    the user's optimizer). An Embedding or EmbeddingBag built with sparse=True (only the module
    knows) gets sparse gradients, which Adam-family optimizers refuse: those go to a SparseAdam of
    their own, zeroed and stepped beside the user's (else they pile up); SGD and Adagrad take them
    in a group without weight decay, which does not add to a sparse gradient."""
    refs = ", ".join(map(module_ref, layers[:shown])) + ("," if len(layers) == 1 else "")
    more = f"  # and the other {len(layers) - shown} of them" if len(layers) > shown else ""
    types = {layer.type for layer in ctx.run.layers if layer.name in layers}
    what = ("Give the optimizer every parameter that should train (if a param group holds them at lr 0, "
            "give that group an lr)")
    if not types & {"Embedding", "EmbeddingBag"}:
        return Remedy(what, f"params = [p for m in ({refs}) for p in m.parameters()]{more}\n" + GIVE_CODE)
    split = (f"modules = ({refs}){more}\n"
             "params = [p for m in modules if not getattr(m, 'sparse', False) for p in m.parameters()]\n"
             "sparse = [p for m in modules if getattr(m, 'sparse', False) for p in m.parameters()]  # sparse=True\n"
             + GIVE_CODE)
    if ctx.optimizer in SPARSE_CAPABLE:
        return Remedy(what, split + "if sparse:  # weight decay does not take sparse gradients\n"
                                    "    optimizer.add_param_group({'params': sparse, 'weight_decay': 0.0})")
    return Remedy(what, split + f"if sparse:  # {ctx.optimizer} refuses sparse gradients; every step, beside optimizer's: "
                                "sparse_optimizer.zero_grad() and sparse_optimizer.step()\n"
                                "    sparse_optimizer = torch.optim.SparseAdam(sparse, lr=optimizer.param_groups[0]['lr'])")


def _freeze_code(layers: tuple[str, ...], shown: int = 6) -> str:
    refs = ", ".join(map(module_ref, layers[:shown])) + ("," if len(layers) == 1 else "")
    more = f"  # and the other {len(layers) - shown} of them" if len(layers) > shown else ""
    return f"for m in ({refs}):{more}\n    m.requires_grad_(False)"


def _cls(activation: str) -> str:
    return {"sigmoid": "Sigmoid", "tanh": "Tanh", "softsign": "Softsign", "hardtanh": "Hardtanh",
            "hardsigmoid": "Hardsigmoid", "relu": "ReLU"}.get(activation, activation.capitalize())


def two_digits(x: float) -> str:
    """`x` to two significant digits, printed as short as it reads (0.013, 40, 2e+04)."""
    return f"{float(f'{x:.2g}'):g}"
