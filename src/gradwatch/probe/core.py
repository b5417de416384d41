"""`probe(model, batch, loss_fn)`: gradient flow at initialisation, from one forward and backward."""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradwatch.collect.stats import activation_stats
from gradwatch.errors import ConfigError, first_line
from gradwatch.probe import meanfield, recurrent, verdict
from gradwatch.probe.inputs import expected_input, failing_layer, known_cause, running_layers, user_frame
from gradwatch.probe.record import Call, Functional, Recorder, first_tensor, output_tensor, tensors_in
from gradwatch.probe.result import LayerProbe, ProbeResult
from gradwatch.probe.spectra import MAX_PROBES, graph_ops, spectrum
from gradwatch.remedies._activations import by_execution

LANCZOS_STEPS = 10
SEED_OFFSET = 0x5DEECE66D
NEXT_LAYER_TRIES = 4  # how far down the forward order to look for the next layer that depends on this one


def _loss_output(out: Any) -> torch.Tensor:
    y = output_tensor(out)
    if y is None:
        raise ConfigError(f"the model returned {type(out).__name__} with no tensor in it; pass a loss_fn "
                          "that computes the loss from it")
    return y


def sumsq_loss(out: Any) -> torch.Tensor:
    """½ Σ y² / B over the model's (first) output y of batch size B: ∂L/∂y = y / B (the CLI's --loss sumsq)."""
    y = _loss_output(out)
    return 0.5 * y.float().pow(2).sum() / max(y.shape[0] if y.dim() else 1, 1)


def projection_loss(generator: torch.Generator) -> Callable[[Any], torch.Tensor]:
    """The default: L = ⟨r, y⟩ / B for the model's (first) output y of batch size B and a standard normal r
    of y's shape drawn from `generator`, so ∂L/∂y = r / B whatever the weights. Mean-field theory assumes
    a backward signal independent of the forward one; ½Σy² gives ∂L/∂y = y, which is not: on deep tanh and
    ReLU MLPs it overstated the gain to the input 4–10× against the closed form (docs/probe.md), and on a
    normalised output (a final LayerNorm) it is a constant with no gradient at all."""
    def loss(out: Any) -> torch.Tensor:
        y = _loss_output(out)
        y = y if y.dtype == torch.float64 else y.float()
        r = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y)
        return (r * y).sum() / max(y.shape[0] if y.dim() else 1, 1)

    return loss


def _with_grad(batch: Any) -> Any:
    """Floating tensors of the batch as fresh leaves that require grad (for the first layer's Jacobian);
    tensors made under torch.inference_mode() cloned into normal ones, which autograd may save."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return batch.detach().clone().requires_grad_(True)
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_with_grad(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _with_grad(v) for k, v in batch.items()}
    return batch


def _call(model: nn.Module, batch: Any) -> Any:
    """The model's forward on the batch; its failure (a wrong shape, a wrong dtype) is a bad batch."""
    try:
        with running_layers(model) as running:  # (which layer it fails in, for the message)
            if isinstance(batch, dict):
                return model(**batch)
            if isinstance(batch, (tuple, list)):
                return model(*batch)
            return model(batch)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:  # (MultiheadAttention
        # checks its input's rank with an assert)
        cause = known_cause(exc)
        where = failing_layer(running) if cause else expected_input(model, running)
        raise ConfigError(f"{type(model).__name__} failed on the probe batch ({type(exc).__name__}: {exc}"
                          f"{user_frame(exc)}){where}; "
                          + (cause or "pass a batch the model accepts: a tensor for model(x), a tuple for "
                                      "model(*batch), a dict for model(**batch)")) from exc


