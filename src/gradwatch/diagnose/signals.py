"""Small views of a `RunSeries` the rules share: depth profiles, totals, windows, persistence."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable

import numpy as np

from gradwatch.store.rows import RecordedRows
from gradwatch.store.series import WEIGHT_ROLES, RunSeries

# Layers whose gradients say nothing about depth: normalisation layers (scale-invariant, weights
# near 1) and embeddings (a gradient only on the rows a batch touches).
NOT_IN_PROFILE = ("Norm", "Embedding")
# Class names of torch's weight layers, their lazy and quantisable kin (LazyConv2d,
# NonDynamicallyQuantizableLinear) and Hugging Face's Conv1D; not a model named ConvNet.
WEIGHT_LAYER_TYPE = re.compile(r"(Linear|Bilinear|Conv(Transpose)?[123]d|Conv1D)$")


def profile_columns(run: RunSeries) -> list[int]:
    """Columns of the layers that form the depth profile, input first: those owning weights that
    transform the signal (Linear, Conv, attention, recurrent), not norms or embeddings, nor a single
    number (a learnt temperature or logit scale, a ReZero gate): it has no fan-in to pass a signal
    through, and a model's own bare parameter runs first, so it stood as the lowest layer (a CLIP
    logit scale at 200x the towers' lr was called stalled beside them)."""
    cols = [
        i for i, layer in enumerate(run.layers)
        if layer.role in WEIGHT_ROLES and not any(t in layer.type for t in NOT_IN_PROFILE)
        and (layer.n_params != 1 or _weight_layer(layer.type))
    ]
    return sorted(cols, key=lambda i: run.layers[i].index)


def _weight_layer(type_name: str) -> bool:
    """A module whose weight maps its input (Linear, Conv, Bilinear and their lazy or quantised
    kin), which stays a layer with one number (the textbook chain of nn.Linear(1, 1) and sigmoids);
    a bare parameter is recorded under its owner's class (the model's, a block's) instead."""
    return WEIGHT_LAYER_TYPE.search(type_name) is not None


def same_role_columns(run: RunSeries, cols: list[int]) -> list[int]:
    """In a stack of repeated blocks (`layer.0.attention.query` ... `layer.11.attention.query`),
    the lowest layer's counterparts in every block; else all of `cols`. Depth is then judged
    like with like: in a transformer the query and key projections get ~1e-8 of ∂L/∂s at init in
    every block alike (near-uniform attention), while a pooler over one token gets the RMS of a
    tensor without a sequence axis; neither is a gradient vanishing toward the input."""
    if not cols:
        return cols
    parts = run.layers[cols[0]].name.split(".")
    if not any(p.isdigit() for p in parts[:-1]):  # no block index: an MLP's `0`, `2`, ... or `fc1`
        return cols
    role = _role(run.layers[cols[0]].name)
    same = [c for c in cols if _role(run.layers[c].name) == role]
    return same if len(same) >= 2 else cols


def _role(name: str) -> str:
    return ".".join("#" if p.isdigit() else p for p in name.split("."))


def normalised_columns(run: RunSeries) -> set[int]:
    """Layers whose output goes straight into a normalisation layer (Linear -> BatchNorm ...).
    Their gradient is scale-invariant (∂L/∂W ∝ 1/‖W‖), so ‖∂L/∂W‖/‖W‖ falls as 1/‖W‖² when the
    weights grow, whatever the backward signal does: judge them by ∂L/∂s instead."""
    by_index = sorted(range(len(run.layers)), key=lambda i: run.layers[i].index)
    out = set()
    for a, b in zip(by_index, by_index[1:]):
        if run.layers[a].role in WEIGHT_ROLES and "Norm" in run.layers[b].type:
            out.add(a)
    return out


def activation_columns(run: RunSeries) -> list[int]:
    """Columns of the activation modules (ReLU, Sigmoid...), of the recurrent layers whose output
    comes through one (an RNN's tanh, an LSTM's o·tanh(c)), and of the weight layers whose output
    forward() passes through one called as a function (F.relu): where dead and saturated units show."""
    return [i for i, layer in enumerate(run.layers) if layer.role == "activation" or layer.activation]


