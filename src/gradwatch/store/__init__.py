"""The run store: one SQLite file per process, series out as numpy arrays."""

from gradwatch.store.series import LayerInfo, RunSeries
