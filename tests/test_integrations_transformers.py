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
    assert run.meta["grad_clip"] == f"the total norm to {CLIP:g} (max_grad_norm)"  # the norms above are before it
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
    # the end of training says where the run is and how to draw it (before: nothing)
    assert any(f"gradwatch: 20 steps recorded in {tmp_path / 'gradwatch'}" in r.getMessage()
               and "gradwatch report" in r.getMessage() for r in caplog.records)


def test_a_training_that_ended_on_an_exception_is_detached_when_the_next_starts(tmp_path):
    """HF's Trainer calls no callback when training raises (a KeyboardInterrupt in a notebook):
    the watch stayed attached, and `trainer.train()` again added a second one beside it, both
    recording every step. The callback's next training now detaches the abandoned watch first."""
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = GradwatchCallback(tmp_path)

    def step():
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()

    first = callback.recorder.start(model, opt, tmp_path, "transformers")
    step()  # ... and the training raises: no on_train_end
    second = callback.recorder.start(model, opt, tmp_path, "transformers")
    for _ in range(3):
        step()
    assert first.step == 1 and second.step == 3
    callback.recorder.finish()
    assert list(gw.read_run(tmp_path).steps) == [0, 1, 2]


def test_a_training_resumed_from_a_checkpoint_continues_the_run(tmp_path):
    """Before, a resume at global step 5 recorded steps 0-4 and deleted the store of the training
    it resumed. Now its steps are 5 on; the earlier ones are kept, and those the first training
    recorded after the checkpoint are replaced by the resumed training's."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (40, 16))]

    def train(max_steps, **kwargs):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, report_to=[],
            use_cpu=True, save_strategy="steps", save_steps=5, learning_rate=1e-3, disable_tqdm=True,
            dataloader_num_workers=0)
        torch.manual_seed(1)
        trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data,
                                       callbacks=[GradwatchCallback(flush_every=3, sample_every=2)])
        trainer.train(**kwargs)
        return gw.read_run(tmp_path / "gradwatch")

    first = train(10)
    assert list(first.steps) == list(range(10))
    run = train(8, resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert list(run.steps) == list(range(8))
    np.testing.assert_array_equal(run.loss[:5], first.loss[:5])
    np.testing.assert_allclose(run.loss[5:], first.loss[5:8], rtol=1e-3)  # the same steps, taken again