def last_weight_index(layers) -> int:
    """The forward index of the last weight layer (-1: none): an activation after it, or a function
    on its output, is the output's own (a sigmoid giving BCELoss its probabilities)."""
    return max((l.index for l in layers if l.role in WEIGHT_ROLES), default=-1)


def optimizer_switches(run: RunSeries) -> list[int]:
    """The steps after the run's first where a new optimizer took over from one that trained
    other weights (meta `optimizer_stopped`), each once, in order: a new task may start there (a
    fine-tune's new head), so the loss and the gradient's level are read on either side apart."""
    return sorted({int(s) for s, _ in run.meta.get("optimizer_stopped") or [] if len(run.steps) and s > run.steps[0]})


def outputs_own(run: RunSeries) -> set[str]:
    """The activations the watch saw the loss take through no weight layer (the run's meta): the
    output's own, also a head's that another head runs after, which `last_weight_index` alone takes
    for hidden (a tester's objectness sigmoid, then a box head: a saturation warning, "lower the lr",
    on confident probabilities)."""
    return set(run.meta.get("output_layers") or ())


def hidden_layers(run: RunSeries) -> set[str]:
    """The names of the layers that run before the last weight layer, but those the loss takes
    through no weight layer (`outputs_own`): the layers whose activations are hidden ones, which the
    rules judge and fix swaps. One on the last weight layer's output, or after it, is the output's."""
    last, own = last_weight_index(run.layers), outputs_own(run)
    return {l.name for l in run.layers if l.index < last and l.name not in own}


def functional_activation(layer) -> bool:
    """A weight layer recorded with the activation forward() calls as a function on its output
    (F.relu(self.fc1(x))): no module to swap, a line of forward() to change."""
    return layer.role == "param" and bool(layer.activation)


# How forward() calls each activation the watch finds called as a function (`collect/functional_acts`)
FUNCTIONS = {"relu": "F.relu", "sigmoid": "torch.sigmoid", "tanh": "torch.tanh"}


def quoted(run: RunSeries, name: str) -> str:
    """A layer named in a message: `'a1'`, or `F.relu('fc1')` for the activation called as a
    function on a weight layer's output (its units are that function's, not the layer's own)."""
    layer = run.layers[run.column(name)]
    if functional_activation(layer):
        return f"{FUNCTIONS.get(layer.activation, layer.activation)}('{name}')"
    return f"'{name}'"


def lowest_activation(run: RunSeries) -> str:
    """The activation layer nearest the input (forward order): the one the inputs' scale reaches
    first ("" when there is none)."""
    cols = activation_columns(run)
    return run.layers[min(cols, key=lambda c: run.layers[c].index)].name if cols else ""


def first_layer_scale(run: RunSeries, limit: float) -> float | None:
    """The std of the activations nearest the input at the first step, when it is `limit` or more
    and the run is from its initial weights: inputs far from unit scale (a layer initialised for
    its fan-in passes them on at about their own scale). None otherwise."""
    first = lowest_activation(run)
    std = run.metrics.get("act_std")
    if not first or std is None or not len(run.steps) or not from_init(run):
        return None
    value = float(std[0, run.column(first)])
    return value if np.isfinite(value) and value >= limit else None


def recurrent_layers(run: RunSeries) -> set[str]:
    """The names of the recurrent layers (nn.RNN, GRU, LSTM)."""
    return {layer.name for layer in run.layers if layer.role == "recurrent"}


def names(run: RunSeries, cols: Iterable[int]) -> tuple[str, ...]:
    """The layer names of columns, in the order given: what a finding lists."""
    return tuple(run.layers[i].name for i in cols)


def plain_sgd(run: RunSeries) -> bool:
    """SGD without momentum: each update is lr·g, so its length follows from the gradient's."""
    return run.meta.get("optimizer") in ("SGD", "ASGD") and not run.meta.get("momentum", 0.0)