def probe(model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None, *,
          iters: int = 30, cells: Iterable[str | nn.Module] = (),
          seed: int = 0, progress: Callable[[int, int, str], None] | None = None) -> ProbeResult:
    """Per-layer gradient flow of `model` at its current weights, from one batch.

    batch: the model's input — a tensor (model(batch)), a tuple/list (model(*batch)) or a dict
    (model(**batch)). loss_fn(output) -> scalar; default ⟨r, output⟩ / batch size for a fixed standard
    normal r drawn from `seed` (∂L/∂output = r / B, independent of the weights). For a labelled
    batch, close over the labels: `gw.probe(model, x, lambda out: F.cross_entropy(out, y))`.
    iters: JᵀJ products per layer for the Jacobian spectra: the first min(iters, 10) are Lanczos
    steps (mean and RMS singular value, and a warm start), the rest power iteration (top singular
    value); 0 skips the spectra (gradient profile only: one forward and one backward). cells: submodules (or their names) that are step
    functions cell(x_t, h) -> h called once per time step (nn.RNNCell/GRUCell/LSTMCell are found
    automatically). The model runs in its current mode (train: dropout on, BatchNorm batch
    statistics). Its weights, buffers, .grad and in-place flags are left as they were; the probe's
    own random vectors come from `seed`, not the global RNG (a model's dropout still draws from it).
    progress(done, total, layer): called before each layer's Jacobian spectra (the slow part), and
    with done == total when they are finished.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ConfigError(f"iters must be a non-negative integer, got {iters!r}")
    start = time.perf_counter()
    # Offset: a batch drawn with the same seed must not equal the probe vectors (they would align with it).
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**63:
        raise ConfigError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    gen = torch.Generator().manual_seed(seed ^ SEED_OFFSET)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function of the model's output, got {type(loss_fn).__name__}")
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a function progress(done, total, layer), got {type(progress).__name__}")
    cells = _check_cells(model, cells)
    _check_not_inference(model)
    x = first_tensor(batch)
    if x is not None and x.numel() == 0:
        raise ConfigError(f"the probe batch is empty (shape {tuple(x.shape)}); pass at least one sample "
                          "(a few are enough: the probe needs one forward and one backward)")
    # BatchNorm running stats, and the tables an nn.Embedding(max_norm=...) renormalises in place
    renormed = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.max_norm is not None]
    buffers = [(b, b.detach().clone()) for b in [*model.buffers(), *renormed]]
    try:  # gradients are the point, also when called under torch.no_grad() or inference_mode()
        with torch.inference_mode(False), torch.enable_grad():
            return _probe(model, _with_grad(batch), loss_fn, iters, cells, gen, start, progress, seed)
    finally:  # also when the forward or the loss raises
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _check_cells(model: nn.Module, cells: Iterable[str | nn.Module]) -> list[str | nn.Module]:
    """Each of `cells` a submodule of the model, or its name in `model.named_modules()`."""
    if isinstance(cells, (str, nn.Module)):
        cells = [cells]
    out = list(cells)
    modules = {id(m) for m in model.modules()}
    names = {n for n, _ in model.named_modules()}
    for c in out:
        if not (isinstance(c, str) and c in names or isinstance(c, nn.Module) and id(c) in modules):
            raise ConfigError(f"cells: {c!r} is not a submodule of {type(model).__name__}; pass the cell modules "
                              "(or their names from model.named_modules()) that the forward calls once per time step")
    return out


def _check_not_inference(model: nn.Module) -> None:
    """Weights made under torch.inference_mode() can never take part in autograd."""
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise ConfigError(f"{type(model).__name__}.{meta} is on the meta device (a shape with no values); "
                          "materialise the model first (model.to_empty(device='cpu') and initialise it) before probing it")
    bad = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()), None)
    if bad is not None:
        raise ConfigError(f"{type(model).__name__}.{bad} was created under torch.inference_mode(), so no "
                          "gradient can flow through it; build the model outside inference_mode "
                          "(torch.no_grad() is fine) before probing it")


def _probe(model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor] | None, iters: int,
           cells: Iterable[str | nn.Module], gen: torch.Generator, start: float,
           progress: Callable[[int, int, str], None] | None = None, seed: int = 0) -> ProbeResult:
    # The math attention kernel: the fused CPU/flash kernels have no double backward, which the
    # Jacobian-vector products need (spectra.graph_ops).
    with sdpa_kernel([SDPBackend.MATH]), Recorder(model, cells) as rec:
        out = _call(model, batch)
    entries = rec.depth()
    if not entries:
        raise ConfigError(f"{type(model).__name__} has no layers: no module with trainable parameters ran in "
                          "its forward; probe needs at least one (e.g. nn.Linear, nn.Conv2d)")
    if loss_fn is None:
        loss = projection_loss(gen)(out)
    else:
        try:
            loss = loss_fn(out)
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ConfigError(f"loss_fn failed on the model's output, {got} ({type(exc).__name__}: {exc}"
                              f"{user_frame(exc)}); pass a loss_fn(output) -> scalar that accepts it, e.g. "
                              "lambda out: F.cross_entropy(out, y) with labels y of the probe batch") from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                          f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not loss.requires_grad:
        raise ConfigError(f"the loss ({float(loss.detach()):.4g}) does not depend on {type(model).__name__}'s "
                          "parameters: the output it was computed from is detached or constant; pass a loss_fn "
                          "that uses the output the model trains on")
    layers = _backward(entries, loss, retain=iters > 0)
    notes = _frozen_note(model) + (_jacobians(entries, layers, output_tensor(out), iters, gen, progress) if iters else [])
    _gain_to_top(layers, _pooling_scales(rec, entries))
    mf, note, chi = _mean_field(entries, layers)
    recs = _recurrent(rec, gen)
    for x in layers:
        x.verdict = verdict.layer_verdict(x)
    notes += _waiting_on_zero_init(model, batch, loss_fn, cells, seed, entries, layers)
    flagged = any(x.verdict in ("vanishing", "exploding") for x in layers)  # remedies to write
    functional = _functional_acts(model, batch, entries, layers) if flagged else {}
    residual = _residual(entries, loss)
    findings = (verdict.nonfinite_findings(layers, _forward_origin(entries) if any(x.nonfinite for x in layers) else None)
                + verdict.layer_findings(layers, mf, init=_init_targets(model, entries),
                                         normalised=_normalised(model), residual=residual,
                                         functional=functional, example=_example_code(batch))
                + verdict.recurrent_findings(recs, root=type(model).__name__))
    x_in = first_tensor(batch)
    if not any(f.kind in ("vanishing_gradient", "exploding_gradient") for f in findings):  # (their causes name it)
        rms = float(x_in.detach().double().pow(2).mean().sqrt()) if x_in is not None and x_in.is_floating_point() else math.nan
        findings += verdict.saturation_findings(layers, init=_init_targets(model, entries), functional=functional,
                                                example=_example_code(batch), input_rms=rms)
    y = output_tensor(out)
    # (around skip connections the gradient does not pass through each layer's Jacobian in turn: a
    # post-LN transformer's product read σmean 2.8e-12 where its end-to-end Jacobian's mean is 0.63)
    gain = {k: math.nan if residual else verdict._prod(layers, f"sigma_{k}") for k in ("max", "mean", "rms")}
    gain["top"] = gain.pop("max")
    return ProbeResult(
        layers=layers, loss=float(loss.detach()), input_std=_std(x_in), output_std=_std(y), gain=gain,
        mean_field=mf, mean_field_note=note, chi_measured=chi, recurrent=recs, findings=findings,
        verdict=verdict.overall(layers, findings), iters=iters, seconds=time.perf_counter() - start,
        notes=notes, loss_name="projection" if loss_fn is None else "", residual=residual)


def _finite(t: Any) -> bool:
    return not (isinstance(t, torch.Tensor) and t.is_floating_point()) or bool(torch.isfinite(t.detach()).all())


def _forward_origin(entries: list[Call]) -> tuple[str, str, bool] | None:
    """(name, type, input non-finite) of the first layer, in forward order, whose output (or its
    activation's) holds NaN/Inf; None when the forward is finite throughout (the backward made them)."""
    for c in entries:
        if c.role == "weights":
            continue
        y = c.acts[-1].out if c.acts else c.out
        if not _finite(y) or not _finite(c.out):
            return c.name, type(c.module).__name__, not _finite(c.inp)
    return None


def _waiting_on_zero_init(model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor] | None,
                          cells: Iterable[str | nn.Module], seed: int, entries: list[Call],
                          layers: list[LayerProbe]) -> list[str]:
    """Layers whose ∂L/∂s is exactly 0 because a layer after them starts with an all-zero weight (a zero
    head, ReZero's α, Fixup / `zero_init_residual` branches, adaLN-Zero) that moves at the first update
    (`_moves_from_zero`): they are waiting one step. What they will get then is judged, not assumed: one
    more backward, in a copy of the model whose zero weights are not (`_unzeroed`), gives each layer that
    gets a gradient there its verdict; the others (a dead ReLU, a layer no zero weight is after) keep
    theirs. Calling every zero-gradient layer before a zero weight healthy made a 24-layer sigmoid CNN
    with a zero head read healthy (vanishing without it); calling them vanishing made every ReZero net
    read "initial weights too small for the depth". An all-zero net stays vanishing: its zero layers'
    inputs are zero too, and nothing ever moves."""
    zero = [i for i, (c, x) in enumerate(zip(entries, layers)) if _moves_from_zero(c, x)]
    candidates = [x for x in layers if x.grad_out_norm == 0 and not x.nonfinite] if zero else []
    if not candidates:
        return []
    names = ", ".join(f"'{layers[i].name}'" for i in zero[:5]) + (f", ... ({len(zero)} in all)" if len(zero) > 5 else "")
    try:
        rerun = _unzeroed(model, batch, loss_fn, cells, seed, [_zero_params(entries[i]) for i in zero])
        moved = {x.name: x for x in rerun.layers}
    except Exception as exc:  # noqa: BLE001  a model deepcopy cannot copy: the measured verdicts stand
        return [f"zero-initialised: {names} (all-zero weight) pass no gradient at step 0; the layers waiting "
                f"on them could not be judged as they will be after the first update ({first_line(exc)})"]
    waiting = [x for x in candidates if x.name in moved and moved[x.name].grad_out_norm > 0]
    for x in waiting:
        x.verdict = moved[x.name].verdict
    if not waiting:
        return []
    shown = ", ".join(f"'{x.name}'" for x in waiting[:5])
    shown += f", ... ({len(waiting)} in all)" if len(waiting) > 5 else ""
    counts = {v: sum(x.verdict == v for x in waiting) for v in ("healthy", "vanishing", "exploding", "non-finite")}
    judged = ", ".join(f"{v} {k}" for v, k in counts.items() if k)
    return [f"zero-initialised: {names} (all-zero weight) pass no gradient at step 0 to {shown}, which get "
            f"one after their first update; judged by the gradient they get once those weights are not zero "
            f"(a matrix drawn at random with variance 1/fan-in, a gain set to 1): {judged}"]


