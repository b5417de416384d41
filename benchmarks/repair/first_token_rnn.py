"""Why `gradwatch fix` misses `v_rnn_tanh_long`: the remedies a short screening would have to tell
apart read the same at its length. A GRU or an LSTM in place of the scenario's vanilla RNN, with or
without its memory gate opened (bias 1), on the scenario's task (60-step sequences, the label set
by the first step), under Adam at fix's default lr (1e-3) and at the healthy variant's (1e-2): the
loss (mean of the 10 steps before) at 25 and 50 steps, where fix screens, and at 100 and 200.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/repair/first_token_rnn.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detection" / "scenarios"))
import _common as C  # noqa: E402

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
AT = (25, 50, 100, 200)


def open_gate(rnn: nn.Module) -> None:
    """The memory gate's bias 1 (LSTM's forget gate, GRU's update gate: rows n..2n)."""
    n = rnn.hidden_size
    with torch.no_grad():
        rnn.bias_ih_l0[n:2 * n].fill_(1.0)
        rnn.bias_hh_l0[n:2 * n].zero_()


def losses_at(cell: str, gate: bool, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    rnn = CELLS[cell](4, 32, batch_first=True)
    if gate:
        open_gate(rnn)
    model = C.SeqClassifier(rnn, 32, 2)
    with contextlib.redirect_stdout(io.StringIO()):  # (C.train prints its RESULT line)
        losses = C.train(model, C.first_token_task(T=60), nn.CrossEntropyLoss(), steps=max(AT),
                         opt=torch.optim.Adam(model.parameters(), lr=lr))
    return [sum(losses[s - 10:s]) / 10 for s in AT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print("| cell | gate bias 1 | Adam lr | " + " | ".join(f"loss at {s} (min-max over seeds)" for s in AT) + " |")
    print("|---|---|---|" + "---|" * len(AT))
    for lr in (1e-3, 1e-2):
        for cell in CELLS:
            for gate in (False, True):
                runs = [losses_at(cell, gate, lr, seed) for seed in args.seeds]
                spans = [f"{min(r[i] for r in runs):.3f}-{max(r[i] for r in runs):.3f}" for i in range(len(AT))]
                print(f"| {cell} | {'yes' if gate else 'no'} | {lr:g} | " + " | ".join(spans) + " |", flush=True)


if __name__ == "__main__":
    main()