def total_grad_norm(run: RunSeries, stepped_only: bool = False) -> np.ndarray:
    """sqrt(Σ over layers of grad_norm²) per step: NaN where nothing was recorded, inf where any
    layer's gradient was not finite. `stepped_only`: only the gradients an optimizer uses; those
    of weights none steps (meta `outside_optimizers`, or `optimizer_stopped` from that step on)
    are never consumed, and where no zero_grad() clears them (the optimizer's own clears only
    its weights) they accumulate, step after step: a backbone left requires_grad when only the
    head's optimizer goes on grew 1.2 -> 100 in 10 steps, which is no exploding gradient.
    Computed TOTAL_BLOCK rows at a time: whole, its temporaries were four steps x layers arrays
    (0.8 GB at 50k steps x 480 layers); each row's sum is the same. Within one `diagnose` call
    (`norms_kept`) each is computed once, read-only: three rules read it (0.9 s each at 50k x 480)."""
    kept = run.__dict__.get(_KEPT)
    if kept is None:
        return _summed_norms(run, stepped_only)
    if stepped_only not in kept:
        kept[stepped_only] = _summed_norms(run, stepped_only)
        kept[stepped_only].flags.writeable = False
    return kept[stepped_only]


_KEPT = "_total_grad_norms"


@contextmanager
def norms_kept(runs: list[RunSeries]):
    """`total_grad_norm` of each of `runs` computed once while in this block, and forgotten after
    it: a series changed later (a test bending one, a live run grown) is summed again."""
    for run in runs:
        run.__dict__[_KEPT] = {}
    try:
        yield
    finally:
        for run in runs:
            run.__dict__.pop(_KEPT, None)


def _summed_norms(run: RunSeries, stepped_only: bool) -> np.ndarray:
    g = run.metrics.get("grad_norm")
    if g is None or g.size == 0:
        return np.full(len(run.steps), np.nan)
    unused_from = _unused_from(run) if stepped_only else None
    total = np.empty(len(g))
    for a in range(0, len(g), TOTAL_BLOCK):
        block = np.asarray(g[a:a + TOTAL_BLOCK])
        if unused_from is not None:
            block = np.where(np.arange(a, a + len(block))[:, None] >= unused_from, np.nan, block)
        recorded = ~np.isnan(block)
        with np.errstate(over="ignore", invalid="ignore"):
            part = np.sqrt(np.square(np.where(recorded, block, 0.0)).sum(axis=1))
        part[~recorded.any(axis=1)] = np.nan
        total[a:a + len(block)] = part
    return total


TOTAL_BLOCK = 4096  # rows of `total_grad_norm`'s temporaries: 16 MB each at 480 layers


def _unused_from(run: RunSeries) -> np.ndarray:
    """Per column, the first row from which no optimizer uses its gradient (len(steps): never)."""
    first = np.full(len(run.layers), len(run.steps), dtype=np.int64)
    layer_names = run.layer_names()
    for name in run.meta.get("outside_optimizers") or []:
        if name in layer_names:
            first[layer_names.index(name)] = 0
    for step, layers in run.meta.get("optimizer_stopped") or []:
        row = int(np.searchsorted(run.steps, step))  # the first row with steps >= step
        for name in layers:
            if name in layer_names:
                c = layer_names.index(name)
                first[c] = min(first[c], row)
    return first


def sampled_rows(run: RunSeries, metric: str, cols: list[int]) -> np.ndarray:
    """Rows where `metric` was recorded for at least one of `cols`."""
    m = run.metrics.get(metric)
    if m is None or not cols:
        return np.empty(0, dtype=np.int64)
    if isinstance(m, RecordedRows) and np.isnan(m.fill):  # from the rows it keeps, not a steps x cols array
        return m.rows[~np.isnan(m.values[:, cols]).all(axis=1)]
    return np.flatnonzero(~np.isnan(m[:, cols]).all(axis=1))


