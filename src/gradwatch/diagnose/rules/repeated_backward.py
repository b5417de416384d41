"""repeated_backward: `loss.backward()` run twice on the same loss with no clear between, seen
directly by the watch.

Each backward adds the loss's gradient into p.grad, so the step uses it twice over: no
accumulation of micro-batches, whose losses are different tensors (collect/watch.py tells them by
the loss tensor's identity, and records the loss once). Under SGD the update is twice as long, the
learning rate in effect doubled; Adam's step is unchanged by the gradient's scale (m/√v), so there
it costs a backward and changes little. No threshold: the identity is the fact.
"""

from __future__ import annotations

from gradwatch.diagnose.advice import ADAPTIVE
from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.diagnose.signals import first_noted
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries

KEY = "repeated_backward"  # the meta the reader makes of the watch's event

ONCE_CODE = """loss = loss_fn(model(x), y)
optimizer.zero_grad()
loss.backward()          # once per loss: a second call adds the same gradient again
optimizer.step()"""


def find_repeated_backward(run: RunSeries, th: Thresholds) -> list[Finding]:
    if (said := first_noted(run, KEY)) is None:
        return []
    step, where = said[0], said[1].get("where") or ""
    optimizer = run.meta.get("optimizer") or ""
    scale_free = optimizer in ADAPTIVE
    effect = (f"{optimizer}'s step hardly changes with the gradient's scale, so the cost is a second backward"
              if scale_free else "the update is twice as long: the learning rate in effect doubled")
    at = f" at {where}" if where else ""
    message = (f"backward() runs again on the same loss{at} from step {step}, with no zero_grad() between: the step "
               f"uses the loss's gradient twice over ({effect}). Call backward() once per loss.")
    cause = ("repeated backward: a second loss.backward() (retain_graph=True on the first) adds the same gradient "
             f"into p.grad again{at}; {effect}")
    remedy = Remedy("Call loss.backward() once per loss (drop retain_graph=True and the second call)", ONCE_CODE)
    evidence = {"where": where or None, "optimizer": optimizer or None}
    return [Finding(KEY, "info" if scale_free else "warning", step, (), message, evidence, (cause,), (remedy,))]