def _moves_from_zero(c: Call, x: LayerProbe) -> bool:
    """An all-zero weight the first update moves: a layer's whose output has a gradient and whose input
    is not all zero (∂L/∂W = ∂L/∂s xᵀ), or the parameters of a module without a `.weight` (ReZero's α)
    when they have a gradient."""
    if c.role == "weights" or not isinstance(getattr(c.module, "weight", None), torch.Tensor):  # α, a gain
        return x.grad_w_norm > 0 and bool(c.params) and all(not bool(p.detach().ne(0).any()) for p in c.params)
    return (x.grad_out_norm > 0 and _zero_weight(c.module) and c.inp is not None
            and bool(c.inp.detach().ne(0).any()))


def _zero_params(c: Call) -> list[torch.Tensor]:
    """The parameters that make the layer's weight zero: the weight itself, or, where the weight is
    computed (torch.nn.utils.parametrize: weight_norm's g·v/‖v‖ with g = 0), its all-zero originals."""
    w = getattr(c.module, "weight", None)
    if c.role != "weights" and isinstance(w, nn.Parameter):
        return [w]
    zero = [p for p in c.params if not bool(p.detach().ne(0).any())]
    return zero or list(c.params)


def _unzeroed(model: nn.Module, batch: Any, loss_fn: Callable[[Any], torch.Tensor] | None,
              cells: Iterable[str | nn.Module], seed: int, zero: list[list[torch.Tensor]]) -> ProbeResult:
    """The gradient profile of a copy of `model` whose `zero` weights are not: a matrix or kernel drawn
    at random with variance 1/fan-in (a map that keeps its input's scale, so the profile judges the
    layers before it, not the size the weight will grow to), a vector or scalar set to 1 (a gain: a
    norm's γ, ReZero's α). The global RNG (a model's dropout) is put back."""
    qualname = {id(m): n for n, m in model.named_modules()}
    param_name = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed ^ SEED_OFFSET)
    with torch.no_grad():
        for w in (clone.get_parameter(param_name[id(p)]) for ps in zero for p in ps):
            if w.dim() < 2:
                w.fill_(1.0)
                continue
            fan_in = nn.init._calculate_fan_in_and_fan_out(w)[0]
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64).div_(math.sqrt(fan_in)).to(w))
    named = [qualname.get(id(c), c) if isinstance(c, nn.Module) else c for c in cells]
    with torch.random.fork_rng(devices=[]):
        return probe(clone, batch, loss_fn, iters=0, cells=named, seed=seed)


