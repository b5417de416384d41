"""Device-side reductions. Each returns small tensors on the device; nothing here reads the host.

Definitions (docs/statistics.md): a layer's gradient norm is the L2 norm over all its
parameters' gradient entries; activation statistics are over every element of the output;
a unit is a channel (dim 1) of a 4-D/5-D output, else a feature (last dim), and it is dead when
it is exactly zero for every sample of the batch.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from gradwatch.collect.layers import ASYMPTOTE_BAND, SATURATING

MISSING = -1.0  # marks a parameter with no gradient at this step (norms are >= 0 or NaN)
# "Zero for every sample" says a unit is dead only over enough samples: a live ReLU unit that fires
# for half the inputs is zero for all of 8 samples with probability 0.4%. Fewer: not recorded.
MIN_DEAD_SAMPLES = 8


def entries(grad: torch.Tensor) -> torch.Tensor:
    """A gradient's stored entries: a sparse one's (nn.Embedding(sparse=True)) coalesced values,
    duplicates summed. The entries it leaves out are zeros, which change no norm or max |g|."""
    return grad.coalesce().values() if grad.is_sparse else grad


def norm32(x: torch.Tensor, ord: float = 2.0, dim: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`x`'s norm as float32, as the store keeps it: float32 and narrower tensors summed in float32,
    a float64 one in its own precision (vector_norm refuses to narrow: watching a float64 model
    crashed at its first backward), then rounded to float32."""
    if x.dtype != torch.float64:
        return torch.linalg.vector_norm(x, ord, dim=dim, dtype=torch.float32, out=out)
    value = torch.linalg.vector_norm(x, ord, dim=dim).float()
    return value if out is None else out.copy_(value)


def foreach_norm32(tensors: list[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """`norm32` of each tensor, as one float32 vector (one fused call where none is float64)."""
    dtypes = {t.dtype for t in tensors}
    if dtypes == {torch.float32}:  # (asking float32 of float32 took the foreach call twice as long)
        return torch.stack(torch._foreach_norm(tensors, ord))
    if torch.float64 in dtypes:
        return torch.stack([n.float() for n in torch._foreach_norm(tensors, ord)])
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float32))


