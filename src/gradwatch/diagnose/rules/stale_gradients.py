"""stale_gradients: a forgotten `optimizer.zero_grad()`, seen directly by the watch.

The watch checks, after sampled steps, whether one parameter's gradient at the next step of the
optimizer still held the gradient the last step used (collect/stale_grads.py): an exact test, so one
carry-over is proof and no threshold is needed. It writes the meta "stale_gradients" from the
first carry-over on. An exploding_gradient finding in the same run is its symptom: the sum of all
past gradients grows ~linearly with the step, so `stale_first` puts this cause and fix first there.
"""

from __future__ import annotations

from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.diagnose.signals import noted_in
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries

KEY = "stale_gradients"  # the meta the watch writes (collect/stale_grads.py STALE_KEY)

CLEAR_CODE = """for x, y in loader:
    optimizer.zero_grad()          # clear the last step's gradients
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()"""

ACCUMULATE_CODE = """for i, (x, y) in enumerate(loader):
    loss = loss_fn(model(x), y) / k   # k micro-batches per step, on purpose
    loss.backward()
    if (i + 1) % k == 0:
        optimizer.step()
        optimizer.zero_grad()"""

MANUAL_CODE = """loss.backward()
with torch.no_grad():
    for p in model.parameters():
        p -= lr * p.grad
model.zero_grad()                  # clear before the next backward"""


def find_stale_gradients(run: RunSeries, th: Thresholds) -> list[Finding]:
    said = _said(run)
    if said is None:
        return []
    first, layer = int(said["first_step"]), said.get("layer") or ""
    between = _between(said)
    carried, checks = int(said.get("carried_over", 1)), int(said.get("checks", 1))
    # checked after sampled steps only: "at every step checked", never "at every step"
    how_many = f"each of the {checks} steps checked" if carried >= checks else f"{carried} of the {checks} steps checked"
    what = (f"The gradients are not cleared between {between}: at {how_many} from step {first} on, the update "
            "used the sum of the past steps' gradients, not this batch's alone")
    message = f"{what}. {remedies(said)[0].action}."
    evidence = {"optimizer": said.get("optimizer") or None, "first_step": first, "layer_checked": layer,
                "carried_over": carried, "checks": checks}
    # no layers: every weight of the optimizer is concerned; the one checked is in the evidence
    return [Finding(KEY, "error", first, (), message, evidence, (cause(said),), remedies(said))]


def _said(run: RunSeries) -> dict | None:
    """The watch's meta, when its first carry-over falls in this run (or phase) of steps."""
    said = run.meta.get(KEY)
    if not isinstance(said, dict) or "first_step" not in said:
        return None
    return said if noted_in(run, int(said["first_step"])) else None


def _between(said: dict) -> str:
    return f"{said['optimizer']} steps" if said.get("optimizer") else "weight updates (by hand)"


def cause(said: dict) -> str:
    layer = said.get("layer")
    where = f" (layer '{layer}'" if layer else " ("
    return (f"stale gradients: every backward adds into p.grad, and nothing clears it between "
            f"{_between(said)}{where}: its gradient at step {said['first_step']} still held "
            "the last step's). The gradient used at step t is the sum of t gradients, so the effective step "
            "grows about linearly with t, and past gradients keep pushing after the loss turns: the weights "
            "overshoot and oscillate like momentum that never decays")


def remedies(said: dict) -> tuple[Remedy, ...]:
    if not said.get("optimizer"):  # weights updated by hand
        return (Remedy("Clear the gradients after each update by hand: model.zero_grad() (or p.grad = None)",
                       MANUAL_CODE),)
    return (Remedy("Call optimizer.zero_grad() (or model.zero_grad()) before each loss.backward()", CLEAR_CODE),
            Remedy("If you meant to accumulate k micro-batches, step and clear once every k backwards", ACCUMULATE_CODE))


def stale_first(run: RunSeries, causes: list[str], found: list[Remedy]) -> tuple[list[str], list[Remedy]]:
    """A finding that stale gradients explain (an exploding gradient): their cause and fix first."""
    said = _said(run)
    if said is None:
        return causes, found
    return [cause(said), *causes], [*remedies(said)[:1], *found]
