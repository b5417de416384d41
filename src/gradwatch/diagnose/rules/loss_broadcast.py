"""loss_broadcast: a loss whose target has another shape than the prediction, seen by the watch in
torch's own warning ("Using a target size ... different to the input size").

F.mse_loss (l1, smooth L1, Huber) broadcasts the two: predictions (B, 1) against targets (B,) make a
(B, B) grid, every prediction against every target, whose minimum is each prediction at the
targets' mean. The loss falls to the targets' variance and stays there; the model learns to ignore
its input, and the gradient reaching its lower layers is what that leaves (a tester's 1D CNN was
told its initialisation was the cause). No threshold: the shapes are the fact.
"""

from __future__ import annotations

import math

from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.diagnose.signals import first_noted
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries

KEY = "loss_broadcast"  # the meta the reader makes of the watch's event


def find_loss_broadcast(run: RunSeries, th: Thresholds) -> list[Finding]:
    if (said := first_noted(run, KEY)) is None:
        return []
    step, detail = said
    given, target = tuple(detail.get("input") or ()), tuple(detail.get("target") or ())
    try:
        grid = tuple(_broadcast(given, target))
    except ValueError:  # (torch raises on shapes that do not broadcast: no warning reaches us then)
        return []
    crossed = math.prod(grid) > max(math.prod(given), math.prod(target))
    if not crossed and math.prod(given) == math.prod(target):  # (a squeezed batch of 1: () against (1,), the same loss)
        return []
    where = f" at {detail['where']}" if detail.get("where") else ""
    what = (f"the loss{where} compares predictions of shape {_shape(given)} with targets of shape {_shape(target)}: "
            f"broadcast to {_shape(grid)}" + (", every prediction against every target, so its minimum puts each "
                                              "prediction at the targets' mean, whatever the input" if crossed else ""))
    remedy = remedy_for(given, target, grid)
    message = f"{what[0].upper()}{what[1:]}. {remedy.action}."
    evidence = {"where": detail.get("where"), "input_shape": list(given), "target_shape": list(target),
                "broadcast_shape": list(grid)}
    cause = f"loss shape: {what}"
    return [Finding(KEY, "error" if crossed else "warning", step, (), message, evidence, (cause,), (remedy,))]


def remedy_for(given: tuple[int, ...], target: tuple[int, ...], grid: tuple[int, ...]) -> Remedy:
    """The shapes made equal before the loss, whichever loss it is (mse, l1, smooth L1, Huber)."""
    if math.prod(given) == math.prod(target):
        return Remedy("Give the prediction the target's shape, before the loss",
                      f"pred = pred.view_as(y)  # {_shape(given)} -> {_shape(target)}: one prediction per target, "
                      f"not the {_shape(grid)} grid")
    return Remedy("Give the target the prediction's shape, before the loss (one target per output)",
                  f"y = y.expand_as(pred)  # {_shape(target)} -> {_shape(given)}")


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> list[int]:
    out = []
    for x, y in zip(((1,) * (len(b) - len(a)) + a), ((1,) * (len(a) - len(b)) + b)):
        if x != y and 1 not in (x, y):
            raise ValueError("shapes do not broadcast")
        out.append(max(x, y))
    return out


def _shape(shape) -> str:
    return f"({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"
