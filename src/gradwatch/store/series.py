"""`RunSeries`: everything a run recorded, as plain numpy arrays.

The one currency between the store and the rules of `diagnose`: rules read this, never SQL or
torch, so they can be tested on hand-built series.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from gradwatch.store.rows import RecordedRows
from gradwatch.store.schema import LAYER_COLUMNS

# The roles of layers that own weights (`LayerInfo.role`): the ones a depth profile is made of.
WEIGHT_ROLES = ("param", "recurrent")
# The per-layer metrics a series holds: the store's per-(step, layer) columns, named once there
# (docs/statistics.md defines each).
METRICS = LAYER_COLUMNS


@dataclass(frozen=True)
class LayerInfo:
    """One watched module.

    `index` is the order in which the module first ran forward (0 = nearest the input);
    `role` is "param" (owns parameters), "activation" or "recurrent" (an nn.RNN/GRU/LSTM,
    which also owns parameters); `activation` names the nonlinearity for activation modules
    (e.g. "sigmoid", "relu"), "" otherwise.
    """

    name: str
    type: str
    index: int
    role: str
    n_params: int = 0
    activation: str = ""


@dataclass
class RunSeries:
    """A run's series.

    `steps` holds every recorded step (sorted); `metrics[m]` is a float array (or a `RecordedRows`,
    which reads as one: `read_run(compact=True)`) of shape
    (len(steps), len(layers)) with NaN wherever the metric was not recorded for that layer at
    that step (not sampled, not applicable, or the layer got no gradient). `loss` and `lr` are
    aligned with `steps`. `time_profiles[layer]` is (profile_steps, array (n, T)) of the norm of
    the loss gradient w.r.t. the recurrent layer's input at each time step t.
    `meta` holds run facts: optimizer class name, torch version, command, skipped steps...
    """

    layers: list[LayerInfo]
    steps: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    metrics: dict[str, np.ndarray]
    time_profiles: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def layer_names(self, role: str | None = None) -> list[str]:
        """Names of layers (optionally of one role), in forward order."""
        return [l.name for l in self.layers if role is None or l.role == role]

    def weight_columns(self) -> list[int]:
        """Columns of the layers with weights (role param or recurrent), input first: the layers
        `gradwatch run` and the report count, and the rules walk from the input up."""
        return sorted((c for c, l in enumerate(self.layers) if l.role in WEIGHT_ROLES),
                      key=lambda c: self.layers[c].index)

    def column(self, name: str) -> int:
        """The column of the first layer named `name`. By a name index, checked at each use and
        rebuilt when the layers changed: the live rules ask per layer, and a linear search made
        a flush of 2000 layers ~0.3 s slower."""
        index = self.__dict__.get("_columns")
        i = index.get(name) if index is not None else None
        if i is None or i >= len(self.layers) or self.layers[i].name != name:
            index = self.__dict__["_columns"] = {l.name: c for c, l in reversed(list(enumerate(self.layers)))}
            i = index.get(name)
        if i is None:
            raise KeyError(f"no layer named {name!r}; layers are {self.layer_names()}")
        return i

    def series(self, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric of one layer, where it was recorded (none: a metric this
        run did not record). A name no store records raises, as an unknown layer does: empty
        arrays made a tester's typo (`"gradnorm"`) look like a metric never measured."""
        if metric not in self.metrics:
            if metric not in METRICS:
                raise KeyError(f"no metric named {metric!r}; metrics are {', '.join(METRICS)}")
            return np.empty(0, dtype=np.int64), np.empty(0)
        values = self.metrics[metric][:, self.column(layer)]
        keep = ~np.isnan(values)
        return self.steps[keep], values[keep]

    def dense(self) -> "RunSeries":
        """The same series with every metric a plain read-only float64 array: what a user is given
        (`watch.series()`), whatever the rules read internally (`RecordedRows`)."""
        metrics = {}
        for m, v in self.metrics.items():
            a = np.asarray(v)
            if a.flags.writeable:
                a = a.view()
                a.flags.writeable = False
            metrics[m] = a
        return replace(self, metrics=metrics)

    def of_layers(self, cols: list[int]) -> "RunSeries":
        """The same steps with only the layers in columns `cols`: one model of several (a GAN's
        generator), whose depth is its own."""
        names = {self.layers[i].name for i in cols}
        rows = np.ones(len(self.steps), dtype=bool)
        return RunSeries([self.layers[i] for i in cols], self.steps, self.loss, self.lr,
                         {m: _rows_of(v, rows, cols) for m, v in self.metrics.items()},
                         {n: p for n, p in self.time_profiles.items() if n in names}, dict(self.meta))

    def between(self, first: int, stop: int | None = None) -> "RunSeries":
        """The steps first <= step < stop, with the layers that recorded anything in them: one phase
        of a script that trains one model after another (each its own loss, its own scale)."""
        rows = (self.steps >= first) & (self.steps < stop if stop is not None else True)
        recorded = np.zeros(len(self.layers), dtype=bool)
        for v in self.metrics.values():
            recorded |= _finite_in(v, rows)
        live = [int(i) for i in np.flatnonzero(recorded)]
        names = {self.layers[i].name for i in live}
        profiles = {}
        for name, (p_steps, table) in self.time_profiles.items():
            keep = (p_steps >= first) & (p_steps < stop if stop is not None else True)
            if name in names and keep.any():
                profiles[name] = (p_steps[keep], table[keep])
        return RunSeries([self.layers[i] for i in live], self.steps[rows], self.loss[rows], self.lr[rows],
                         {m: _rows_of(v, rows, live) for m, v in self.metrics.items()}, profiles, dict(self.meta))


def _finite_in(values: np.ndarray | RecordedRows, rows: np.ndarray) -> np.ndarray:
    """Per column: any finite value in the rows where `rows` (a mask) holds."""
    if isinstance(values, RecordedRows) and np.isnan(values.fill):
        return np.isfinite(values.values[rows[values.rows]]).any(axis=0)
    return np.isfinite(values[rows]).any(axis=0)


def _rows_of(values: np.ndarray | RecordedRows, rows: np.ndarray, cols: list[int]) -> np.ndarray | RecordedRows:
    """The rows where `rows` holds, columns `cols`; a `RecordedRows` stays one."""
    return values.subset(rows, cols) if isinstance(values, RecordedRows) else values[rows][:, cols]