def norms(tensors: list[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """Per-tensor norms as one vector, one fused call."""
    if not tensors:
        return torch.empty(0)
    return torch.stack(torch._foreach_norm(tensors, ord))


def shape_groups(keys: list) -> list[list[int]]:
    """Positions of equal keys (a tensor's shape and dtype), grouped, in order of first appearance."""
    groups: dict = {}
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def unit_dim(ndim: int) -> int:
    """The unit axis of an output with `ndim` dims: channels of a 4-D/5-D one, else features."""
    return 1 if ndim in (4, 5) else ndim - 1


# autograd nodes whose 3-D output is (N, C, L), channels first: a Conv1d's, a BatchNorm1d's, a
# GroupNorm's, a pool's; and those that keep their input's layout (an activation, a bias or residual
# added, dropout), looked through to the layer that made it
_CHANNELS_FIRST = re.compile(r"Convolution|Conv|BatchNorm|GroupNorm|Pool")
_ELEMENTWISE = re.compile(r"^(Relu|Threshold|LeakyRelu|Rrelu|Prelu|Gelu|Silu|Mish|Elu|Celu|Selu|Sigmoid|Tanh|"
                          r"Hardtanh|Hardsigmoid|Hardswish|Softplus|Softsign|Add|Sub|Mul|Div|Clamp|Clone|"
                          r"NativeDropout|Dropout|Neg|Abs|Exp|Log|Pow|Sqrt)")


def unit_axis(y: torch.Tensor) -> int:
    """The unit axis of an output `y`: `unit_dim`, but for a 3-D output a Conv1d (or a norm or pool
    of one) made, read from its autograd graph, its channels (N, C, L), not its length: a sequence
    (N, T, H) from a Linear, an embedding or a recurrent layer has its units last. Counted over the
    length, 87.5% dead Conv1d channels read as none dead."""
    if y.dim() != 3:
        return unit_dim(y.dim())
    node = y.grad_fn
    for _ in range(8):
        if node is None:
            break
        name = type(node).__name__
        if _CHANNELS_FIRST.search(name):
            return 1
        # a slice or a split moves no axis: a causal conv's chomp (`x[:, :, :-pad]`, a TCN's), a WaveNet
        # gate's half of the channels (`z[:, :C]`, `chunk(2, dim=1)`)
        kept = name.startswith(("Slice", "Narrow", "Split", "UnsafeSplit"))
        if not (_ELEMENTWISE.match(name) or kept) or not node.next_functions:
            break
        node = node.next_functions[0][0]
    return 2


def activation_stats(y: torch.Tensor, activation: str, unit: int | None = None) -> torch.Tensor:
    """[mean, std, saturated fraction (NaN if not saturating), dead-unit fraction]; `unit`: the
    units' axis (default `unit_axis(y)`)."""
    unit = unit_axis(y) if unit is None else unit
    return activation_stats_stacked(y.detach().float().unsqueeze(0), activation, unit)[0]


def _wide_std(ys: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dims: tuple, numel: int) -> torch.Tensor:
    """`std` where it is finite, else taken again in float64: float32's sum of squares overflows
    past |y - mean| ~1e19 though every value is finite (a tester's lr-200 run was told NaN/Inf
    appeared in its activations). On the CPU only, where the test costs no sync; a row holding
    NaN/Inf stays non-finite."""
    wide = torch.linalg.vector_norm(ys.double() - mean.double().reshape(-1, *[1] * (ys.dim() - 1)), dim=dims)
    wide = (wide / math.sqrt(numel - 1)).clamp(max=torch.finfo(torch.float32).max).float()
    return torch.where(torch.isfinite(std), std, wide)


def activation_stats_stacked(ys: torch.Tensor, activation: str, unit: int | None = None) -> torch.Tensor:
    """`activation_stats` of each of `ys` (float32 outputs of one shape, stacked along dim 0), as
    rows. Each row is bitwise the one of its output alone (on the CPU, tested): one set of ~10
    kernels for all (~90 µs per output alone, ~1000 outputs in a sampled step of a 2000-tensor MLP)."""
    if ys.dim() == 1:  # 0-dim outputs, as outputs of shape (1,): `dim=()` would reduce every row together
        ys = ys.unsqueeze(1)
    n, shape = ys.shape[0], ys.shape[1:]
    dims = tuple(range(1, ys.dim()))
    mean = ys.mean(dim=dims)
    numel = shape.numel()
    if numel > 1:  # two passes, mean then the norm of the deviations: ~20x faster than
        # torch.std_mean on the CPU and as exact (no cancellation as in E[y²] - E[y]²)
        std = torch.linalg.vector_norm(ys - mean.reshape(n, *[1] * len(shape)), dim=dims) / math.sqrt(numel - 1)
        if ys.device.type == "cpu" and not bool(torch.isfinite(std).all()):
            std = _wide_std(ys, mean, std, dims, numel)
    else:
        std = torch.zeros(n, device=ys.device)
    bounds = SATURATING.get(activation)
    if bounds is None:
        saturated = _nan(ys.device).expand(n)
    else:
        low, high = bounds
        band = ASYMPTOTE_BAND * max(abs(low), abs(high))
        saturated = ((ys <= low + band) | (ys >= high - band)).float().mean(dim=dims)
    unit = unit_dim(len(shape)) if unit is None else unit
    if len(shape) >= 2 and numel // shape[unit] >= MIN_DEAD_SAMPLES:
        d = 1 + unit
        # 7x faster than (y != 0).any; `!= 0`, not `> 0`: a NaN unit is not zero, so not dead (the
        # non-finite values are a finding of their own)
        alive = ys.abs().amax(dim=tuple(i for i in dims if i != d)) != 0
        dead = 1.0 - alive.float().mean(dim=1)
    else:
        dead = _nan(ys.device).expand(n)
    return torch.stack([mean, std, saturated, dead], dim=1)


@functools.cache
def _nan(device: torch.device) -> torch.Tensor:
    """A NaN scalar on `device`, made once (torch.stack copies it): one kernel less a sampled layer."""
    return torch.full((), math.nan, device=device)


def rms(g: torch.Tensor) -> torch.Tensor:
    """Root mean square of a tensor's entries (a size-independent gradient scale)."""
    return torch.linalg.vector_norm(g.detach().float()) / math.sqrt(max(g.numel(), 1))


def time_profile(g: torch.Tensor, time_dim: int) -> torch.Tensor:
    """L2 norm of a sequence gradient at each time step."""
    g = g.detach().float().movedim(time_dim, 0)
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
