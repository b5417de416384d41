"""`ProbeResult`: what one probe measured, as a table, a JSON document and a picture."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from gradwatch.diagnose.finding import Finding
from gradwatch.probe.meanfield import MeanField
from gradwatch.probe.recurrent import EXPLODE, VANISH, RecurrentProbe

NAN = math.nan


@dataclass
class LayerProbe:
    """One layer: a parameter-owning (or recurrent) module call plus the activations that follow it."""

    index: int
    name: str
    type: str
    activation: str  # name of the activation that follows ("" when none)
    act_mean: float = NAN  # of the activation's output (the layer's own output when there is none)
    act_std: float = NAN
    saturated: float = NAN  # within 1% of an asymptote; NaN for non-saturating activations
    dead: float = NAN  # units zero for every sample
    grad_out_norm: float = NAN  # ‖∂L/∂s‖, s = the module's output (the pre-activation)
    grad_out_std: float = NAN
    grad_w_norm: float = NAN  # ‖∂L/∂W‖ over the layer's parameters
    grad_w_std: float = NAN
    grad_ratio: float = NAN  # ‖∂L/∂s_l‖² / ‖∂L/∂s_{l+1}‖² (mean-field χ₁ for an MLP)
    gain_to_top: float = NAN  # ‖∂L/∂s_l‖ / ‖∂L/∂s_top‖, top = the output-most layer
    sigma_max: float = NAN  # Jacobian from this layer's input to the next layer's input
    sigma_mean: float = NAN
    sigma_rms: float = NAN
    jacobian_to: str = ""  # the next layer's name, or "output"
    nonfinite: int = 0  # NaN/Inf entries in ∂L/∂s and ∂L/∂W
    verdict: str = "healthy"  # healthy | vanishing | exploding | non-finite


@dataclass
class ProbeResult:
    """What `gw.probe` measured on one batch at initialisation (docs/probe.md).

    layers: one `LayerProbe` per weight (or recurrent) layer, input first: activation statistics,
        ‖∂L/∂s‖, ‖∂L/∂W‖, Jacobian singular values and the layer's verdict.
    loss: the loss of the batch; input_std / output_std: std of the model's input and output.
    gain: products over depth of the layers' Jacobian σ ("top", "mean", "rms"); NaN where `residual`
        (skip connections: the gradient goes around the layers' Jacobians, not through each in turn).
    mean_field: the mean-field prediction for an MLP (χ₁, depth scale ξ), else None with
        mean_field_note saying why; chi_measured: the measured χ₁ (median over hidden layers).
    recurrent: one `RecurrentProbe` per recurrent layer (BPTT horizon, ‖W_hh‖ against 1/γ).
    findings: `Finding`s with causes and remedies; verdict: "healthy", "vanishing",
        "exploding", "saturated" (activations pinned at an asymptote, no ratio across depth) or "non-finite".
    iters: Jacobian products per layer; seconds: time taken; notes: remarks (a default loss
        swapped for another, a layer whose Jacobian could not be taken).

    `table()`, `summary_lines()`, `to_json()` and `plot(path)` present it; `layer(name)` picks one.
    """

    layers: list[LayerProbe]
    loss: float
    input_std: float
    output_std: float
    gain: dict  # products over depth of sigma_max / sigma_mean / sigma_rms
    mean_field: MeanField | None = None
    mean_field_note: str = ""
    chi_measured: float = NAN  # median grad_ratio over the hidden layers of an MLP
    recurrent: list[RecurrentProbe] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    verdict: str = "healthy"
    iters: int = 30
    seconds: float = NAN
    notes: list[str] = field(default_factory=list)
    residual: bool = False  # skip connections: no product over depth is the end-to-end gain
    loss_name: str = ""  # "projection" for the default loss, whose value (often negative) means nothing;
    # the CLI's --loss otherwise ("" for a loss_fn of your own)

    def layer(self, name: str) -> LayerProbe:
        return next(x for x in self.layers if x.name == name)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("findings", "mean_field", "recurrent")}
        d["layers"] = [asdict(x) for x in self.layers]
        d["mean_field"] = self.mean_field.to_dict() if self.mean_field else None
        d["recurrent"] = [r.to_dict() for r in self.recurrent]
        d["findings"] = [f.to_dict() for f in self.findings]
        return _finite(d)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self):
        """A rich Table of the per-layer numbers (import rich only when asked)."""
        from rich.table import Table

        what = {"projection": "random-projection loss", "": "loss"}.get(self.loss_name, f"{self.loss_name} loss")
        t = Table(title=f"gradwatch probe: {what} {self.loss:.4g}, verdict {self.verdict}", show_lines=False)
        cols = [("#", "index", "d"), ("layer", "name", "s"), ("type", "type", "s"), ("act", "activation", "s"),
                ("act std", "act_std", "g"), ("sat", "saturated", "%"), ("dead", "dead", "%"),
                ("‖∂L/∂s‖", "grad_out_norm", "g"), ("∂L/∂s std", "grad_out_std", "g"),
                ("‖∂L/∂W‖", "grad_w_norm", "g"), ("gain→top", "gain_to_top", "g"),
                ("σmax", "sigma_max", "g"), ("σmean", "sigma_mean", "g"), ("σrms", "sigma_rms", "g"),
                ("verdict", "verdict", "s")]
        for head, _, kind in cols:
            t.add_column(head, justify="left" if kind == "s" else "right")
        for x in self.layers:
            t.add_row(*(_fmt(getattr(x, attr), kind) for _, attr, kind in cols),
                      style={"vanishing": "yellow", "exploding": "red", "non-finite": "bold red"}.get(x.verdict))
        return t

    def __str__(self) -> str:
        """What `gradwatch probe` prints: the table, the summary lines and the findings, as plain text
        (so `print(gw.probe(model, x))` shows the result, not the dataclass)."""
        import io

        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=170, color_system=None, highlight=False)
        console.print(self.table())
        for line in self.summary_lines():
            console.print(line, markup=False)
        for f in self.findings:
            console.print(f"{f.severity.upper()} {f.kind}: {f.message}", markup=False)
            for cause in f.causes:
                console.print(f"  cause: {cause}", markup=False)
            for r in f.remedies:
                console.print(f"  fix: {r.action}\n       " + r.code.replace("\n", "\n       "), markup=False)
        return buf.getvalue().rstrip("\n")

    def summary_lines(self) -> list[str]:
        g = self.gain
        measured = any(math.isfinite(g[k]) for k in ("top", "mean", "rms"))  # (iters=0: no spectra)
        lines = [(f"end-to-end gain (product over depth): σmax {g['top']:.3g}, σmean {g['mean']:.3g}, σrms {g['rms']:.3g}"
                  if measured else "end-to-end gain: not measured (no Jacobian spectra with iters=0)")
                 if not self.residual else "end-to-end gain: no product over depth (skip connections carry the gradient "
                 "around each layer's Jacobian); each layer's gain→top is measured through them"]
        if self.mean_field:
            from gradwatch.probe.verdict import within_range  # (verdict imports this module)
            m = self.mean_field
            measured = (f"measured {self.chi_measured:.4g}" if math.isfinite(self.chi_measured)
                        else "not measured: no hidden layer between the first and the last")
            drop = f", dropout {1 - m.keep:.3g}" if m.keep < 1 else ""
            lines.append(f"mean field ({m.activation}, σw²={m.sigma_w2:.3g}, σb²={m.sigma_b2:.3g}{drop}): "
                         f"q*={m.q_star:.3g}, "
                         f"χ₁={m.chi1:.4g} ({measured}), ξ={m.depth_scale:.3g}, depth {m.depth}"
                         + (" ≤ 6ξ" if not m.too_deep else " > 6ξ" if within_range(m.gain)
                            else " > 6ξ: too deep to train")
                         + (f"; from q={m.q0:.3g} at the first layer, gain over this depth {m.gain:.3g}"
                            if math.isfinite(m.q0) else ""))
        elif self.mean_field_note:
            lines.append(f"mean field: {self.mean_field_note}")
        for r in self.recurrent:
            # the length says when the sequence was too short to tell (a batch_first=False layer given N,T,C)
            h = (f"beyond the sequence of {len(r.profile) - 1} steps" if r.horizon is None
                 else f"{r.horizon} steps ({r.direction})")
            lines.append(f"{r.name} layer {r.layer} ({r.kind}): BPTT horizon {h}, rate/step {r.rate:.3g}, "
                         f"W_hh σmax {r.spectral_norm:.3g}, ρ {r.spectral_radius:.3g} vs 1/γ = {r.bound:.3g}"
                         + ("".join(f"; {n}" for n in r.notes)))
        return lines + self.notes

    def plot(self, path: str) -> None:
        """PNG: gradient profile and Jacobian profile by depth (and BPTT profiles for recurrent layers)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 3 if self.recurrent else 2
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
        depth = [x.index for x in self.layers]
        ax = axes[0]
        ax.semilogy(depth, [_pos(x.grad_out_norm) for x in self.layers], "o-", label="‖∂L/∂s‖ (pre-activation)")
        ax.semilogy(depth, [_pos(x.grad_w_norm) for x in self.layers], "s--", label="‖∂L/∂W‖")
        ax.set(xlabel="layer (0 = input side)", ylabel="gradient norm", title="backward signal by depth")
        ax.legend(fontsize=8)
        ax = axes[1]
        if any(math.isfinite(x.sigma_mean) or math.isfinite(x.sigma_max) for x in self.layers):
            ax.semilogy(depth, [_pos(x.sigma_max) for x in self.layers], "o-", label="σmax (power iteration)")
            ax.semilogy(depth, [_pos(x.sigma_mean) for x in self.layers], "s-", label="mean σ (SLQ)")
            cum, prod = [], 1.0
            for x in reversed(self.layers):  # gain from each layer to the output
                prod *= x.sigma_mean if math.isfinite(x.sigma_mean) else 1.0
                cum.append(prod)
            ax.semilogy(depth, [_pos(v) for v in cum[::-1]], "k:", label="∏ mean σ, layer→output")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.legend(fontsize=8)
        else:  # iters=0: no spectrum was measured; a product of none is no gain of 1
            ax.text(0.5, 0.5, "not measured (iters=0)", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="layer (0 = input side)", ylabel="singular value", title="layer Jacobian by depth")
        if self.recurrent:
            ax = axes[2]
            for r in self.recurrent:
                ax.semilogy(range(len(r.profile)), [_pos(v) for v in r.profile], label=f"{r.name}[{r.layer}]")
            ax.axhline(VANISH, color="grey", lw=0.5)
            ax.axhline(EXPLODE, color="grey", lw=0.5)
            ax.set(xlabel="T − k", ylabel="‖∂L_T/∂h_k‖ / ‖∂L_T/∂h_T‖", title="gradient through time")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _pos(v: float) -> float:
    return v if math.isfinite(v) and v > 0 else NAN


def _fmt(v, kind: str) -> str:
    if kind == "s":
        return str(v)
    if kind == "d":
        return str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.0f}%" if kind == "%" else f"{v:.3g}"


def _finite(obj):
    """JSON has no NaN/Infinity: they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
