"""The run store: one SQLite file per process, series out as numpy arrays."""

from gradwatch.store.ending import end_note, partial_note
from gradwatch.store.reader import read_run, store_files
from gradwatch.store.series import LayerInfo, RunSeries
from gradwatch.store.writer import FlushBatch, RunStoreWriter

__all__ = ["end_note", "partial_note", "read_run", "store_files", "LayerInfo", "RunSeries", "FlushBatch", "RunStoreWriter"]