def persistent_start(condition: np.ndarray, persist: int, *, to_the_end: bool = False) -> int | None:
    """Index where a run of True values that counts as persistent begins, else None.

    Persistent: at least `persist` consecutive samples (all of them if there are fewer), and the
    streak either reaches the last sample or covers at least a quarter of all samples (a net stuck
    for a quarter of its run had a problem, even if it got out of it). `to_the_end`: only a streak
    that still holds at the last sample counts.
    """
    n = len(condition)
    if n == 0:
        return None
    need = min(persist, n)
    start = None
    for i, c in enumerate(condition):
        if c and start is None:
            start = i
        if (not c or i == n - 1) and start is not None:
            end = i + 1 if c else i
            length = end - start
            if length >= need and (end == n or (length >= n / 4 and not to_the_end)):
                return start
            start = None
    return None


def periodic(events: np.ndarray, th) -> bool:
    """Whether the steps `events` (sorted) keep time: every gap within `th.period_tolerance` of a
    whole number of periods (the median gap; a reset that changed little leaves no event), and at
    least `th.periodic_events` - 1 gaps of one period. A schedule in the script (a target network
    synced, an epoch of data in the same order) repeats exactly; an instability does not keep time."""
    if len(events) < th.periodic_events:
        return False
    gaps = np.diff(events).astype(float)
    period = float(np.median(gaps))
    if period <= 0:
        return False
    whole = np.maximum(np.round(gaps / period), 1)
    near = np.abs(gaps - whole * period) <= th.period_tolerance * period
    return bool(near.all() and (near & (whole == 1)).sum() >= th.periodic_events - 1)


def peaks_growing(peaks: np.ndarray, th) -> bool:
    """Whether the later half of a schedule's peaks (in order) has its median `schedule_peak_growth`x
    that of the earlier half or more: a target network's syncs re-set targets of one scale, so
    their peaks scatter (a DQN's: 1-3x its first, halves' medians equal), while warm restarts that
    blow up grow (1033 -> 4263, halves 2.7x apart). Halves, not the first peak: one small first
    peak would make every later one look grown."""
    half = len(peaks) // 2
    return half > 0 and bool(np.median(peaks[-half:]) >= th.schedule_peak_growth * np.median(peaks[:half]))


def noted_in(run: RunSeries, step: int) -> bool:
    """A step the watch noted (an event: a carry-over, a late clip) falls in this run or phase of
    steps: from its first recorded step to one record past its last."""
    every = int(run.meta.get("every") or 1)
    return len(run.steps) > 0 and int(run.steps[0]) <= step <= int(run.steps[-1]) + every


def first_noted(run: RunSeries, key: str) -> tuple[int, dict] | None:
    """(step, detail) of the first event of `key` the reader kept as the run's meta (a late clip, a
    repeated backward, a loss's broadcast shapes), when it falls in this run or phase of steps."""
    said = run.meta.get(key) or []
    if not said:
        return None
    step, detail = int(said[0][0]), said[0][1]
    return (step, detail) if noted_in(run, step) else None


def row_reduce(reduce, values: np.ndarray) -> np.ndarray:
    """`reduce` (np.nanmedian, np.nanmax) of each row holding a finite value, NaN for the others,
    with no RuntimeWarning to silence: `warnings.catch_warnings()` in a live check reset Python's
    record of warnings shown, and the script's own warnings (torch's, once per line) were shown
    again at every check."""
    out = np.full(len(values), np.nan)
    some = np.isfinite(values).any(axis=1)
    if some.any():
        out[some] = reduce(values[some], axis=1)
    return out


def skipped_after_last(run: RunSeries) -> int:
    """Iterations a GradScaler skipped after the last stored step, to the end (its step counter
    stays while it skips: all at the last step + 1)."""
    last = int(run.steps[-1]) if len(run.steps) else -1
    return sum(1 for s in run.meta.get("skipped_steps") or () if s == last + 1)


def from_init(run: RunSeries) -> bool:
    """The run's first recorded step is its training's first, before any update: not a training
    resumed from a checkpoint (`gradwatch run` stores meta `resumed`), whose first step has trained
    weights, so "at the first step" must not read as "at initialisation"."""
    return not run.meta.get("resumed")


