"""What the `gradwatch probe` command needs before it can call `probe`: the model from a factory
path, a random batch of a given shape, a loss."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from gradwatch.errors import ConfigError
from gradwatch.probe.record import first_tensor

LOSSES = ("projection", "sumsq", "mse", "cross_entropy")
SHAPE_ADVICE = "pass the --input-shape the model expects (batch size first)"


def load_factory(path: str) -> nn.Module:
    """'package.module:factory' -> factory(); the current directory is importable, as with `python -m`.
    'path/to/models.py:factory' works too: the file is imported by its name with its folder importable,
    as `python path/to/models.py` would see it."""
    mod_name, sep, attr = path.rpartition(":")
    file = None
    if not sep or not mod_name or not attr:
        raise ConfigError(f"factory {path!r} is not of the form package.module:factory (or file.py:factory)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
        file = Path(mod_name)
        if not file.is_file():
            raise ConfigError(f"factory {path!r}: no such file {mod_name!r}; pass a Python file that exists, "
                              "or a module name (package.module:factory)")
        folder = str(file.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        mod_name = file.stem
    argv, sys.argv = sys.argv, [str(file) if file is not None else mod_name]  # as `python models.py` sees it
    try:  # (gradwatch's own arguments were parsed by a module-level argparse: "unrecognized arguments: probe")
        module = importlib.import_module(mod_name)
    except SystemExit as exc:
        raise ConfigError(f"factory {path!r}: importing {mod_name!r} exited (code {exc.code}): it runs a script when "
                          "imported; put that code under `if __name__ == '__main__':`, or pass a module that defines "
                          "the model without running anything") from None
    except Exception as exc:  # noqa: BLE001  any import failure is the user's to fix
        frame = "" if isinstance(exc, SyntaxError) else user_frame(exc)
        raise ConfigError(f"factory {path!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc}{frame}); "
                          f"{_import_advice(exc, mod_name, file)}") from exc
    finally:
        sys.argv = argv
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"factory {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    needed = _required_args(obj) if callable(obj) and not isinstance(obj, nn.Module) else []
    if needed:
        raise ConfigError(f"factory {path!r} needs arguments ({', '.join(needed)}) and the CLI calls it with none: "
                          f"add a function without arguments that calls it, e.g. def make(): return "
                          f"{attr.split('.')[-1]}({', '.join(f'{n}=...' for n in needed)}), and pass {mod_name}:make")
    try:
        model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    except Exception as exc:  # noqa: BLE001
        cause = known_cause(exc)
        raise ConfigError(f"factory {path!r} raised {type(exc).__name__}: {exc}{user_frame(exc)}"
                          + (f"; {cause}" if cause else "")) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_advice(exc: BaseException, mod_name: str, file: Path | None = None) -> str:
    """What to do about a module that does not import: only a module that is not found is a matter
    of where gradwatch runs from (a SyntaxError or a missing dependency was told to set PYTHONPATH).
    A package of the project itself (src/mypkg of a src layout, not installed) is not a missing
    dependency: it was told "install it"."""
    if isinstance(exc, SyntaxError):
        return "fix that line: the file does not compile"
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing and missing != mod_name and not mod_name.startswith(missing + "."):
        folder = _folder_with(missing.split(".")[0], file)
        if folder is not None:
            return (f"it imports {missing!r}, which is in {folder} but not on this Python's path: "
                    f"set PYTHONPATH={folder} (or pip install -e the project)")
        return (f"it imports {missing!r}, which this Python ({sys.executable}) does not have: install it there, "
                "or run gradwatch from the environment that has it")
    if isinstance(exc, ModuleNotFoundError):
        return "run from the directory that contains the package or set PYTHONPATH"
    return known_cause(exc) or "the module's own code raised while it was imported: fix it there"


def _folder_with(name: str, file: Path | None) -> str | None:
    """The folder, among the current directory, its src/, and the factory file's parent folders, that
    holds package or module `name` (<name>/__init__.py or <name>.py); relative to the current directory
    when under it."""
    cwd = Path.cwd()
    folders = [cwd, cwd / "src"] + (list(file.resolve().parents) if file is not None else [])
    for folder in folders:
        if (folder / name / "__init__.py").is_file() or (folder / f"{name}.py").is_file():
            try:
                return str(folder.relative_to(cwd)) if folder != cwd else "."
            except ValueError:
                return str(folder)
    return None


CUDA_MISSING = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "No CUDA GPUs are available",
                "CUDA driver initialization failed", "but torch.cuda.is_available() is False")


def known_cause(exc: BaseException, batch_shape: tuple[int, ...] | None = None) -> str:
    """Advice for failures that no input shape fixes, known by torch's own message ("" for others):
    code that moves tensors to CUDA on a machine without it, where the advice was "pass the
    --input-shape the model expects"; BatchNorm in train mode given one value per channel.
    `batch_shape`: the CLI's --input-shape, to write the one that works."""
    text = str(exc)
    if "Attempting to deserialize object on a CUDA device" in text:
        return ("a checkpoint saved on a GPU is loaded onto CUDA and this machine has none: load it with "
                "torch.load(..., map_location='cpu') (or map_location=the model's device)")
    if any(s in text for s in CUDA_MISSING):
        return ("the code moves tensors or modules to CUDA and this machine has none (torch.cuda.is_available() "
                "is False): make the device an argument, or take it from the weights "
                "(x.to(self.<layer>.weight.device)), in place of .cuda() / device='cuda'")
    if "Expected more than 1 value per channel when training" in text:
        fix = (f"--input-shape {','.join(map(str, (2, *batch_shape[1:])))}" if batch_shape is not None
               else "a batch of 2 or more, or model.eval() to use the running statistics")
        return f"BatchNorm in train mode normalises over the batch and needs more than one value per channel: {fix}"
    return ""


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"--input-shape {text!r} is not a list of positive integers like 32,3,32,32 "
                          "(batch size first)")
    return shape


