"""HF Trainer under torchrun (2 CPU processes, gloo) with GradwatchCallback: each rank's data
differ, so its local gradients differ from the averaged ones the optimizer applies. Rank 0 writes
the per-layer norms it sees before each optimizer step (after DDP's all-reduce; no clipping) and
the Trainer's log to OUT/applied.json."""
import json
import sys

import torch
import transformers

from gradwatch.integrations.transformers import GradwatchCallback
from train import leave

LAYERS = ("transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn")


class Applied(transformers.TrainerCallback):
    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        modules = dict(model.named_modules())
        self.norms.append({n: float(torch.cat([p.grad.flatten() for p in modules[n].parameters()]).norm())
                           for n in LAYERS})


if __name__ == "__main__":
    out = sys.argv[1]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32,
                                                                 n_layer=2, n_head=2))
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (64, 16))]
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", learning_rate=1e-3, disable_tqdm=True, max_grad_norm=0.0,
        dataloader_num_workers=0, ddp_backend="gloo")
    applied = Applied()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[GradwatchCallback(flush_every=4, sample_every=2), applied])
    trainer.train()
    if args.process_index == 0:
        with open(f"{out}/applied.json", "w") as fh:
            json.dump({"norms": applied.norms, "log": trainer.state.log_history}, fh)
    leave()  # (train.py: the Trainer too leaves its gloo group to the interpreter's exit)