def _zero_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.numel() > 0 and not bool(w.detach().ne(0).any())


def _frozen_note(model: nn.Module) -> list[str]:
    """Modules whose own parameters are all frozen (requires_grad=False: a fine-tuned model's backbone)
    are not layers; say so, since they vanish from the table."""
    frozen = [n or type(model).__name__ for n, m in model.named_modules()
              if any(True for _ in m.parameters(recurse=False))
              and not any(p.requires_grad for p in m.parameters(recurse=False))]
    if not frozen:
        return []
    shown = ", ".join(frozen[:5]) + (f", ... ({len(frozen)} in all)" if len(frozen) > 5 else "")
    return [f"not layers: modules whose parameters are all frozen (requires_grad=False): {shown}"]


def _functional_acts(model: nn.Module, batch: Any, entries: list[Call], layers: list[LayerProbe]) -> dict[str, str]:
    """Layer -> the activation its output reaches as a function call in the forward (F.relu,
    torch.tanh): those the recorder saw called on the layer's output itself, and, for the layers
    that still have no activation, those one more forward finds by following the data (relu(x +
    f(x)) too), as gw.init_ does with `example_input` (eval mode, no grad, the global RNG put back).
    gw.init_(model) without it sees none: the init remedies written for "no activation" left an
    F.relu MLP vanishing when pasted."""
    called = {c.name: c.acts[-1].activation for c in entries
              if c.acts and isinstance(c.acts[-1].module, Functional) and "#" not in c.name}  # seen on the output
    names = {c.name for c, x in zip(entries, layers) if c.role == "param" and not x.activation and "#" not in c.name}
    if not names or isinstance(batch, dict):
        return called
    detached = [t.detach() if isinstance(t, torch.Tensor) else t
                for t in (batch if isinstance(batch, (tuple, list)) else [batch])]
    example = tuple(detached) if isinstance(batch, (tuple, list)) else detached[0]
    try:
        with torch.random.fork_rng(devices=[]):
            found = by_execution(model, names, example)
    except Exception:  # noqa: BLE001  only advice depends on it: without it, the remedies name no activation
        return called
    return {**called, **{n: a.name for n, a in found.items() if a.name not in ("linear", "softmax")}}


