"""Candidate remedies for a run's findings, each a JSON-able spec the trial process applies
through hooks, plus the code the user should write if it wins."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradwatch.diagnose.finding import Finding

# Kinds a repair must remove. Plateau and divergence are judged through the final loss instead.
HARMFUL = ("vanishing_gradient", "exploding_gradient", "non_finite", "dead_units", "saturation")


@dataclass(frozen=True)
class Candidate:
    name: str
    spec: dict = field(default_factory=dict)
    code: str = ""
    reason: str = ""


def clip_norm(max_norm: float = 1.0) -> Candidate:
    return Candidate(f"clip norm {max_norm:g}", {"clip": "norm", "max_norm": max_norm},
                     f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})  # before optimizer.step()")


def clip_value(value: float = 1.0) -> Candidate:
    return Candidate(f"clip value {value:g}", {"clip": "value", "value": value},
                     f"torch.nn.utils.clip_grad_value_(model.parameters(), clip_value={value:g})  # before optimizer.step()")


ZCLIP = Candidate("ZClip", {"clip": "zclip"}, "gw.clip.attach(optimizer, gw.clip.ZClip())")
REINIT = Candidate("re-initialise per activation", {"init": "auto"}, "gw.init_(model)")
ADAM = Candidate("Adam (lr 1e-3)", {"optimizer": "Adam", "lr": 1e-3},
                 "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)")
BATCHNORM = Candidate("BatchNorm after each layer", {"norm": "batch"}, "model, _ = gw.modify.insert_norm(model, 'batch')")


def lr_scale(factor: float) -> Candidate:
    return Candidate(f"learning rate x{factor:g}", {"lr_scale": factor},
                     f"for group in optimizer.param_groups: group['lr'] *= {factor:g}")


def swap(old: str, new: str = "LeakyReLU") -> Candidate:
    made = "nn.LeakyReLU(0.01)" if new == "LeakyReLU" else f"nn.{new}()"
    return Candidate(f"{old} -> {new}", {"swap": {"from": old, "to": new}},
                     f"model, _ = gw.modify.swap_activations(model, nn.{old}, lambda: {made})")


SATURATING_MODULES = {"sigmoid": "Sigmoid", "tanh": "Tanh", "softsign": "Softsign", "hardtanh": "Hardtanh"}


def from_findings(findings: list[Finding], activations: set[str]) -> list[Candidate]:
    """The remedies worth a trial for these findings, most specific first, without repeats."""
    kinds = {f.kind for f in findings}
    out: list[Candidate] = []
    saturating = [SATURATING_MODULES[a] for a in sorted(activations) if a in SATURATING_MODULES]
    if kinds & {"exploding_gradient", "non_finite", "loss_divergence"}:
        base = next((max(f.evidence.get("baseline_norm") or 0.0, f.evidence.get("early_norm") or 0.0)
                     for f in findings if f.kind == "exploding_gradient"), None)
        max_norm = float(f"{2 * base:.1g}") if base and math.isfinite(base) and base > 0 else 1.0
        out += [clip_norm(max_norm), ZCLIP, lr_scale(0.1), ADAM]
    if kinds & {"vanishing_gradient", "saturation", "stalled_layers"}:
        out += [swap(s) for s in saturating] + [REINIT, BATCHNORM, ADAM]
    if "dead_units" in kinds:
        out += [swap("ReLU"), lr_scale(0.1), REINIT]
    if "loss_plateau" in kinds:
        out += [lr_scale(10.0), ADAM]
    seen, unique = set(), []
    for c in out:
        if c.name not in seen:
            seen.add(c.name)
            unique.append(c)
    return unique


def autotrainer_order(findings: list[Finding]) -> list[Candidate]:
    """AutoTrainer's fixed repair order (Zhang et al., ICSE 2021), as a baseline: vanishing:
    SELU -> ReLU+He -> BatchNorm; exploding: SELU -> ReLU -> clip by value -> tanh -> BatchNorm."""
    kinds = {f.kind for f in findings}
    selu = Candidate("activation -> SELU", {"swap": {"from": "*", "to": "SELU"}, "init": "lecun"})
    relu = Candidate("activation -> ReLU", {"swap": {"from": "*", "to": "ReLU"}})
    relu_he = Candidate("activation -> ReLU + He init", {"swap": {"from": "*", "to": "ReLU"}, "init": "he"})
    tanh = Candidate("activation -> tanh", {"swap": {"from": "*", "to": "Tanh"}})
    if kinds & {"exploding_gradient", "non_finite", "loss_divergence"}:
        return [selu, relu, clip_value(1.0), tanh, BATCHNORM]
    if kinds & {"vanishing_gradient", "saturation", "stalled_layers", "dead_units"}:
        return [selu, relu_he, BATCHNORM]
    return []
