"""`Finding`: what is wrong, where, since when, why, and what to change."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = (
    "vanishing_gradient",
    "exploding_gradient",
    "non_finite",
    "dead_units",
    "saturation",
    "stalled_layers",
    "loss_plateau",
    "loss_divergence",
    "stale_gradients",
    "late_clipping",
    "repeated_backward",
    "loss_broadcast",
)
SEVERITIES = ("info", "warning", "error")


@dataclass(frozen=True)
class Remedy:
    """One concrete change: what to do, and the code that does it."""

    action: str
    code: str


@dataclass(frozen=True)
class Finding:
    """One problem found in a run (docs/diagnose.md).

    kind: one of `KINDS` ("vanishing_gradient", "exploding_gradient", "non_finite", ...).
    severity: "error", "warning" or "info".
    first_step: the step the problem starts at (the first warning sign).
    layers: module names of the layers concerned, nearest the input first (may be empty).
    message: one sentence saying what is wrong and what to do first.
    evidence: the numbers that triggered it, by name.
    causes: likely causes, most likely first; from `gw.diagnose` each starts with a stable key
        and a colon ("learning rate: ...", "saturating activation: ...").
    remedies: `Remedy(action, code)`s, best first: what to change and the code to paste.

    `line()` gives one line for a log; `to_dict()` / `from_dict()` the JSON form of findings.json.
    """

    kind: str
    severity: str
    first_step: int
    layers: tuple[str, ...]
    message: str
    evidence: dict = field(default_factory=dict)
    causes: tuple[str, ...] = ()
    remedies: tuple[Remedy, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")

    def line(self) -> str:
        """One line for a log or a terminal."""
        return f"gradwatch: [{self.severity}] {self.kind} (step {self.first_step}): {self.message}"

    def to_dict(self) -> dict:
        """The JSON form (lists for tuples): one entry of findings.json."""
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["causes"] = list(self.causes)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        return cls(
            kind=d["kind"],
            severity=d["severity"],
            first_step=int(d["first_step"]),
            layers=tuple(d.get("layers", ())),
            message=d["message"],
            evidence=dict(d.get("evidence", {})),
            causes=tuple(d.get("causes", ())),
            remedies=tuple(Remedy(**r) for r in d.get("remedies", ())),
        )


FINDINGS_FILE = "findings.json"  # a run's findings, next to its store: `gradwatch report` shows them


def write_findings(run_dir: str | Path, findings: list[Finding]) -> Path:
    """Write `findings.json` into the run directory (read back with `Finding.from_dict`)."""
    path = Path(run_dir) / FINDINGS_FILE
    path.write_text(json.dumps([f.to_dict() for f in findings], indent=2, default=float))
    return path