def _example_code(batch: Any) -> str:
    """Code for an input like the probe batch (`torch.randn(16, 32)`), for a remedy to paste; "" for
    a batch that is not tensors."""
    def one(t: Any) -> str:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return ""
        shape = ", ".join(map(str, t.shape))
        if t.is_floating_point():
            dtype = "" if t.dtype == torch.float32 else f", dtype={t.dtype}"
            return f"torch.randn({shape}{dtype})"
        if t.dtype == torch.bool:
            return f"torch.ones({shape}, dtype=torch.bool)"
        return f"torch.randint(0, {int(t.max()) + 1}, ({shape}{',' if t.dim() == 1 else ''}))"
    if isinstance(batch, (tuple, list)):
        parts = [one(t) for t in batch]
        return f"({', '.join(parts)},)" if parts and all(parts) else ""
    return one(batch)


def _init_targets(model: nn.Module, entries: list[Call]) -> set[str]:
    """Layers that `nn.init.kaiming_normal_(model.<name>.weight)` applies to: their module is named
    by the layer and has a trainable `.weight` with a fan-in (≥ 2-D; not an embedding table)."""
    qualname = {id(m): n for n, m in model.named_modules()}
    return {c.name for c in entries
            if isinstance(getattr(c.module, "weight", None), nn.Parameter) and c.module.weight.dim() >= 2
            and not isinstance(c.module, nn.Embedding) and qualname.get(id(c.module)) == c.name.split("#")[0]}


