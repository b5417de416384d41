"""One step's measurements while they live on the device, and their reduction to store rows.

The training thread only appends device tensors here; the host reads them once per flush
(`to_batch`), so a step costs a handful of kernel launches and no synchronisation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gradwatch.collect.layers import Layer
from gradwatch.collect.stats import MISSING
from gradwatch.store.schema import LAYER_COLUMNS
from gradwatch.store.writer import FlushBatch


@dataclass
class StepRecord:
    step: int
    sampled: bool
    grad: torch.Tensor | None = None  # per-parameter gradient L2 norms (MISSING = no grad)
    grad_max: torch.Tensor | None = None  # per-parameter max |g|
    weight: torch.Tensor | None = None  # per-parameter weight norms before the update
    delta: torch.Tensor | None = None  # per-parameter ||w_after - w_before||
    nonfinite: dict[int, int] | None = None  # parameter index -> count (None: not counted)
    loss_sum: torch.Tensor | None = None
    loss_n: int = 0
    loss_explicit: bool = False  # set by Watch.record_loss: backward calls no longer add to it
    lrs: list[float] = field(default_factory=list)
    wall_time: float = 0.0
    # layer position -> [sum of stats, calls]; modules called several times per step are averaged
    act: dict[int, list] = field(default_factory=dict)
    out_rms: dict[int, list] = field(default_factory=dict)
    profiles: dict[int, torch.Tensor] = field(default_factory=dict)

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().reshape(()).float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_n += 1

    def forget_backwards(self) -> None:
        """Drop what the backwards so far added (loss, gradients, ∂L/∂output, time profiles): no
        optimizer step used their gradients. What the forward measured stays."""
        self.loss_sum, self.loss_n, self.loss_explicit = None, 0, False
        self.grad = self.grad_max = self.weight = None
        self.nonfinite = None
        self.out_rms, self.profiles = {}, {}

    def accumulate(self, table: dict[int, list], pos: int, value: torch.Tensor) -> None:
        slot = table.get(pos)
        if slot is None:
            table[pos] = [value, 1]
        else:
            slot[0] = slot[0] + value
            slot[1] += 1

    def finish(self, lrs: list[float]) -> None:
        self.lrs = lrs
        self.wall_time = time.time()


def _segments(layers: list[Layer]) -> tuple[list[int], np.ndarray]:
    """Positions of the layers that own parameters, and where each one's parameters start."""
    owners = [i for i, layer in enumerate(layers) if layer.params]
    starts, offset = [], 0
    for i in owners:
        starts.append(offset)
        offset += len(layers[i].params)
    return owners, np.array(starts, dtype=np.int64)


def measured(values: np.ndarray) -> np.ndarray:
    """Store convention: NaN means "not recorded", so a measured NaN is kept as +inf (non-finite)."""
    return np.where(np.isnan(values), np.inf, values)


def _stack(values: list[torch.Tensor | None], width: int) -> np.ndarray:
    """Rows of per-parameter values as one host array (NaN rows where a step has none)."""
    out = np.full((len(values), width), np.nan)
    present = [i for i, v in enumerate(values) if v is not None]
    if present and width:
        out[present] = measured(torch.stack([values[i].float().cpu() for i in present]).numpy())
    return out


def _host(totals: list[torch.Tensor], calls: list[int]) -> np.ndarray:
    """Per-call means of sums over a step (rows: `totals[i] / calls[i]`), divided on the device as
    before and read to the host in one copy, not one per layer."""
    try:  # (not a set of the devices first: 10k device objects cost a flush ~5 ms)
        stacked = torch.stack(totals)
    except RuntimeError:  # a model split over devices
        stacked = torch.stack([t.cpu() for t in totals])
    stacked = stacked.float().reshape(len(totals), -1)
    return (stacked / torch.tensor(calls, dtype=stacked.dtype, device=stacked.device)[:, None]).cpu().numpy()


def _layer_l2(per_param: np.ndarray, starts: np.ndarray) -> np.ndarray:
    missing = per_param == MISSING
    squares = np.where(missing, 0.0, per_param) ** 2
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.sqrt(np.add.reduceat(squares, starts, axis=1))
    out[np.logical_and.reduceat(missing, starts, axis=1)] = np.nan
    return out


def _layer_max(per_param: np.ndarray, starts: np.ndarray) -> np.ndarray:
    masked = np.where(per_param == MISSING, -np.inf, per_param)
    out = np.maximum.reduceat(masked, starts, axis=1)  # NaN propagates: a NaN gradient shows
    out[out == -np.inf] = np.nan
    return out


