"""Healthy: a pre-LayerNorm TransformerEncoder over digit rows as tokens, AdamW with linear warm-up."""
SCENARIO = {
    "name": "h_transformer_warmup",
    "family": "transformer",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.53->0.147; acc 0.09->0.91; non-finite loss at step -; grads at step -; dL/ds first/last 1.6; |g| growth x5.8; dead 0; saturated -; update lower/upper 0.095; |w| x1.1",
}

import torch
from torch import nn

import _common as C


class RowTransformer(nn.Module):
    def __init__(self, d=32, layers=2, norm_first=True):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def main():
    torch.manual_seed(0)
    model = RowTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt, sched=sched)


if __name__ == "__main__":
    main()