def _normalised(model: nn.Module) -> bool:
    """A normalisation layer anywhere (BatchNorm, LayerNorm, GroupNorm, RMSNorm, and other libraries'
    *Norm classes)."""
    return any("Norm" in type(m).__name__ for m in model.modules())


def _residual(entries: list[Call], loss: torch.Tensor) -> bool:
    """A skip connection in the recorded graph: an addition one of whose operands is a layer's input
    (x + f(x), the input also feeding the layer)."""
    inputs = {c.inp.grad_fn for c in entries if c.inp is not None and c.inp.grad_fn is not None}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        operands = [f for f, _ in node.next_functions]
        if node.name().startswith("AddBackward") and any(f in inputs for f in operands):
            return True
        stack.extend(operands)
    return False


def _std(t: torch.Tensor | None) -> float:
    if t is None or t.numel() < 2 or not (t.is_floating_point() or t.is_complex()):
        return math.nan
    return float(t.detach().float().std())


def _outputs(c: Call) -> list[torch.Tensor]:
    """The tensors s of a layer's output that the loss can depend on: every floating tensor of it that
    requires grad (an LSTM's (out, (h_n, c_n)): a classifier on h_n[-1] never reads `out`)."""
    ts = [t for t in tensors_in(c.raw_out) if t.requires_grad and t.is_floating_point()]
    if c.out is not None and c.out.requires_grad and all(t is not c.out for t in ts):
        ts.insert(0, c.out)
    return ts


def _backward(entries: list[Call], loss: torch.Tensor, retain: bool) -> list[LayerProbe]:
    """Activation statistics, ∂L/∂s and ∂L/∂W per layer, with one autograd.grad call that leaves
    every .grad untouched."""
    outs = list({id(t): t for c in entries for t in _outputs(c)}.values())
    params = [p for c in entries for p in c.params]
    grads = torch.autograd.grad(loss, outs + params, retain_graph=retain, allow_unused=True) if outs + params else ()
    by_id = {id(t): g for t, g in zip(outs + params, grads)}
    layers = []
    for i, c in enumerate(entries):
        act = c.acts[-1] if c.acts else None
        y = act.out if act is not None else c.out
        kind = "Parameter" if c.role == "weights" else type(c.module).__name__
        x = LayerProbe(i, c.name, kind, act.activation if act else "")
        if y is not None and y.is_floating_point():
            x.act_mean, x.act_std, x.saturated, x.dead = (float(v) for v in activation_stats(y, x.activation))
        g = [by_id[id(t)] for t in _outputs(c) if by_id.get(id(t)) is not None]
        if g:
            x.grad_out_norm, x.grad_out_std = _norm_std(g)
            x.nonfinite += _nonfinite(g, x.grad_out_norm)
        gw = [by_id[id(p)] for p in c.params if by_id.get(id(p)) is not None]
        if gw:
            x.grad_w_norm, x.grad_w_std = _norm_std(gw)
            x.nonfinite += _nonfinite(gw, x.grad_w_norm)
        layers.append(x)
    for a, b in zip(layers, layers[1:]):
        if b.grad_out_norm > 0:
            a.grad_ratio = (a.grad_out_norm / b.grad_out_norm) ** 2
    return layers


NORM_BLOCK = 1 << 16  # elements per block: small enough to stay in cache