def to_batch(records: list[StepRecord], layers: list[Layer], meta: dict | None = None) -> FlushBatch:
    """Reduce device records to host rows: the only place the host reads the device."""
    from gradwatch.collect.watch import layer_info  # local: avoid a cycle

    batch = FlushBatch(layers=[layer_info(l) for l in layers], meta=meta or {})
    if not records:
        return batch
    owners, starts = _segments(layers)
    n_params = sum(len(layers[i].params) for i in owners)
    # the step's objective is the sum of what backward was called on: its gradient is the step's
    # gradient (accumulating N micro-batches of loss / N sums to their mean loss)
    losses = [r.loss_sum if r.loss_n else None for r in records]
    loss_host = _stack([None if l is None else l.reshape(1) for l in losses], 1)[:, 0]

    cols = {c: np.full((len(records), len(layers)), np.nan) for c in LAYER_COLUMNS}
    if owners:
        grad = _stack([r.grad for r in records], n_params)
        weight = _stack([r.weight for r in records], n_params)
        delta = _stack([r.delta for r in records], n_params)
        gmax = _stack([r.grad_max for r in records], n_params)
        gn = _layer_l2(grad, starts)
        wn = _layer_l2(weight, starts)
        dn = _layer_l2(delta, starts)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(wn > 0, dn / wn, np.where(dn > 0, np.inf, 0.0))
        ratio[np.isnan(wn)] = np.nan
        nonfinite = np.where(np.isfinite(gn), 0.0, np.nan)
        nonfinite[np.isnan(grad).all(axis=1)] = np.nan
        for row, rec in enumerate(records):
            if rec.nonfinite:
                for j, (lo, hi) in enumerate(zip(starts, [*starts[1:], n_params])):
                    nonfinite[row, j] = sum(c for i, c in rec.nonfinite.items() if lo <= i < hi)
        for name, values in (("grad_norm", gn), ("weight_norm", wn), ("update_ratio", ratio),
                             ("grad_max", _layer_max(gmax, starts)), ("nonfinite", nonfinite)):
            cols[name][:, owners] = values

    for what, sums in (("act", [r.act for r in records]), ("rms", [r.out_rms for r in records])):
        where = [(row, pos) for row, by_layer in enumerate(sums) for pos in by_layer]
        if not where:
            continue
        slots = [sums[row][pos] for row, pos in where]
        means = _host([total for total, _ in slots], [n for _, n in slots])
        rows, positions = np.array(where).T
        if what == "act":
            cols["act_mean"][rows, positions] = measured(means[:, 0])
            cols["act_std"][rows, positions] = measured(means[:, 1])
            cols["saturated"][rows, positions] = means[:, 2]  # NaN by design: not a saturating activation
            cols["dead"][rows, positions] = means[:, 3]  # NaN by design: no unit axis
        else:
            cols["grad_out_rms"][rows, positions] = measured(means[:, 0])

    # a row for each step and layer with a value, built column-wise, in blocks of rows that
    # recorded the same columns (`FlushBatch.layer_blocks`)
    table = np.stack([cols[c] for c in LAYER_COLUMNS], axis=-1)  # (step, layer, column)
    rows, positions = np.nonzero(~np.isnan(table).all(axis=2))
    kept = table[rows, positions]
    codes = ~np.isnan(kept) @ (1 << np.arange(len(LAYER_COLUMNS)))  # which columns each row recorded
    steps = np.array([r.step for r in records])[rows]
    names = np.array([layer.name for layer in layers], dtype=object)[positions]
    for code in np.unique(codes):
        these = codes == code
        columns = [k for k in range(len(LAYER_COLUMNS)) if code >> k & 1]
        batch.layer_blocks.append((tuple(LAYER_COLUMNS[k] for k in columns), steps[these].tolist(),
                                   names[these].tolist(), kept[these][:, columns].T.tolist()))
    for row, rec in enumerate(records):
        lr = rec.lrs[0] if rec.lrs else None
        loss = None if losses[row] is None else float(loss_host[row])
        batch.steps.append((rec.step, loss, lr, json.dumps(rec.lrs), rec.wall_time))
        for pos, profile in rec.profiles.items():
            for t, v in enumerate(measured(profile.float().cpu().numpy()).tolist()):
                batch.profile_rows.append((rec.step, layers[pos].name, t, v))
    return batch
