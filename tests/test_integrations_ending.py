"""At the end of a training, the Lightning and Hugging Face callbacks say where the run is stored
and the command that draws it (before, they were silent: the store's place was for the user to
guess)."""

from __future__ import annotations

import logging
import shlex

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.integrations._trainer import ending


def test_the_ending_line_counts_steps_and_findings_and_quotes_the_path(tmp_path):
    out = tmp_path / "my runs" / "gradwatch"
    finding = gw.Finding(kind="vanishing_gradient", severity="error", first_step=0, layers=("fc",), message="m")
    line = ending(1, [finding], out)
    assert "1 step recorded" in line and "1 finding (worst: error)" in line
    assert line.endswith(f"gradwatch report {shlex.quote(str(out))}")
    assert "12 steps recorded" in ending(12, [], out) and "no findings" in ending(12, [], out)


def test_lightning_says_where_the_run_is_at_the_end_of_fit(tmp_path, capfd, caplog):
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradwatchCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def training_step(self, batch, i):
            return nn.functional.mse_loss(self.fc(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    caplog.set_level(logging.INFO)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[GradwatchCallback()])
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    # Lightning's `rank_zero_info` goes to its own stderr handler, or (once another test set up
    # logging) to the root logger: either way the user sees it
    streams = capfd.readouterr()
    said = streams.out + streams.err + caplog.text
    out = tmp_path / "gradwatch"
    assert f"gradwatch: 3 steps recorded in {out}" in said
    assert f"gradwatch report {shlex.quote(str(out))}" in said
    assert len(gw.read_run(out).steps) == 3