def zero_initialised(run: RunSeries) -> list[str]:
    """Weight layers whose parameters are all exactly 0 at the run's first step and that block the
    gradient there: their units compute the same 0 for every sample and pass W^T δ = 0 down. The
    finding they cause reads as dead units under ReLU or tanh (exact zeros), as a vanishing gradient
    under sigmoid (0.5 is no zero): either way they are its first cause. The last layer alone is no
    such cause (it blocks for one step), nor a zero layer beside a skip (an adapter's `up`, LoRA's B,
    a ControlNet zero conv: the block starts as the identity and the skip carries the gradient), nor
    a gate that starts at 0 on purpose: a single number (ReZero) or a norm's gain, not in the profile."""
    w = run.metrics.get("weight_norm")
    if w is None or len(run.steps) == 0:
        return []
    cols = profile_columns(run)
    zero = [c for c in cols if w[0, c] == 0]
    if not any(_blocks(run, cols, c) for c in zero if c != cols[-1]):
        return []
    return [run.layers[c].name for c in zero if c == cols[-1] or _blocks(run, cols, c)]


def _blocks(run: RunSeries, cols: list[int], c: int) -> bool:
    """Whether zero layer `c` cut the gradient at the first row: every profile layer below it got
    δ = ∂L/∂s exactly 0 there, read as ∂L/∂s or as ∂L/∂W = δ x^T (a skip around it keeps them), or,
    lowest itself, its own ∂L/∂W was 0. A layer with neither recorded there says nothing."""
    below = cols[:cols.index(c)]
    cut = [_zero_at_first(run, b, ("grad_out_rms", "grad_norm")) for b in below] if below else \
        [_zero_at_first(run, c, ("grad_norm",))]
    return all(z for z in cut if z is not None)


def _zero_at_first(run: RunSeries, col: int, metrics: tuple[str, ...]) -> bool | None:
    """Any of `metrics` exactly 0 at the first row of `col`; None where none was recorded."""
    seen = [float(run.metrics[m][0, col]) for m in metrics if m in run.metrics]
    seen = [v for v in seen if np.isfinite(v)]
    return any(v == 0 for v in seen) if seen else None


def rows_before_non_finite_loss(run: RunSeries) -> int:
    """Rows before the first non-finite loss (all of them if none). From there on the activations
    and gradients are NaN/Inf: what they show is that (the non_finite finding says it), not dead,
    saturated or cut-off units."""
    bad = np.flatnonzero(np.isinf(run.loss))
    return int(bad[0]) if len(bad) else len(run.steps)


