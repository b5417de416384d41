"""Activations called as functions in forward() (`F.relu(self.fc1(x))`, `torch.sigmoid(...)`), found
in a loss's autograd graph: no module runs them, so no hook sees their outputs. An MLP with
F.relu, 95% of its first layer's units dead after SGD at lr 0.5, read as nothing dead until every
unit was (100 steps later), and its stalled loss was told to raise the lr tenfold."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

# The autograd nodes of the functions whose outputs tell a fault (dead ReLUs, saturated sigmoid and
# tanh), each saving its output (`_saved_result`): the activations themselves, read with no recompute.
NODES = {"ReluBackward0": "relu", "SigmoidBackward0": "sigmoid", "TanhBackward0": "tanh"}
APPLY = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
MAX_NODES = 100_000  # a graph walked no further: a bound on one sampled step's cost (~1 µs a node)


def find(roots: Iterable[object], produced: dict[int, tuple[int, str]], module_outputs: dict[int, int]
         ) -> tuple[dict[int, list[tuple[str, torch.Tensor, object]]], dict[int, int]]:
    """({layer position: [(activation, its output, the layer output's node), ...]} for the activation nodes of the graph behind
    `roots` (a backward's tensors) whose input is a layer's output as it left the layer, {layer
    position: its outputs in the graph}: a layer called twice, once through F.relu and once not,
    is no layer followed by F.relu.
    `produced`: id(output's grad_fn) -> (layer position, the node's class name, which guards an id
    reused by another node); `module_outputs`: ids of activation modules' output nodes (nn.ReLU's own,
    read by its hook), each to its position. Nodes are compared while the graph holds them, so their ids are theirs; the
    entries of `produced` this graph held are taken out (its backward frees them, and a node made
    later may take one's id), the others left for the step's next backward (a GAN's G after D)."""
    seen: set[int] = set()
    found: dict[int, list[tuple[str, torch.Tensor, object]]] = {}
    for node in _nodes(roots):
        seen.add(id(node))
        pos = None if id(node) in module_outputs else _layer_under(node, produced)
        if pos is None:
            continue
        act, source = NODES[type(node).__name__], node.next_functions[0][0]
        try:
            out = node._saved_result
        except RuntimeError:  # freed (a graph already run backward with retain_graph=False)
            continue
        found.setdefault(pos, []).append((act, out, source))
    outputs: dict[int, int] = {}
    for key in seen & produced.keys():
        pos = produced.pop(key)[0]
        outputs[pos] = outputs.get(pos, 0) + 1
    return found, outputs


def reaching_output(roots: Iterable[object], produced: dict[int, tuple[int, str]], module_outputs: dict[int, int],
                    stops: set[int]) -> set[int]:
    """The positions of the activations the loss behind `roots` takes through no layer with weights:
    activation modules (`module_outputs`: id of an output's node -> position) and the layers whose
    output an activation function took (`produced`, as in `find`), reached before any weight layer's
    output node (`produced`, `stops`: a recurrent layer's). The output's own, also a head's that
    another head runs after (an objectness sigmoid, then a box head), which the call order alone
    takes for hidden: its saturation is a confident prediction, not a block. Walked before `find`,
    which takes the graph's entries out of `produced`."""
    found: set[int] = set()
    layer_output = lambda node: id(node) not in module_outputs and (id(node) in produced or id(node) in stops)
    for node in _nodes(roots, past=lambda node: not layer_output(node)):  # (behind a layer's output: hidden)
        pos = module_outputs.get(id(node))
        if pos is None and not layer_output(node):
            pos = _layer_under(node, produced)
        if pos is not None:
            found.add(pos)
    return found


def _nodes(roots: Iterable[object], past: Callable[[object], bool] = lambda node: True) -> Iterator[object]:
    """Each node of the graph behind `roots` once, depth first, at most `MAX_NODES`; the nodes behind
    a node only where `past(node)`."""
    stack = [t.grad_fn for t in _tensors(roots) if t.grad_fn is not None]
    seen: set[int] = set()
    while stack and len(seen) < MAX_NODES:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if past(node):
            stack.extend(n for n, _ in node.next_functions if n is not None)


def _layer_under(node: object, produced: dict[int, tuple[int, str]]) -> int | None:
    """The position of the layer whose output `node`, an activation function's, took as it left the
    layer (`produced`, its class guarding a reused id), else None."""
    nexts = node.next_functions
    if type(node).__name__ not in NODES or not nexts or nexts[0][0] is None:
        return None
    pos = produced.get(id(nexts[0][0]))
    return pos[0] if pos is not None and pos[1] == type(nexts[0][0]).__name__ else None


def _tensors(roots: object) -> list[torch.Tensor]:
    if isinstance(roots, torch.Tensor):
        return [roots]
    if isinstance(roots, (list, tuple)):
        return [t for t in roots if isinstance(t, torch.Tensor)]
    return []


def made_from(node: object, params: list[torch.Tensor], depth: int = 4) -> bool:
    """One of `params` is a leaf of `node` within `depth` steps (a Linear's addmm holds its bias, and
    its weight through a transpose; a 3-D input's adds a view), not through an activation (the
    input's, to the layer below): the node is that layer's output, not one that took a freed node's
    id (under load, a thread's teacher run before the training lent its ids to the model's)."""
    wanted = {id(p) for p in params}
    frontier, seen = [node], set()
    for _ in range(depth):
        nexts = []
        for n in frontier:
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if id(getattr(n, "variable", None)) in wanted:
                return True
            if n is node or type(n).__name__ not in NODES:  # (not through the input's activation
                nexts += [m for m, _ in n.next_functions]  # to the layer below and its weights)
        frontier = nexts
    return any(id(getattr(n, "variable", None)) in wanted for n in frontier if n is not None)
