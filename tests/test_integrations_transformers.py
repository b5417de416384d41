"""Hugging Face Trainer + GradwatchCallback: a 20-step training of a tiny GPT-2 built from a config
(nothing downloaded). The store holds every step, and its per-layer norms add up to the pre-clip
`grad_norm` the Trainer logs, with clipping active at every step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradwatch as gw  # noqa: E402
from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402

CLIP = 0.05


def test_hf_trainer_records_preclip_norms(tmp_path, caplog):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (80, 16))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        max_grad_norm=CLIP, logging_steps=1, save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
        dataloader_num_workers=0)
    callback = GradwatchCallback(flush_every=7, sample_every=5)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

    run = gw.read_run(tmp_path / "gradwatch")
    assert len(run.steps) == 20 and list(run.steps) == list(range(20))
    assert run.meta["framework"].startswith("transformers")
    total = np.sqrt(np.nansum(run.metrics["grad_norm"] ** 2, axis=1))
    logged = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    assert len(logged) == 20
    for step, norm in logged.items():  # the Trainer's global_step counts finished steps: ours is 0-based
        assert total[step - 1] == pytest.approx(norm, rel=1e-4)
    assert min(logged.values()) > 2 * CLIP  # clipping changed every step: these are pre-clip norms
    assert np.isfinite(run.metrics["update_ratio"]).sum() > 0  # sampled steps have their updates
    findings = json.loads((tmp_path / "gradwatch" / "findings.json").read_text())
    assert isinstance(findings, list)
    assert callback.watch is not None and callback.recorder.findings is not None