def _norm_std(ts: list[torch.Tensor]) -> tuple[float, float]:
    """‖·‖ and std of the tensors as one vector, block by block: each block scaled by the power of two
    just above its largest |entry| (exact), its sum of squares, mean and squared deviations taken in float32
    (float64 for float64 gradients), merged in float64 by Chan et al.'s update relative to a running
    scale (as LAPACK's nrm2 does); within 1e-6 of a float64 recomputation from 1e-30 to 1e30. Unscaled,
    float32 squares underflow below ~1e-19: a vanishing gradient of 1e-22 read 0. The float64
    concatenation used before was 0.8 GB of a 49M-parameter model's 1.4 GB peak, and 1.9 s of its 3.8 s probe."""
    n, mean, scale, m2, sq = 0, 0.0, 0.0, 0.0, 0.0  # m2, sq in units of scale²
    worst = 0.0  # Inf or NaN once an entry is
    for t in ts:
        for block in t.detach().reshape(-1).split(NORM_BLOCK):
            k = block.numel()
            b = block if block.dtype in (torch.float32, torch.float64) else block.float()
            amax = float(b.abs().max()) if k else 0.0
            if not math.isfinite(amax):
                worst = worst if math.isnan(worst) else amax
                continue
            if amax > scale:  # rescale what is accumulated to the new, larger unit
                r = (scale / amax) ** 2
                sq, m2, scale = sq * r, m2 * r, amax
            e = -math.frexp(amax)[1]
            s = _times_pow2(b, e)  # |s| < 1: no square overflows, none that matters underflows
            u = math.ldexp(1.0, -e) / scale if scale else 0.0  # one unit of s, in units of scale
            bmean = float(s.mean()) if k else 0.0
            d, total = math.ldexp(bmean, -e) - mean, n + k
            if total and scale:
                mean += d * k / total
                m2 += float((s - bmean).pow_(2).sum()) * u * u + (d / scale) ** 2 * n * k / total
                sq += float(s.pow(2).sum()) * u * u
            n = total
    if not math.isfinite(worst):
        return worst if math.isnan(worst) else math.inf, math.nan
    return scale * math.sqrt(sq), scale * math.sqrt(m2 / (n - 1)) if n > 1 else 0.0


def _times_pow2(b: torch.Tensor, e: int) -> torch.Tensor:
    """b · 2**e, exactly, in steps a float32 scalar can hold (2**149 cannot)."""
    while e:
        step = max(-100, min(100, e))
        b, e = b * 2.0 ** step, e - step
    return b


def _nonfinite(ts: list[torch.Tensor], norm: float) -> int:
    """NaN/Inf entries, counted only when their norm is not finite (a NaN or Inf entry makes it so)."""
    return 0 if math.isfinite(norm) else sum(int((~torch.isfinite(t)).sum()) for t in ts)


def _jacobians(entries: list[Call], layers: list[LayerProbe], out: torch.Tensor | None, iters: int,
               gen: torch.Generator, progress: Callable[[int, int, str], None] | None = None) -> list[str]:
    """σmax / σmean / σrms of the Jacobian from each layer's input to the next layer's input that
    depends on it (the model's output for the last layer). Returns notes on layers left out."""
    notes = []
    for i, (c, x) in enumerate(zip(entries, layers)):
        if progress is not None:
            progress(i, len(entries), c.name)
        inp = c.inp
        if inp is None or not inp.requires_grad or not inp.is_floating_point():
            continue
        later = [(e.name, e.inp) for e in entries[i + 1:i + 1 + NEXT_LAYER_TRIES]] + [("output", out)]
        own = c.acts[-1].out if c.acts else c.out
        for name, nxt in later + [("output", own)]:
            if nxt is None or not nxt.requires_grad or nxt is inp:
                continue
            try:
                jvp, vjp = graph_ops(nxt, inp, via=_outputs(c))
            except (ValueError, RuntimeError):
                continue
            try:
                lanczos = min(LANCZOS_STEPS, iters)
                s = spectrum(jvp, vjp, inp.detach(), nxt.shape, iters=iters - lanczos, lanczos=lanczos,
                             generator=gen, max_probes=_probes(c))
            except RuntimeError as exc:  # an op without a double backward
                notes.append(f"{c.name}: no Jacobian ({str(exc).splitlines()[0][:120]})")
                break
            x.sigma_max, x.sigma_mean, x.sigma_rms, x.jacobian_to = s.top, s.mean, s.rms, name
            break
    if progress is not None:
        progress(len(entries), len(entries), "")
    return notes


def _pooling_scales(rec: Recorder, entries: list[Call]) -> list[float]:
    """√P for the layers that run before the head's global average pool over P positions, else 1.

    The pool's Jacobian (1/P)·1ᵀ has one singular value, 1/√P: every ‖∂L/∂s‖ upstream of it shrinks by
    1/√P as the input resolution grows, while what a conv weight feels, Σ_p ∂L/∂s_p x_pᵀ, sums P
    positions and does not. It is a change of units, not a loss of gradient, so it is divided out."""
    head = rec.head_pool()
    if head is None:
        return [1.0] * len(entries)
    order = {id(c): i for i, c in enumerate(rec.calls)}
    at, positions = head
    return [math.sqrt(positions) if order.get(id(c), at) < at else 1.0 for c in entries]


