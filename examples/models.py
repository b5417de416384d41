"""Model factories to probe before training (they know nothing of gradwatch):

    gradwatch probe examples/models.py:sigmoid_mlp --input-shape 32,64    # vanishing: a verdict and its fix
    gradwatch probe examples/models.py:relu_mlp --input-shape 32,64       # the same depth, He init: healthy
    gradwatch probe examples/models.py:rnn --input-shape 32,50,8          # the BPTT horizon of a tanh RNN

The same nets as examples/train_mlp.py (64 wide, 8 hidden layers, 10 classes).
"""

from torch import nn


def mlp(act: type[nn.Module], depth: int = 8, width: int = 64) -> nn.Sequential:
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), act())]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def sigmoid_mlp() -> nn.Sequential:
    """torch's default init: sigmoid' <= 0.25 shrinks the gradient at every layer."""
    return mlp(nn.Sigmoid)


def relu_mlp() -> nn.Sequential:
    """He init, zero biases: the gradient keeps its size through the depth (He et al. 2015)."""
    net = mlp(nn.ReLU)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


class LastStep(nn.Module):
    """A tanh RNN read out at its last time step: inputs (batch, time, features)."""

    def __init__(self, features: int = 8, hidden: int = 32):
        super().__init__()
        self.rnn = nn.RNN(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def rnn() -> LastStep:
    return LastStep()
