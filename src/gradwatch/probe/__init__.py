"""Predict before training: per-layer gradient flow at initialisation from one batch (docs/probe.md)."""

from gradwatch.probe.core import probe
from gradwatch.probe.recurrent import RecurrentProbe, probe_cell
from gradwatch.probe.result import LayerProbe, ProbeResult

__all__ = ["probe", "probe_cell", "ProbeResult", "LayerProbe", "RecurrentProbe"]
