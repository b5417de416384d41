"""late_clipping: gradients clipped after the optimizer step that used them, seen directly by the watch.

`clip_grad_norm_` scales p.grad in place; the optimizer reads p.grad in `step()`. Called after the
step (and before the next backward, which replaces the gradients after `zero_grad()`), it clips
gradients no step will use: the script runs unclipped while it looks clipped. The watch sees the
call between a step and the next backward (collect/watch.py `clipped`), an exact test, so no
threshold. An exploding gradient in the same run is what the clipping was meant to stop, so
`late_first` puts this cause and its fix first there.
"""

from __future__ import annotations

from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.diagnose.signals import first_noted
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries

KEY = "late_clip"  # the meta the reader makes of the watch's event


def find_late_clipping(run: RunSeries, th: Thresholds) -> list[Finding]:
    said = first_noted(run, KEY)
    if said is None:
        return []
    step, detail = said
    message = f"{_what(step, detail)}. {remedy(detail).action}."
    evidence = {"function": detail.get("function"), "where": detail.get("where") or None, "limit": detail.get("limit")}
    return [Finding("late_clipping", "warning", step, (), message, evidence, (cause(step, detail),), (remedy(detail),))]


def _what(step: int, detail: dict) -> str:
    where = f" at {detail['where']}" if detail.get("where") else ""
    return (f"`{detail.get('function', 'clip_grad_norm_')}`{where} runs after optimizer.step() (from step {step}): the "
            "step has already used the gradients unclipped, and the next backward replaces them, so it clips nothing")


def cause(step: int, detail: dict) -> str:
    return f"clipping after the step: {_what(step, detail)}; the updates are not clipped at all"


def remedy(detail: dict) -> Remedy:
    function = detail.get("function") or "clip_grad_norm_"
    if function == "clip_grads_with_norm_":  # (it takes a total norm computed before: clip_grad_norm_ does both)
        function = "clip_grad_norm_"
    limit = detail.get("limit")
    arg = f"{'max_norm' if 'norm' in function else 'clip_value'}={limit:g}" if isinstance(limit, (int, float)) else "..."
    return Remedy("Clip between loss.backward() and optimizer.step(), where the step reads the gradients",
                  f"loss.backward()\ntorch.nn.utils.{function}(model.parameters(), {arg})\noptimizer.step()")


def late_first(run: RunSeries, causes: list[str], found: list[Remedy]) -> tuple[list[str], list[Remedy]]:
    """A finding the clipping was there to stop (an exploding gradient): the misplaced call first."""
    said = first_noted(run, KEY)
    if said is None:
        return causes, found
    return [cause(*said), *causes], [remedy(said[1]), *found]