def _probes(c: Call) -> int:
    """SLQ probe vectors for a layer's block: one for a recurrent layer, whose every product is a
    double backward through the whole sequence (its σmax comes from power iteration anyway)."""
    return 1 if c.role == "recurrent" else MAX_PROBES


def _gain_to_top(layers: list[LayerProbe], scales: list[float]) -> None:
    """‖∂L/∂s‖ (times its pooling scale) over the output-most layer's."""
    scaled = [x.grad_out_norm * k for x, k in zip(layers, scales)]
    top = next((g for g in reversed(scaled) if g > 0), math.nan)
    for x, g in zip(layers, scaled):
        x.gain_to_top = g / top if top > 0 else math.nan


def _mean_field(entries: list[Call], layers: list[LayerProbe]) -> tuple[meanfield.MeanField | None, str, float]:
    """The mean-field prediction for a plain MLP (Linear layers, one elementwise activation kind)."""
    if len(entries) < 2 or not all(isinstance(c.module, nn.Linear) for c in entries):
        return None, "not computed: it needs an MLP (only nn.Linear layers, one kind of activation)", math.nan
    hidden = entries[:-1]
    acts = {a.activation for c in hidden for a in c.acts}
    if len(acts) != 1 or any(len(c.acts) != 1 for c in hidden):
        return None, "not computed: it needs one activation after every hidden nn.Linear", math.nan
    sw2 = statistics.median(_norm_std([c.module.weight])[0] ** 2 / c.module.out_features for c in hidden)
    sb2 = statistics.median(float(c.module.bias.detach().double().pow(2).mean()) if c.module.bias is not None else 0.0
                            for c in hidden)
    rates = {tuple(d.module.p for d in c.drops) for c in hidden}
    if len(rates) != 1 or len(next(iter(rates))) > 1:
        return None, "not computed: it needs the same dropout after every hidden nn.Linear", math.nan
    keep = math.prod(1.0 - p for p in rates.pop())
    s0 = hidden[0].out  # the first layer's pre-activations: where the variance map starts
    q0 = float(s0.detach().double().pow(2).mean()) if s0 is not None and s0.is_floating_point() else math.nan
    mf = meanfield.predict(hidden[0].acts[0].module, acts.pop(), sw2, sb2, len(entries), keep, q0)
    ratios = [x.grad_ratio for x in layers[1:-2] if math.isfinite(x.grad_ratio)]  # hidden→hidden steps
    return mf, "", statistics.median(ratios) if ratios else math.nan


def _recurrent(rec: Recorder, gen: torch.Generator) -> list[recurrent.RecurrentProbe]:
    out = []
    for c in rec.recurrent():
        x = c.args[0] if c.args else None
        hx = c.args[1] if len(c.args) > 1 else None
        if isinstance(x, (torch.Tensor, nn.utils.rnn.PackedSequence)):
            out += recurrent.probe_module(c.name, c.module, x, hx, gen)
    calls: dict[int, list[Call]] = {}
    for c in rec.cells():
        calls.setdefault(id(c.module), []).append(c)
    for seq in calls.values():
        first = seq[0]
        xs = [c.args[0].detach() for c in seq]
        h0 = first.args[1] if len(first.args) > 1 else None
        if h0 is None:  # the cell's own zero state: shape it like its first output
            y = first.raw_out
            h0 = tuple(torch.zeros_like(t) for t in y) if isinstance(y, tuple) else torch.zeros_like(y)
        w = getattr(first.module, "weight_hh", None)
        nonlin = getattr(first.module, "nonlinearity", "tanh")
        if isinstance(first.module, (nn.LSTMCell, nn.GRUCell)):
            w = recurrent.candidate_block(w, first.module.hidden_size, lstm=isinstance(first.module, nn.LSTMCell))
        r = recurrent.probe_cell(first.module, xs, h0, name=first.name, w_hh=w, nonlinearity=nonlin, generator=gen)
        r.kind = type(first.module).__name__
        r.gate_bias = recurrent.gate_bias(first.module)
        out.append(r)
    return out
