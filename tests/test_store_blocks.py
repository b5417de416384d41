"""A flush inserts each row with only the columns it recorded (`FlushBatch.layer_blocks`): most rows
hold 2 of the 10, and binding the 8 NULLs too made SQLite's share of a flush ~3x slower. The rows
stored must be the ones full rows store."""

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter
from gradwatch.store.schema import LAYER_COLUMNS

LAYERS = [LayerInfo(f"l{i}", "Linear", i, "param", 10, "") for i in range(4)]


def _table(writer: RunStoreWriter) -> list[tuple]:
    return writer.connection.execute("SELECT * FROM layer_stats ORDER BY step, layer").fetchall()


def test_blocks_store_what_full_rows_store():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, len(LAYERS), len(LAYER_COLUMNS)))
    values[rng.random(values.shape) < 0.6] = np.nan  # not recorded
    values[2, 1] = np.nan  # a layer with no row at a step
    values[3, 0, 0] = np.inf
    full, blocks = RunStoreWriter(None), RunStoreWriter(None)
    rows, by_columns = [], {}
    for s in range(values.shape[0]):
        for i, layer in enumerate(LAYERS):
            cells = values[s, i]
            if np.isnan(cells).all():
                continue
            rows.append((s, layer.name, *[None if np.isnan(v) else float(v) for v in cells]))
            columns = tuple(c for c, v in zip(LAYER_COLUMNS, cells) if not np.isnan(v))
            block = by_columns.setdefault(columns, ([], [], [[] for _ in columns]))
            block[0].append(s)
            block[1].append(layer.name)
            for col, v in zip(block[2], cells[~np.isnan(cells)]):
                col.append(float(v))
    full.write(FlushBatch(LAYERS, layer_rows=rows))
    blocks.write(FlushBatch(LAYERS, layer_blocks=[(c, *b) for c, b in by_columns.items()]))
    assert len(by_columns) > 1
    assert _table(blocks) == _table(full)


def test_a_watchs_flush_binds_only_the_recorded_columns():
    """Steps between samples record the gradient norm and the non-finite count only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    watch = gradwatch.watch(model, opt, sample_every=2, warn=False, status=False)
    statements = []
    watch._writer.connection.set_trace_callback(statements.append)
    norms = []
    for _ in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        norms.append(torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm().item())
        opt.step()
    run = watch.series()
    watch.detach()
    inserts = [s for s in statements if s.startswith("INSERT OR REPLACE INTO layer_stats")]
    assert inserts and all(", ".join(LAYER_COLUMNS) not in s for s in inserts)
    assert any("(step, layer, grad_norm, nonfinite)" in s for s in inserts)
    col = run.column("0")
    assert np.allclose(run.metrics["grad_norm"][:, col], norms, rtol=1e-6, atol=0)
    assert np.isnan(run.metrics["act_mean"][1::2, run.column("1")]).all()  # not recorded between samples
    assert not np.isnan(run.metrics["act_mean"][0::2, run.column("1")]).any()
