"""Find the operation that first made a NaN/Inf in the forward pass, and the script's line that ran it.

The store says at which step a NaN/Inf first appeared and whether gradients grew before it; when
they did not, the NaN came from the data or the loss, and "look in the data or the loss function"
is all the store can say. A second run of the script up to that step, with every forward operation
of that step checked (a TorchDispatchMode: one host sync per operation, for one step only), names
the operation and the line: `loss = ... / yb.var()`, a division that made an Inf, or
`xb = x[start:start + 64]`, a batch that already held NaN.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch

ENV_LOCATE_AT = "GRADWATCH_LOCATE_AT"  # the step (0-based, as stored) whose forward pass is checked
ORIGIN = "non-finite-origin.json"  # in the run directory of the locating run

# Their output is memory not yet written (nn.Linear's weight before its init): garbage, not a NaN made.
_UNWRITTEN = ("empty", "new_empty", "resize_")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OUR_DIR = os.path.dirname(gradwatch.__file__) + os.sep


@dataclass(frozen=True)
class Origin:
    op: str  # the aten operation, e.g. "aten.div.Tensor"
    file: str  # the script's file that ran it (the innermost frame outside torch and gradwatch)
    line: int
    code: str  # that line's text
    made_here: bool  # its inputs were finite: this operation made the NaN/Inf (else an input held it)
    value: str  # "NaN" or "Inf"

    def describe(self) -> str:
        where = f"{os.path.basename(self.file)}:{self.line}: `{self.code}`"
        if self.made_here:
            return f"{self.op} made the first {self.value} from finite inputs, at {where}"
        return (f"an input of {self.op} already held {self.value} at {where}: it was made before this step's "
                "computation (in the data, or in a tensor kept from earlier)")

    def save(self, run_dir: Path) -> None:
        (run_dir / ORIGIN).write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> Origin | None:
        path = run_dir / ORIGIN
        return cls(**json.loads(path.read_text())) if path.is_file() else None


class NonFiniteLocator(TorchDispatchMode):
    """Checks each floating output of each forward operation (grad enabled, so not the optimizer's
    update nor the backward pass) until one is NaN/Inf; then records `origin` and checks no more.
    An input that is a parameter already non-finite means the NaN came in an earlier step: no origin."""

    def __init__(self, run_dir: Path | None = None):
        super().__init__()
        self.run_dir = run_dir
        self.origin: Origin | None = None
        self.done = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.done and torch.is_grad_enabled() and not func.__name__.startswith(_UNWRITTEN):
            bad = _non_finite(out)
            if bad:
                self._found(func, args, kwargs or {}, bad)
        return out

    def _found(self, func, args, kwargs, value: str) -> None:
        frame = _caller_frame()
        if frame is None or frame.filename.startswith(_OUR_DIR):
            return  # the watch's own statistics (of a NaN activation, say) are not the script's
        self.done = True
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        held = [a for a in inputs if _non_finite(a)]
        if any(isinstance(a, torch.nn.Parameter) for a in held):
            return  # the weights were already non-finite: it began before the step checked
        self.origin = Origin(str(func), frame.filename, frame.lineno or 0, (frame.line or "").strip(),
                             made_here=not held, value=value)
        if self.run_dir is not None:  # at once: the run may still die of the NaN it made
            self.origin.save(self.run_dir)


def _non_finite(value) -> str:
    """'NaN' or 'Inf' if a floating tensor (or one of a tuple's) holds one, else ''."""
    for t in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            if not bool(torch.isfinite(t).all()):
                return "NaN" if bool(torch.isnan(t).any()) else "Inf"
    return ""


def _caller_frame() -> traceback.FrameSummary | None:
    """The innermost frame outside torch (and this file) that is not Python's own machinery: the
    user's code, or the watch's."""
    for frame in reversed(traceback.extract_stack()[:-3]):  # [-3:]: _caller_frame, _found, __torch_dispatch__
        if not frame.filename.startswith(_TORCH_DIR) and not frame.filename.startswith("<"):
            return frame
    return None
