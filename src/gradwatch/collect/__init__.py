"""Collecting per-layer statistics from a training run: `watch`, `Watch`."""

from gradwatch.collect.watch import Watch, watch

__all__ = ["Watch", "watch"]
