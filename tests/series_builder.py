"""Hand-built `RunSeries` for testing the rules without training."""

from __future__ import annotations

import numpy as np

from gradwatch.store.series import METRICS, LayerInfo, RunSeries


def build(n_steps: int = 100, depth: int = 5, activation: str = "relu", sample_every: int = 10,
          optimizer: str = "SGD", lr: float = 0.1) -> RunSeries:
    """A healthy-looking run: `depth` Linear layers each followed by an activation, level relative
    gradients, small updates, a falling loss. Tests then bend one series."""
    layers = []
    for i in range(depth):
        layers.append(LayerInfo(f"fc{i}", "Linear", 2 * i, "param", 100))
        if i < depth - 1:
            layers.append(LayerInfo(f"act{i}", activation.capitalize(), 2 * i + 1, "activation", 0, activation))
    steps = np.arange(n_steps)
    metrics = {m: np.full((n_steps, len(layers)), np.nan) for m in METRICS}
    params = [i for i, l in enumerate(layers) if l.role == "param"]
    acts = [i for i, l in enumerate(layers) if l.role == "activation"]
    rng = np.random.default_rng(0)
    sampled = steps % sample_every == 0
    for c in params:
        metrics["grad_norm"][:, c] = 1.0 + 0.1 * rng.random(n_steps)
        metrics["weight_norm"][sampled, c] = 10.0
        metrics["update_ratio"][sampled, c] = 1e-3
        metrics["grad_out_rms"][sampled, c] = 0.01
        metrics["grad_max"][sampled, c] = 0.1
    for c in acts:
        metrics["act_mean"][sampled, c] = 0.3
        metrics["act_std"][sampled, c] = 0.5
        metrics["dead"][sampled, c] = 0.05
        metrics["saturated"][sampled, c] = 0.01 if activation in ("sigmoid", "tanh") else np.nan
        metrics["grad_out_rms"][sampled, c] = 0.01
    loss = 2.0 * np.exp(-steps / 30) + 0.1 + 0.02 * rng.random(n_steps)
    return RunSeries(layers, steps, loss, np.full(n_steps, lr), metrics,
                     meta={"optimizer": optimizer, "sample_every": sample_every, "skipped_steps": []})


def sampled(run: RunSeries) -> np.ndarray:
    return np.flatnonzero(~np.isnan(run.metrics["weight_norm"][:, run.column("fc0")]))


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]