def window(n: int, min_window: int) -> int:
    """Steps in a window of a run of `n` steps: a tenth of it, at least `min_window`."""
    return max(min_window, n // 10)


def finite_loss(run: RunSeries) -> tuple[np.ndarray, np.ndarray]:
    """(steps, loss) where a finite loss was recorded."""
    keep = np.isfinite(run.loss)
    return run.steps[keep], run.loss[keep]


def lowest_over_highest(values: np.ndarray) -> np.ndarray:
    """Per row of a depth profile (rows x layers, input first): the lowest layer's entry over the
    largest entry above it, among the finite, non-negative ones. NaN where fewer than two layers
    have one, or none above the lowest is positive. One pass over the array: a loop over the rows
    was a quarter of a whole diagnosis (20 µs a sampled step)."""
    v = np.asarray(values, dtype=float)
    if v.shape[1] < 2:
        return np.full(len(v), np.nan)
    valid = np.isfinite(v) & (v >= 0)
    first = np.argmax(valid, axis=1)  # the lowest layer with a value (0 in a row with none: no entry above it)
    lowest = v[np.arange(len(v)), first]
    above = valid & (v > 0) & (np.arange(v.shape[1]) > first[:, None])
    highest = np.where(above, v, -np.inf).max(axis=1, initial=-np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(above.any(axis=1), lowest / highest, np.nan)


def depth_profile(run: RunSeries, quantity: str, hidden_only: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(row indices, values rows × layers, columns) of a depth profile at the sampled steps.

    quantity "relative_grad" is ‖∂L/∂W‖/‖W‖, "grad_out_rms" the RMS of ∂L/∂(layer output),
    "update_ratio" ‖Δw‖/‖w‖. `hidden_only` drops the top layer, whose output gradient comes
    straight from the loss and whose width (the number of classes) differs from the rest."""
    cols = profile_columns(run)
    if hidden_only:
        cols = cols[:-1]
    if quantity == "relative_grad":
        normalised = normalised_columns(run)
        cols = [c for c in cols if c not in normalised]
        g, w = run.metrics.get("grad_norm"), run.metrics.get("weight_norm")
        if g is None or w is None or not cols:
            return np.empty(0, dtype=np.int64), np.empty((0, len(cols))), cols
        rows = sampled_rows(run, "weight_norm", cols)
        gs, ws = g[rows][:, cols], w[rows][:, cols]
        with np.errstate(divide="ignore", invalid="ignore"):
            return rows, np.where(ws > 0, gs / ws, np.nan), cols
    m = run.metrics.get(quantity)
    if m is None or not cols:
        return np.empty(0, dtype=np.int64), np.empty((0, len(cols))), cols
    rows = sampled_rows(run, quantity, cols)
    return rows, m[rows][:, cols], cols


def time_ratio(profile: np.ndarray, edge: int = 3) -> np.ndarray:
    """Per profile row: the gradient at the first time steps over that at the last (medians of
    `edge` steps each, robust to one odd step)."""
    start = np.nanmedian(profile[:, :edge], axis=1)
    end = np.nanmedian(profile[:, -edge:], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(end > 0, start / end, np.nan)


def persistent_activation_layers(run: RunSeries, metric: str, limit: float, persist: int, *,
                                 exclude: Iterable[str] = (), only: Iterable[str] | None = None
                                 ) -> dict[str, tuple[int, float, bool]]:
    """{layer: (first step, median value from then on, starts at init)} for activation layers whose
    `metric` stays at or above `limit` persistently."""
    m = run.metrics.get(metric)
    out = {}
    if m is None:
        return out
    end = rows_before_non_finite_loss(run)
    for c in activation_columns(run):
        act = run.layers[c].activation
        if act in exclude or (only is not None and act not in only):
            continue
        rows = np.flatnonzero(np.isfinite(m[:end, c]))
        if len(rows) == 0:
            continue
        values = m[rows, c]
        start = persistent_start(values >= limit, persist)
        if start is not None:
            out[run.layers[c].name] = (int(run.steps[rows[start]]), float(np.median(values[start:])),
                                         start == 0 and from_init(run))
    return out


def summarise_layers(run: RunSeries, hits: dict) -> tuple[int, tuple[str, ...], str, float, bool]:
    """(first step, layers in forward order, the layer of the worst value, that value, any from the
    first step) of the `persistent_activation_layers` result."""
    first = min(step for step, _, _ in hits.values())
    layers = tuple(sorted(hits, key=lambda n: run.layers[run.column(n)].index))
    worst_layer = max(layers, key=lambda n: hits[n][1])
    return first, layers, worst_layer, hits[worst_layer][1], any(at_init for _, _, at_init in hits.values())


def row_nanpercentile(rows: np.ndarray, q: float) -> np.ndarray:
    """`np.nanpercentile(rows, q, axis=1)` (linear interpolation, the same numbers), vectorised:
    numpy's loops in Python over the rows holding a NaN, which was 6.5 s of a 12k-step run's 9.3 s
    of diagnosis (the first rows of every baseline window are NaN). All-NaN rows give NaN."""
    ordered = np.sort(rows, axis=1)  # NaN last
    count = (~np.isnan(rows)).sum(axis=1)
    position = np.maximum(count - 1, 0) * (q / 100)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, np.maximum(count - 1, 0))
    a = np.take_along_axis(ordered, below[:, None], axis=1)[:, 0]
    b = np.take_along_axis(ordered, above[:, None], axis=1)[:, 0]
    t = position - below
    with np.errstate(invalid="ignore"):  # inf - inf where both ends are inf
        out = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)  # numpy's own lerp
    out[count == 0] = np.nan
    return out