def first_module(model: nn.Module) -> nn.Module | None:
    """The first leaf module in registration order (where the input goes, for Sequential-like models)."""
    return next((m for m in model.modules() if not list(m.children())), None)


def random_batch(model: nn.Module, shape: tuple[int, ...], *, vocab: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal inputs in the dtype of the model's first floating parameter (float64 and
    bfloat16 models too; the same draws whatever the dtype); integer tokens in [0, vocab) when the
    first module is an nn.Embedding (vocab defaults to its num_embeddings)."""
    first = first_module(model)
    if vocab is not None or isinstance(first, nn.Embedding):
        high = vocab if vocab is not None else first.num_embeddings
        if high <= 0:
            raise ConfigError(f"--vocab {high} must be positive")
        return torch.randint(0, high, shape, generator=generator)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(shape, generator=generator).to(dtype)


def layout_note(model: nn.Module, shape: tuple[int, ...]) -> str:
    """How a recurrent first layer reads --input-shape ("" for others): "batch size first" is wrong for
    an nn.RNN/GRU/LSTM with batch_first=False, which took 4,30,8 as 4 steps of a batch of 30, and the
    probe measured gradients through 4 steps where 30 were meant."""
    first = first_module(model)
    if not isinstance(first, nn.RNNBase) or len(shape) != 3:
        return ""
    name = next(n for n, m in model.named_modules() if m is first)
    t, n = (shape[1], shape[0]) if first.batch_first else (shape[0], shape[1])
    order = "N,T,C" if first.batch_first else "T,N,C: time first"
    return (f"'{name}' ({type(first).__name__}, batch_first={first.batch_first}) reads --input-shape "
            f"{','.join(map(str, shape))} as {t} time steps of a batch of {n} ({order})")


def make_loss(name: str, num_classes: int | None = None,
              generator: torch.Generator | None = None) -> Callable[[Any], torch.Tensor] | None:
    """None (probe's default ⟨r, y⟩/B, r fixed standard normal) for 'projection'; ½Σy²/B for 'sumsq'; MSE
    against standard normal targets; cross-entropy against uniform random labels over the classes (checked
    against num_classes): the last dimension of a 2-D or 3-D output (N,C or N,T,C), dimension 1 of a 4-D or
    5-D one (N,C,H,W as for segmentation)."""
    if name not in LOSSES:
        raise ConfigError(f"--loss {name!r} is not one of {', '.join(LOSSES)}")
    if name == "projection":
        return None
    if name == "sumsq":
        from gradwatch.probe.core import sumsq_loss
        return sumsq_loss
    from gradwatch.probe.record import output_tensor

    def loss(out: Any) -> torch.Tensor:
        y = output_tensor(out)
        if name == "mse":
            target = torch.randn(y.shape, generator=generator).to(y)
            return torch.nn.functional.mse_loss(y, target)
        dim = 1 if y.dim() >= 4 else -1  # N,C,H,W (segmentation): classes on dim 1, as F.cross_entropy
        classes = y.shape[dim]
        if num_classes is not None and classes != num_classes:
            raise ConfigError(f"--num-classes {num_classes} does not match the model's output of "
                              f"{classes} classes (dim {dim % y.dim()} of shape {tuple(y.shape)})")
        logits = y.movedim(dim, -1).reshape(-1, classes)
        target = torch.randint(0, classes, (logits.shape[0],), generator=generator).to(y.device)
        return torch.nn.functional.cross_entropy(logits, target)

    return loss


def check_fits(model: nn.Module, batch: torch.Tensor, factory: str) -> None:
    """One forward without gradients: an input that does not fit fails here, named, with where in the
    user's code and the advice that matches why (several inputs, a dict or object input, token ids,
    dtype, shape), not in the probe."""
    try:  # its warnings are dropped: a failing trial's are noise before the error, a passing one's the
        # probe's own forward gives again
        with torch.no_grad(), warnings.catch_warnings(record=True), running_layers(model) as running:
            warnings.simplefilter("always")
            model(batch)
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError, KeyError, AssertionError) as exc:
        # (AssertionError: torch's MultiheadAttention checks the rank of its input with one)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shape = ",".join(map(str, batch.shape))
        cause = known_cause(exc, tuple(batch.shape))
        if cause:  # not the shape: "does not fit" and the layer's layout would point the wrong way
            raise ConfigError(f"{factory} failed{failing_layer(running)} on the probe batch ({shape}): "
                              f"{type(exc).__name__}: {first}{user_frame(exc)}; {cause}") from exc
        advice = _advice(model, batch, exc, running)
        raise ConfigError(f"input shape {shape} does not fit {factory} ({str(batch.dtype).removeprefix('torch.')} "
                          f"batch): {type(exc).__name__}: {first}{user_frame(exc)}"
                          f"{expected_input(model, running, first=advice == SHAPE_ADVICE)}; {advice}") from exc


class Running(list):
    """The known layers (expects()) whose forward is running, outermost first, as (name, module,
    input); `ran`: how many calls of them started."""

    ran = 0


@contextlib.contextmanager
def running_layers(model: nn.Module) -> Iterator[Running]:
    """While in the block: the layers whose input layout is known that are running. A forward that
    raises leaves the layer it failed in on top."""
    stack = Running()
    handles = []

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append((name, module, first_tensor(args)))
            stack.ran += 1
        return hook

    def post(module: nn.Module, args: Any, out: Any) -> None:
        stack.pop()

    try:
        for name, m in model.named_modules():
            if expects(m):
                handles += [m.register_forward_pre_hook(pre(name or type(m).__name__)), m.register_forward_hook(post)]
        yield stack
    finally:
        for h in handles:
            h.remove()


def expects(m: nn.Module) -> str:
    """The input layout a torch layer takes, as its documentation writes it ("" if not known)."""
    if isinstance(m, nn.Linear):
        return f"(*, {m.in_features})"
    if isinstance(m, nn.modules.conv._ConvNd):
        spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[len(m.kernel_size)]
        return f"(N, {m.in_channels}, {spatial})"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {nn.BatchNorm1d: f"(N, {m.num_features}) or (N, {m.num_features}, L)",
                nn.BatchNorm2d: f"(N, {m.num_features}, H, W)",
                nn.BatchNorm3d: f"(N, {m.num_features}, D, H, W)"}.get(type(m), "")
    if isinstance(m, nn.LayerNorm):
        return f"(*, {', '.join(map(str, m.normalized_shape))})"
    if isinstance(m, nn.Embedding):
        return f"integer ids in [0, {m.num_embeddings})"
    if isinstance(m, nn.RNNBase):
        return f"(N, T, {m.input_size})" if m.batch_first else f"(T, N, {m.input_size})"
    if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        d = m.embed_dim if isinstance(m, nn.MultiheadAttention) else m.self_attn.embed_dim
        first = m.batch_first if isinstance(m, nn.MultiheadAttention) else m.self_attn.batch_first
        return f"(N, T, {d})" if first else f"(T, N, {d})"
    return ""


def expected_input(model: nn.Module, running: Running, first: bool = True) -> str:
    """'; layer 'head' (Linear) takes (*, 128), got (8, 1568)': the innermost known layer the forward
    failed in, with what it takes and what it got; where it failed before any such layer ran (a
    reshape of the input), what the model's first one takes (unless not `first`: the input's structure,
    not its shape, is what is wrong); "" where it failed between layers. torch's own messages name the operation, not the layer or its layout
    (`mat1 and mat2 shapes cannot be multiplied (8x1568 and 128x10)`)."""
    if running:
        name, m, x = running[-1]
        got = f", got {tuple(x.shape)}" + ("" if x.is_floating_point() else f" {str(x.dtype).removeprefix('torch.')}") \
            if isinstance(x, torch.Tensor) else ""
        return f"; layer '{name}' ({type(m).__name__}) takes {expects(m)}{got}"
    first = next(((n, m) for n, m in model.named_modules() if expects(m)), None) if first and not running.ran else None
    return f"; its first layer '{first[0]}' ({type(first[1]).__name__}) takes {expects(first[1])}" if first else ""


def failing_layer(running: Running) -> str:
    """' in layer 'bn' (BatchNorm1d)': the innermost known layer a failed forward was in, or ""."""
    return f" in layer '{running[-1][0]}' ({type(running[-1][1]).__name__})" if running else ""


def user_frame(exc: BaseException) -> str:
    """' (at file.py:LINE)', the innermost frame of the traceback in the user's code (not torch's, not
    ours), by file name only."""
    skip = [os.path.dirname(m.__file__) for m in (torch, importlib)] + [os.path.dirname(os.path.dirname(__file__))]
    frames = [f for f in traceback.extract_tb(exc.__traceback__)  # (<frozen importlib._bootstrap>: not code to edit)
              if not f.filename.startswith("<frozen")
              and not any(os.path.abspath(f.filename).startswith(d) for d in skip)]
    return f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def _advice(model: nn.Module, batch: torch.Tensor, exc: BaseException | None = None,
            running: Running | None = None) -> str:
    inputs = _required_inputs(model)
    if len(inputs) > 1:
        return (f"its forward takes {len(inputs)} inputs ({', '.join(inputs)}) and the CLI makes one tensor: "
                "call gw.probe(model, (x1, x2, ...)) from Python")
    text = str(exc) if exc is not None else ""
    if "'str'" in text or isinstance(exc, KeyError) or "object has no attribute" in text:
        return ("its forward reads keys or attributes of its input (a dict or an object, not one tensor), which "
                "the CLI cannot make: call gw.probe(model, (batch,)) from Python with a batch it accepts")
    emb = next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding)), None)
    if emb is not None and batch.is_floating_point():
        return (f"it has an nn.Embedding ('{emb}') that is not its first module, so the batch was floats: "
                "pass --vocab N for integer tokens in [0, N)")
    if not batch.is_floating_point() and emb is not None and "index out of range" in text:
        return _index_advice(model, batch, running)
    if not batch.is_floating_point() and emb is None:
        return ("--vocab makes integer token ids and the model has no nn.Embedding to take them: drop --vocab "
                "for standard normal float inputs")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if batch.is_floating_point() and dtypes and batch.dtype not in dtypes:
        return (f"its parameters are {', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}; "
                "call gw.probe from Python with a batch of the dtype it expects")
    return SHAPE_ADVICE


def _index_advice(model: nn.Module, batch: torch.Tensor, running: Running | None) -> str:
    """An nn.Embedding given an index beyond its table. The layer it failed in, when known, tells which:
    given the token ids, a smaller --vocab; given indices the model makes from the input's shape
    (positions 0..T-1 into a table of block size rows), a shorter sequence. Every case read "--vocab
    <the smallest table>": a position table's 8 for a sequence of 16 too."""
    top = running[-1] if running else None
    if top is None or not isinstance(top[1], nn.Embedding) or _same_values(top[2], batch):
        layers = [(top[0], top[1].num_embeddings)] if top is not None and isinstance(top[1], nn.Embedding) else \
            sorted({(n, m.num_embeddings) for n, m in model.named_modules() if isinstance(m, nn.Embedding)},
                   key=lambda t: t[1])
        return (f"the token ids run to {int(batch.max())} and "
                f"{' or '.join(f'{n!r} (nn.Embedding) takes [0, {k})' for n, k in layers)}: pass --vocab "
                f"{layers[0][1]} or less (without --vocab, the first module's num_embeddings)")
    name, layer, x = top
    size = layer.num_embeddings
    got = int(x.max()) + 1 if isinstance(x, torch.Tensor) and x.numel() else 0
    dims = [i for i, d in enumerate(batch.shape) if d == got]  # the sequence's dimension, when one matches
    if len(dims) != 1:
        return (f"'{name}' (nn.Embedding of {size} rows) was given index {got - 1}, which the model computes "
                f"(it is not the token ids): pass an --input-shape or --vocab that keeps it below {size}")
    shape = ",".join(str(size) if i == dims[0] else str(d) for i, d in enumerate(batch.shape))
    return (f"'{name}' (nn.Embedding of {size} rows) was given positions up to {got - 1}, from the input's "
            f"length {got} (dimension {dims[0]} of the batch), not the token ids: the model takes sequences of "
            f"at most {size}; pass --input-shape {shape}")


def _same_values(x: Any, batch: torch.Tensor) -> bool:
    """x holds the batch's token ids (itself, or reshaped)."""
    return isinstance(x, torch.Tensor) and x.numel() == batch.numel() and bool(
        torch.equal(x.reshape(-1).to(batch.dtype), batch.reshape(-1)))


def _required_args(fn: Any) -> list[str]:
    """Parameters of a factory (a function or a class) that have no default."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def _required_inputs(model: nn.Module) -> list[str]:
    """Names of forward's positional parameters without a default."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
