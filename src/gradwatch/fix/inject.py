"""Apply one remedy to an unmodified training script from inside its process, through hooks.

Started by the bootstrap when `gradwatch fix` sets GRADWATCH_REMEDY (a JSON spec) and/or
GRADWATCH_MAX_STEPS. Model changes are made at the first forward, with grad enabled, of the first
module that owns trainable parameters (before it computes anything; its input shows them the order
layers and activations run in), optimizer changes at its steps; the trial ends cleanly
(SystemExit, so atexit flushes the store) after GRADWATCH_MAX_STEPS steps, or once a remedy
trial's loss has been non-finite for STOP_AFTER_NON_FINITE steps in a row.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from gradwatch.collect import patches
from gradwatch.collect.caller_names import caller_name
from gradwatch.collect.layers import ACTIVATIONS, compiled_inner
from gradwatch.collect.update_window import params_of
from gradwatch.collect.watch import MAX_ACCUMULATION
from gradwatch.errors import ConfigError
from gradwatch.fix.locate import ENV_LOCATE_AT, NonFiniteLocator, alive_in, callers_frame as _callers_frame, script_line
from gradwatch.fix.pause import child_channel, wait_for_more
import gradwatch.remedies as remedies  # (not `from ... import`: see _bootstrap, a user's import of it may be under way)
from gradwatch.remedies._new_params import added_parameters, before_change, drop, give_added
from gradwatch.runner import ENV_MAX_STEPS, ENV_REMEDY, ENV_RUN_DIR, in_fix_trial, is_the_command

STOP_AFTER_NON_FINITE = 3  # consecutive non-finite losses that end a remedy trial
NOT_APPLIED = "not-applied.txt"  # in a trial's run directory: why its remedy changed nothing
BUDGET_REACHED = "budget_reached"  # in a trial's run directory: the budget, not the script, ended it
STOPPED_NON_FINITE = "stopped_non_finite"  # in a trial's run directory: ended on a loss that stayed non-finite
PAUSABLE = "pausable"  # in a trial's run directory: its process could pause at its budget (`Injector._can_pause`)
PROGRESS = "progress.txt"  # in a trial's run directory: the steps done so far (the store waits for a flush)
PROGRESS_EVERY = 1.0  # seconds at least between two writes of it: a fast script's trial writes it seldom

NEW_ACTIVATION = {"LeakyReLU": lambda: nn.LeakyReLU(0.01), "ReLU": nn.ReLU, "SELU": nn.SELU, "Tanh": nn.Tanh,
                  "ELU": nn.ELU, "GELU": nn.GELU}


def apply_to_model(model: nn.Module, spec: dict, example_input: Any = None) -> str:
    """The model-level part of a remedy, in place (the script keeps its reference to `model`).
    `example_input` (the model's first batch) lets the swap and the init see what really runs:
    activations called as functions, one module shared by several layers, the output's activation.
    Returns why the remedy does not apply ('' when it does): a swap that swaps nothing would leave
    a trial of the rest of the remedy under the swap's name."""
    swap = spec.get("swap")
    if swap:
        old = tuple(ACTIVATIONS) if swap["from"] == "*" else _own_classes(model, swap["from"]) if swap.get("own") \
            else (getattr(nn, swap["from"]),)
        if not old:  # (a class of the script's that made the NaN, run outside the model: a loss module)
            return f"no {swap['from']} module in the model; nothing changed"
        _, change = remedies.swap_activations(model, old, NEW_ACTIVATION[swap["to"]], keep_output=True,
                                              example_input=example_input)
        if not change:
            return str(change)
    called = spec.get("swap_fn")
    if called:  # (an activation called as a function in forward(): the calls made the new one's)
        if example_input is None:
            return f"no batch reached the model to find its {called['from']} calls with; nothing changed"
        _, change = remedies.swap_functions(model, called["from"], called["to"], example_input=example_input,
                                            inside_call=True)
        if not change:
            return str(change)
    if spec.get("norm"):
        remedies.insert_norm(model, spec["norm"], example_input=example_input)
    if spec.get("init"):
        remedies.init_(model, spec["init"], example_input=example_input)
    if spec.get("recurrent") == "gru":
        remedies.replace_rnn(model)
    elif spec.get("recurrent"):
        _recurrent(model, spec["recurrent"])
    return ""


def own_class(spec: dict) -> str:
    """The class of the script's own a remedy swaps (`candidates.swap(..., own=True)`), "" for none."""
    swap = spec.get("swap") or {}
    return swap["from"] if swap.get("own") else ""


def _own_classes(model: nn.Module, name: str) -> tuple[type, ...]:
    """The classes of the modules in `model` named `name`: the script's own (`class Exp(nn.Module)`)."""
    return tuple({type(m) for m in model.modules() if type(m).__name__ == name})


class FiniteAt(TorchFunctionMode):
    """The `inputs` spec: where the locating run found the data already holding NaN (or Inf), what
    a torch function called from the script's line `file:line` takes from that data, given back with
    those values set to 0 (for a NaN origin its NaN only: a -inf mask taken on the same line keeps
    its -inf), wherever the batch goes on to: the model, a teacher, the loss as its target. Only a
    function one of whose inputs (no parameter) holds them: one that makes a NaN from finite inputs
    on that line (a model grown to overflow, a log of a negative) is left as the printed change
    leaves it, and so is what such a NaN flows into on the line (the next layer of a model called
    there takes it from the line, not from the data). Its inputs that hold it are cleaned as they
    come in, above autograd (no weight's gradient sees the NaN; a standardisation `(x - mu) / sd` on
    the line reads the raw 0 the printed change writes, not the mean); a dataset-sized one, indexed,
    is not copied per sample: what the function gives is cleaned instead, at batch size (whether it
    holds NaN is asked once per version of it); an in-place function's tensor is cleaned in place
    after it (a DataLoader worker's batch set into a storage). The trial runs
    eagerly (torch.compile compiles nothing under a mode)."""

    def __init__(self, file: str, line: int, value: str = "NaN"):
        super().__init__()
        self.file, self.line, self.nan_only = file, line, value == "NaN"
        self._known: dict[int, tuple[weakref.ref, int, bool]] = {}  # large tensors: (ref, _version, dirty)
        self._made: dict[int, weakref.ref] = {}  # tensors a function called from the line made (`_mark`)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)  # (most calls come from another line of the script: one frame says so)
        if (caller.f_code.co_filename != self.file or caller.f_lineno != self.line) \
                and (_callers_frame(caller) or script_line() != (self.file, self.line)):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):  # in place (set_, copy_): the tensor the script holds
            out = func(*args, **kwargs)
            if args and not self._made_here(args[0]) and self._dirty(args[0]):
                with torch.no_grad():
                    args[0].copy_(self._clean(args[0]))
            return self._mark(out)
        held = [a for a in tree_leaves((args, kwargs)) if not self._made_here(a) and self._holds(a)]
        if not held:  # (a NaN this line made, or none: left)
            return self._mark(func(*args, **kwargs))
        if all(a.numel() < LARGE for a in held):  # a batch: cleaned as it comes in, as the printed change does
            args, kwargs = tree_map(lambda a: self._clean(a) if any(a is h for h in held) else a, (args, kwargs))
            return self._mark(func(*args, **kwargs))
        return self._mark(tree_map(self._clean, func(*args, **kwargs)))  # a dataset indexed: what it gives

    def _mark(self, out: Any) -> Any:
        """`out` made on the line: a NaN it holds is the line's own arithmetic's, not the data's."""
        if len(self._made) > 4096:
            self._made = {k: r for k, r in self._made.items() if r() is not None}
        self._made.update((id(t), weakref.ref(t)) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    def _made_here(self, t: Any) -> bool:
        return alive_in(self._made, t)

    def _holds(self, t: Any) -> bool:
        """`t` holds the data's NaN (Inf), asked once per version of a large tensor (a dataset)."""
        if not isinstance(t, torch.Tensor) or isinstance(t, nn.Parameter) or t.numel() < LARGE:
            return self._dirty(t)
        known = self._known.get(id(t))
        if known is None or known[0]() is not t or known[1] != t._version:
            known = self._known[id(t)] = (weakref.ref(t), t._version, self._dirty(t))
        return known[2]

    def _dirty(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.is_floating_point() \
            and t.numel() > 0 and bool((torch.isnan(t) if self.nan_only else ~torch.isfinite(t)).any())

    def _clean(self, t: Any) -> Any:
        if not self._dirty(t):
            return t
        return torch.nan_to_num(t, nan=0.0, posinf=math.inf, neginf=-math.inf) if self.nan_only \
            else torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


LARGE = 1 << 16  # elements: a tensor this large (a dataset, not a batch) is asked once per version


@contextmanager
def unseen_by_global_hooks() -> Iterator[None]:
    """Forward passes inside are hidden from global module hooks. The remedy's look at the model
    (one forward of the first batch) runs before the watch has seen the model: its hooks would
    adopt the model then, with the modules the remedy is about to replace. torch has no public
    switch for this, so its two hook tables are set aside and put back."""
    tables = (torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks)
    saved = [dict(t) for t in tables]
    for t in tables:
        t.clear()
    try:
        yield
    finally:
        for t, hooks in zip(tables, saved):
            t.clear()
            t.update(hooks)


def _recurrent(model: nn.Module, how: str) -> None:
    """"forget_bias": LSTM forget gates open at the start (total bias 1, Gers et al. 2000,
    Jozefowicz et al. 2015: b_ih's forget chunk 1, b_hh's 0, since the gate sees their sum);
    "orthogonal": every gate's W_hh orthogonal (all singular values 1, Saxe et al. 2014)."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, (nn.RNN, nn.GRU, nn.LSTM)):
                continue
            for name, p in m.named_parameters():
                if how == "forget_bias" and isinstance(m, nn.LSTM) and name.startswith("bias_"):
                    n = p.numel() // 4
                    p[n:2 * n] = 1.0 if name.startswith("bias_ih") else 0.0  # gate order i, f, g, o
                elif how == "orthogonal" and name.startswith("weight_hh"):
                    for chunk in p.split(m.hidden_size, dim=0):
                        nn.init.orthogonal_(chunk)


class Injector:
    """Global hooks that apply `spec` to the first model and every optimizer that steps."""

    def __init__(self, spec: dict, max_steps: int | None, earlier: list[weakref.ref] = (),
                 run_dir: Path | None = None, locate_at: int | None = None):
        self.spec = spec
        self.run_dir = run_dir  # where a remedy that changes nothing says so (NOT_APPLIED)
        self.earlier = earlier  # models earlier in-process trials trained (gw.fix(train_fn))
        self.max_steps = max_steps
        self.model: nn.Module | None = None
        # the parameters the remedy added (norm layers, a GRU), each with its layer's parameter ids
        self._added: list[tuple[torch.Tensor, list[int]]] = []
        self._kept: set[int] = set()  # the model's parameter ids before the change (`give_added`)
        self._gone: set[int] = set()  # ... of those, the ones it removed
        self._capped: tuple | None = None  # by hand, with an lr cap: the weights and gradients before the update
        self._cap_hook = None
        self.steps = 0
        self._lead: weakref.ref | None = None  # the optimizer whose steps are the budget's (see _count_step)
        self._last: weakref.ref | None = None  # the optimizer that stepped last
        self._stepped: weakref.WeakSet = weakref.WeakSet()  # every optimizer that has stepped
        self.backwards = 0
        self.non_finite_losses = 0  # consecutive
        self._optimizers: dict[int, dict] = {}
        self._built: list[weakref.ref] = []  # every optimizer built or stepping, in order (`_remember`)
        self._clear_next = False  # the zero_grad spec: clear them all before the next backward
        self._manual_clipper = None
        self._manual = False  # the script updates the weights itself (settled by _updated_by_hand)
        self._probe: torch.Tensor | None = None
        self._handles = [register_module_forward_pre_hook(self._before_forward)]
        self._late: list = []
        self.locate_at = locate_at  # the step whose operations a NonFiniteLocator checks
        self.locator: NonFiniteLocator | None = None
        self._told = time.monotonic()  # when PROGRESS was last written
        self._pausable_told = False  # PAUSABLE written (`_tell_progress`)
        self._channel = child_channel() if run_dir is not None else None  # (pause.py)
        if locate_at == 0:
            self._start_locating()
        self._finite_at = FiniteAt(*spec["inputs"][1:]) if spec.get("inputs") else None  # (file, line, value)
        if self._finite_at is not None:  # (the whole run: the data may hold NaN in any batch)
            self._finite_at.__enter__()
        patches.add(self)

    def install_late(self) -> None:
        """Hooks that must run after the watch's own (it records the lr this step really used)."""
        self._late.append(register_optimizer_step_pre_hook(self._before_step))
        self._late.append(register_optimizer_step_post_hook(self._after_step))

    def remove(self) -> None:
        self._capped = None  # (its copies of the weights)
        for handle in self._handles + self._late:
            handle.remove()
        self._handles, self._late = [], []
        patches.remove(self)
        if self.locator is not None:
            self.locator.__exit__(None, None, None)
        if self._finite_at is not None:
            self._finite_at.__exit__(None, None, None)
            self._finite_at = None

    def _start_locating(self) -> None:
        """From here to the end of the process (or `remove`): a mode on torch's dispatch stack."""
        self.locator = NonFiniteLocator(self.run_dir)
        self.locator.__enter__()

    # ---------------------------------------------------------------- model
    def _before_forward(self, module: nn.Module, args) -> None:
        """The model is the first module with trainable parameters that runs with grad enabled: one
        run under no_grad (a teacher making targets, an evaluation first) is not being trained. With
        a `target` in the spec (the model the findings name, a GAN's `disc`), the module the script
        calls by that name. A `torch.compile`d model is changed in the module it wraps, its first batch
        run through that eagerly: run through the compiled one, the look's own hooks were traced by
        dynamo, which refused them (every activation swap failed at step 0)."""
        if self.model is None and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()) \
                and ("target" not in self.spec or caller_name(module) == self.spec["target"]) and self._holds_own(module):
            module = compiled_inner(module) or module  # (the wrapper shares its parameters)
            if any(ref() is module for ref in self.earlier):
                raise ConfigError(
                    f"gw.fix: train_fn trains the {type(module).__name__} an earlier trial trained (and changed); "
                    "build the model and its optimizer inside train_fn, so that every trial starts alike")
            self.model = module
            before = before_change(module)
            try:
                with unseen_by_global_hooks():
                    void = apply_to_model(module, self.spec, args or None)
            except ConfigError as exc:  # the remedy cannot apply to this model: the trial fails, not fix
                raise RuntimeError(f"gradwatch fix: {exc}") from exc
            self._added, self._kept = added_parameters(module, before), before.kept
            self._gone = before.kept - {id(p) for p in module.parameters()}
            self._give_added()  # (to those already built: a `step(closure)` runs the first forward inside the first step)
            self._handles.pop(0).remove()
            if void:
                self._not_applied(void)

    def _holds_own(self, module: nn.Module) -> bool:
        """A swap of a class of the script's goes to the first trained module holding one (a GAN's
        generator's activation that overflowed, where the discriminator runs first)."""
        own = own_class(self.spec)
        return not own or "target" in self.spec or bool(_own_classes(module, own))

    def _not_applied(self, why: str) -> None:
        """End the trial before its first step: it would measure the rest of the remedy (a swap's
        re-initialisation alone) under the remedy's name."""
        if self.run_dir is not None:
            (self.run_dir / NOT_APPLIED).write_text(why + "\n")
        raise SystemExit(0)

    # ---------------------------------------------------------------- optimizer
    def _state(self, opt: torch.optim.Optimizer) -> dict:
        state = self._optimizers.get(id(opt))
        if state is None:
            state = self._optimizers[id(opt)] = {}
            self._remember(opt)
            self._give_added()
            if self.spec.get("optimizer") == "Adam":  # one Adam group per group: each follows its own lr
                state["adam"] = torch.optim.Adam([{"params": g["params"]} for g in opt.param_groups],
                                                 lr=self.spec.get("lr", 1e-3))
                state["adam"]._gradwatch_inner = True  # (no optimizer of the script's: built here, not remembered)
                self._built = [ref for ref in self._built if ref() is not state["adam"]]
                state["base_lrs"] = [g.get("max_lr", g.get("initial_lr", g["lr"])) for g in opt.param_groups]
            if self.spec.get("clip"):
                self._attach_clipper(state.get("adam", opt))
        return state

    def _attach_clipper(self, opt: torch.optim.Optimizer) -> None:
        """The remedy's clipper, attached as the printed `gw.clip.attach(optimizer, clipper)` attaches
        it (to the Adam that takes the step, in an Adam trial): it clips inside a `step(closure)` the
        gradients the closure computed, not last step's, and unscales a fused optimizer's gradients
        under a GradScaler first. Called from the global step pre-hook, before the optimizer's own
        hooks run: its hook runs at this very step. The warnings it gives the user (LBFGS) are for
        the printed change, not for a trial's log."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._late.append(remedies.clip.attach(opt, self._make_clipper()))

    def _give_added(self) -> None:
        """Each parameter the remedy added, into the group of an optimizer built so far that holds
        the layer the parameter goes with (and of its Adam, in an Adam trial): where the printed
        change puts it (`remedies._new_params.give_added`). Not to an optimizer that merely steps
        first: a head-only optimizer then trained a frozen body's norms, a head's lr 0.1 drove a
        body's at 1e-3. The parameters it removed (a replaced RNN's) leave them, as they leave the
        printed change's: kept in LBFGS's flat vector, they changed its sums in the last bits."""
        built = self._alive()
        for o, g, p in give_added(built, self._added, self._kept):
            adam = self._optimizers.get(id(built[o]), {}).get("adam")
            if adam is not None:
                adam.param_groups[g]["params"].append(p)
        if self._gone and self._added:  # (a change replacing parameters, printed with optimizer=; not a swap that only removes)
            for opt in built:
                for held in (opt, self._optimizers.get(id(opt), {}).get("adam")):
                    if held is not None:
                        drop(held, self._gone)

    def _remember(self, opt: torch.optim.Optimizer) -> None:
        """`opt` among the optimizers built, in the order they were (`_give_added` gives them a
        remedy's new parameters, the zero_grad spec clears them all)."""
        if not getattr(opt, "_gradwatch_inner", False) and all(ref() is not opt for ref in self._built):
            self._built.append(weakref.ref(opt))

    def _alive(self) -> list[torch.optim.Optimizer]:
        return [opt for ref in self._built if (opt := ref()) is not None]

    def _make_clipper(self):
        clip = remedies.clip
        return {"norm": lambda: clip.ClipNorm(self.spec["max_norm"]),
                "value": lambda: clip.ClipValue(self.spec["value"]),
                "zclip": clip.ZClip, "agc": clip.AGC, "autoclip": clip.AutoClip}[self.spec["clip"]]()

    def _before_step(self, opt, args, kwargs) -> tuple | None:
        """Returns new (args, kwargs) for the step where the remedy changes its closure."""
        if getattr(opt, "_gradwatch_inner", False):
            return None
        if self.model is None and "target" in self.spec:  # a step, and the model to change never ran
            self._not_applied(f"no module the script calls {self.spec['target']!r} ran before its first step")
        if self.model is None and (own := own_class(self.spec)):
            self._not_applied(f"no trained module holding a {own} ran before the first step")
        state = self._state(opt)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # (args[0] is the optimizer itself)
        if self.spec.get("zero_grad") and callable(closure):  # L-BFGS evaluates it several times a step
            def cleared(closure=closure, opt=opt):
                opt.zero_grad()
                return closure()
            changed = ((args[0], cleared, *args[2:]), kwargs) if len(args) > 1 else (args, {**kwargs, "closure": cleared})
        else:
            changed = None
        if "adam" in state:  # Adam takes the step; the script's optimizer runs with lr 0
            if not self.spec.get("unscheduled"):  # (else Adam keeps its constant lr)
                _follow_schedule(state["adam"], opt, state["base_lrs"], self.spec.get("lr", 1e-3))
            state["adam"]._gradwatch_inner = True
            changed = self._adam_step(state["adam"], opt, args, kwargs, changed)
        scale = 0.0 if "adam" in state else self.spec.get("lr_scale")
        cap = self.spec.get("lr_cap")
        if scale is not None or cap is not None:
            state["lrs"] = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = g["lr"] * scale if scale is not None else min(g["lr"], cap)
        return changed

    @staticmethod
    def _adam_step(adam: torch.optim.Optimizer, opt: torch.optim.Optimizer, args: tuple, kwargs: dict,
                   changed: tuple | None) -> tuple | None:
        """Adam's step, given the script's closure (the zero_grad spec's, if it wrapped it) as the
        printed Adam's `step(closure)` is: stepped before it, Adam used last step's gradients. The
        script's optimizer (at lr 0) then gets the loss Adam's call returned, not a second call."""
        args, kwargs = changed or (args, kwargs)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if not callable(closure):
            if _as_a_grad_scaler_would(opt):
                adam.step()
            return changed
        with torch.enable_grad():  # Adam's step(closure), the closure run first: inside the step the
            loss = closure()  # watch's step pre-hook read the gradients the closure had not made yet
        adam.step()
        return ((args[0], lambda: loss, *args[2:]), kwargs) if len(args) > 1 else (args, {**kwargs, "closure": lambda: loss})

    def _after_step(self, opt, args, kwargs) -> None:
        if getattr(opt, "_gradwatch_inner", False):
            return
        state = self._state(opt)
        for g, lr in zip(opt.param_groups, state.pop("lrs", [])):
            g["lr"] = lr  # a scheduler sees the lr it set
        if self.spec.get("zero_grad"):  # stale gradients: cleared before the next backward (before_backward)
            self._clear_all_later()
        self._count_step(opt)

    def _count_step(self, opt: torch.optim.Optimizer) -> None:
        """One step of the budget, the last of which ends the trial: a step of the lead optimizer,
        as the store counts one step per iteration. Another optimizer stepping between the lead's (a
        GAN's generator, a decoder's own) is not one: counted, a GAN's trials ran half their budget
        and the locating run stopped halfway to its NaN. One stepping twice with no lead step between
        (a new optimizer made for the next epoch) leads from then on, and so does one stepping the
        lead's own weights at its first step, or after the lead was freed (the lead made anew every
        iteration: none was counted, and a tester's trials ran the script's 300 steps against a
        budget of 40). One that shares the lead's weights and has stepped before (a multi-task
        script's second optimizer on a shared encoder, ZeroRedundancyOptimizer's inner one) stays a
        partner, not counted: counted, a reviewer's multi-task trials stopped at half their budget."""
        first = opt not in self._stepped
        self._stepped.add(opt)
        lead = self._lead() if self._lead is not None else None  # (None: none yet, or freed)
        if lead is not None and lead is not opt and not (first and params_of(opt) & params_of(lead)):
            if self._last is None or self._last() is not opt:
                self._last = weakref.ref(opt)
                return
        self._lead = self._last = weakref.ref(opt)
        self.steps += 1
        self._tell_progress(self.steps)
        if self.max_steps is not None and self.steps >= self.max_steps:
            self._stop_at_budget(self.steps)
        if self.steps == self.locate_at and self.locator is None:
            self._start_locating()

    def _stop_at_budget(self, steps: int) -> None:
        """End the trial, marked as ended by the budget: `fix` then knows the script had more to run
        (a healthy pretraining says nothing of the fine-tuning after it). Where fix can run it further
        (pause.py), it pauses instead, marked alike, and goes on if fix asks for more steps."""
        if self.run_dir is not None:
            try:
                (self.run_dir / BUDGET_REACHED).write_text(f"{self.max_steps}\n")
            except OSError:
                pass
        if (more := self._pause(steps)) is not None:
            self.max_steps = more
            (self.run_dir / BUDGET_REACHED).unlink(missing_ok=True)
            return
        raise SystemExit(0)

    def _pause(self, steps: int) -> int | None:
        """Wait for fix to say how far to go on (None: end here), once the store holds every step so
        far (fix measures the trial from it meanwhile). Not with the model on a GPU: paused, a
        process keeps its device memory, and the next trial's would not fit beside it."""
        if self._channel is None or not self._can_pause():
            return None  # (not fix's child: a forked one, its copy of this injector made before the fork)
        from gradwatch.collect.auto import own_watch

        if (watch := own_watch()) is not None:
            watch.flush()
        more = wait_for_more(self._channel, steps)
        if more is None or more <= steps:
            self._channel = None
            return None
        return more

    def _can_pause(self) -> bool:
        """This process could pause at its budget (pause.py): fix's own child, the model on the CPU."""
        return is_the_command() and not (self.model is not None and any(
            p.device.type != "cpu" for p in self.model.parameters()))

    def _tell_progress(self, steps: int) -> None:
        """The steps done so far, into PROGRESS at most every PROGRESS_EVERY seconds: `fix` reads it to
        say how far a slow trial has come (20 s a step: a 40-step baseline is 13 silent minutes). At
        its first step, PAUSABLE when `_can_pause`: told by the baseline, which is not asked to pause,
        fix knows before screening whether its trials will (a shell's command, a model on a GPU: no)."""
        if not self._pausable_told and self.run_dir is not None and self._can_pause():
            self._pausable_told = True
            try:
                (self.run_dir / PAUSABLE).write_text("")
            except OSError:
                pass
        now = time.monotonic()
        if self.run_dir is not None and now - self._told >= PROGRESS_EVERY:
            self._told = now
            try:
                (self.run_dir / PROGRESS).write_text(f"{steps}\n")
            except OSError:  # a full disk, the directory removed: no progress line, and the training goes on
                pass

    # ---------------------------------------------------------------- manual loops (patches.Listener)
    def before_backward(self, root) -> None:
        self._clear_all_if_due()
        if self._manual and not self._optimizers and self.max_steps is not None and self.backwards >= self.max_steps:
            self._stop_at_budget(self.backwards)  # hand-written updates: a step is a backward
        if self.spec:
            self._stop_if_failed(root)

    def _clear_all_later(self) -> None:
        """The stale-gradients trial, after a step (or a step a GradScaler skipped: nothing would
        clear its inf gradients, and every later step was skipped too): every optimizer clears its
        gradients before the next backward, as `optimizer.zero_grad()` before each
        `loss.backward()` does. Every one, not the one that stepped alone: a GAN's generator
        backward writes into the discriminator's gradients, which its step then used. Not right
        after the step: a script that reads `p.grad` there (to log its norm) found None and failed."""
        self._clear_next = True

    def _clear_all_if_due(self) -> None:
        if self._clear_next:
            self._clear_next = False
            for opt in self._alive():
                opt.zero_grad()

    def _stop_if_failed(self, root) -> None:
        """A remedy trial whose loss stays non-finite has failed (its final loss is inf whatever
        follows): end it once the watch has recorded STOP_AFTER_NON_FINITE such steps, instead of
        running the rest of the budget. One sync per step, in trials only."""
        if self.non_finite_losses >= STOP_AFTER_NON_FINITE:
            # marked: counted by backward, micro-batches accumulated for one step may stop it before
            # any non-finite step is stored (a tester's "ZClip repairs the run", its stored losses
            # finite, its loss NaN on 181 of 200 steps pasted in)
            if self.run_dir is not None:
                with suppress(OSError):
                    (self.run_dir / STOPPED_NON_FINITE).write_text(f"{self.non_finite_losses}\n")
            raise SystemExit(0)
        unscaled = getattr(root, patches.UNSCALED, None)
        loss = unscaled[0] if unscaled is not None else root
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.non_finite_losses = 0 if bool(torch.isfinite(loss)) else self.non_finite_losses + 1

    def after_backward(self, root) -> None:
        """Hand-written updates (no optimizer steps): clipping and a learning-rate scale act on the
        gradients the script is about to apply (for p -= lr·g, scaling g is scaling lr)."""
        self.backwards += 1
        if self._manual and not self._optimizers:
            self._tell_progress(self.backwards)  # by hand, a backward is a step
        if not self._optimizers and self.backwards == self.locate_at and self.locator is None:
            self._start_locating()  # by hand, a backward is a step (before an optimizer's first step: early, no harm)
        if self._optimizers:
            return
        if self.model is None:  # no module's weights to look at: a second backward means by hand
            self._manual = self.backwards >= 2
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params or not self._updated_by_hand(params):
            return
        if self.spec.get("clip"):
            if self._manual_clipper is None:
                self._manual_clipper = self._make_clipper()
            self._manual_clipper(params)
        if self.spec.get("lr_scale") is not None:
            torch._foreach_mul_([p.grad for p in params], float(self.spec["lr_scale"]))
        if self.spec.get("lr_cap") is not None:
            self._capped = (params, [p.detach().clone() for p in params], [p.grad.detach().clone() for p in params])
            if self._cap_hook is None:
                cap = _WeakCall(self._cap_update)  # (a deepcopy of the model, an EMA's, copies no injector)
                self._cap_hook = self.model.register_forward_pre_hook(cap)
                self._handles += [self._cap_hook, self.model.register_state_dict_pre_hook(cap)]

    def _cap_update(self, module: nn.Module, *args) -> None:
        """The lr cap of an update by hand, made good before the next forward (or state_dict: a
        checkpoint saved after the last update): the script's lr is not known to the trial until
        it has updated, so the update it made (p -= lr·g) is measured (lr: the least-squares fit of
        the change to -g over the weights that moved) and, where lr is above the cap, scaled back
        to the cap's (p = p_before - cap·g, to the last bits). Left alone where the change is no
        plain gradient step (momentum or weight decay by hand: the fit leaves more than 0.1% of it)."""
        if self._capped is None:
            return
        params, before, grads = self._capped
        with torch.no_grad():
            moved = torch._foreach_sub([p.detach() for p in params], before)
            norms = torch.stack(torch._foreach_norm(moved)).double()
            if not bool(norms.any()):  # a forward before the update (an evaluation): not yet
                return
            self._capped = None
            applied = [p.grad for p in params]
            if all(g is not None for g in applied) and any(bool(g.any()) for g in applied):
                grads = [g.detach() for g in applied]  # (the ones the update applied: clipped by hand since the backward)
            used = [(m, g, b) for m, g, b, n in zip(moved, grads, before, norms.tolist()) if n > 0]  # (the weights it updated)
            along = sum(float((m.double() * g.double()).sum()) for m, g, _ in used)
            size = sum(float((g.double() ** 2).sum()) for _, g, _ in used)
            lr = -along / size if size > 0 else 0.0
            cap = float(self.spec["lr_cap"])
            if not (lr > cap and math.isfinite(lr)):
                return
            rest = sum(float(((m.double() + lr * g.double()) ** 2).sum()) for m, g, _ in used)
            # (the rounding of p - lr·g in the weights' dtype allowed: half an ulp each, bf16's 2^-9)
            rounding = sum(float(((torch.finfo(b.dtype).eps * b.double().abs()) ** 2).sum()) for _, _, b in used)
            if rest > 1e-6 * float((norms ** 2).sum()) + rounding:  # |Δw + lr·g| > 0.1% of |Δw|: not p -= lr·g
                return
            for p, b, m in zip(params, before, moved):
                p.copy_(b + m * (cap / lr))

    def _updated_by_hand(self, params: list[torch.Tensor]) -> bool:
        """No optimizer has stepped yet: did a weight change since the last backward? Then the script
        updates by hand (perhaps only some layers); unchanged, it accumulates gradients for an
        optimizer step still to come (scaling them here too would scale that step twice). Each
        weight's float64 sum is compared, per backward until the question is settled; past
        MAX_ACCUMULATION unchanged ones, by hand (as the watch decides)."""
        if not self._manual:
            last, self._probe = self._probe, torch.stack([p.detach().sum(dtype=torch.float64) for p in params])
            self._manual = (last is not None and not torch.equal(last, self._probe)) or self.backwards > MAX_ACCUMULATION
        return self._manual

    def after_scaler_update(self) -> None:
        if self.spec.get("zero_grad"):
            self._clear_all_later()

    def params_added(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer took parameters (patches.Listener): remedies act at its steps, not before."""
        self._remember(optimizer)

    def guard_skipped(self, optimizer) -> None:
        """The script's own gw.guard skipped a step: it still counts against the budget."""
        self._count_step(optimizer)

    def warned(self, message: str, filename: str, lineno: int) -> None:
        """A warning shown (patches.Listener): the watch in the trial reads it; no remedy needs it."""

    def clipped(self, params: list[torch.Tensor], function: str, limit: object) -> None:
        """The script clipped (patches.Listener): the watch in the trial notes where; no remedy needs it."""


class _WeakCall:
    """A hook calling a bound method through a weak reference: deep-copied with its module (an EMA
    or teacher copy), it calls nothing, where the method itself copied the whole injector, whose
    pending cap then rewrote the copy's weights."""

    def __init__(self, method) -> None:
        self._method = weakref.WeakMethod(method)

    def __call__(self, *args):
        method = self._method() if hasattr(self, "_method") else None
        return None if method is None else method(*args)

    def __deepcopy__(self, memo) -> "_WeakCall":
        return _WeakCall.__new__(_WeakCall)  # (no method: calls nothing)


def _as_a_grad_scaler_would(opt: torch.optim.Optimizer) -> bool:
    """Whether the trial's Adam steps, its gradients unscaled: a GradScaler hands a fused optimizer
    (which unscales inside its own step, and skips an overflow there) still-scaled gradients and
    `found_inf`; the printed Adam, unfused, gets them from `scaler.step` unscaled, and no step on an
    overflow. Stepped on them as they were, the trial's Adam took every overflow's inf into its
    weights. (One sync per step, under a scaler with a fused optimizer only.)"""
    found = getattr(opt, "found_inf", None)
    if found is not None and bool(found):
        return False
    remedies.clip.unscale_fused(opt)
    return True


def _follow_schedule(adam: torch.optim.Optimizer, opt: torch.optim.Optimizer, base_lrs: list[float],
                     lr: float) -> None:
    """Adam's lr as the script's scheduler would set it had Adam been built in its optimizer's place:
    `lr` times the schedule's factor (the script's lr over the lr it was built with; for OneCycleLR,
    over its max_lr, which the printed change sets to `lr`). A constant lr would measure Adam without
    the schedule the user's Adam gets."""
    for group, own, base in zip(adam.param_groups, opt.param_groups, base_lrs):
        group["lr"] = lr * own["lr"] / base if base > 0 else lr


def start_from_env() -> Injector | None:
    if not in_fix_trial():
        return None
    _say_saves()
    spec_text, max_steps = os.environ.get(ENV_REMEDY), os.environ.get(ENV_MAX_STEPS)
    try:
        spec = json.loads(spec_text) if spec_text else {}
    except ValueError:
        print(f"gradwatch: ignoring {ENV_REMEDY}={spec_text!r}: not JSON", file=sys.stderr)
        spec = {}
    run_dir, locate_at = os.environ.get(ENV_RUN_DIR), os.environ.get(ENV_LOCATE_AT)
    return Injector(spec, int(max_steps) if max_steps else None, run_dir=Path(run_dir) if run_dir else None,
                    locate_at=int(locate_at) if locate_at else None)


def _say_saves() -> None:
    """`torch.save` to a path opens it in C++, unseen by the audit hook that notes what a trial
    writes (_bootstrap `_note_writes`), so it says the path itself: a checkpoint the trial saves
    is the trial's, put back before the next one (fix/touched.py)."""
    save = torch.save

    @functools.wraps(save)
    def noted(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            sys.audit("gradwatch.wrote", f)
        return save(obj, f, *args, **kwargs)

    torch.save = noted

