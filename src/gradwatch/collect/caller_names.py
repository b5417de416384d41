"""The name a training script gives a model, read from the frame that calls it: in zero-code
mode a second model, or a bare layer, is otherwise named by its type (two heads read "Linear"
and "Linear_", a GAN's discriminator "Sequential.0")."""

from __future__ import annotations

import os
import sys
from types import FrameType, ModuleType

import torch
from torch import nn

_INTERNAL = (os.path.dirname(torch.__file__) + os.sep,  # torch's frames and gradwatch's
             os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def caller_name(module: nn.Module) -> str | None:
    """`cls_head` for `cls_head(h)`, `encoder` for `self.encoder(x)` in a trainer object; None
    when the calling frame holds no name for it."""
    frame = _user_frame(sys._getframe(1))
    if frame is None:
        return None
    for scope in (frame.f_locals, frame.f_globals):
        for key, value in scope.items():
            if value is module and _plain(key):
                return key
    for value in frame.f_locals.values():  # an attribute of an object the frame holds: self.encoder
        for key, attr in _members(value).items():
            if attr is module and _plain(key):
                return key
    return None


def caller_line(also: tuple[str, ...] = ()) -> str:
    """`train.py:42`: the script's line that called into torch (and gradwatch's patch of it); frames
    of the files `also` names are passed over too (the warnings module, for a warning shown)."""
    frame = _user_frame(sys._getframe(1), also)
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame is not None else ""


def _user_frame(frame: FrameType | None, also: tuple[str, ...] = ()) -> FrameType | None:
    while frame is not None and (frame.f_code.co_filename.startswith(_INTERNAL) or frame.f_code.co_filename in also):
        frame = frame.f_back
    return frame


def _plain(key: object) -> bool:
    return isinstance(key, str) and key.isidentifier() and not key.startswith("_")


def held_modules() -> list[nn.Module]:
    """The modules the training script's frame holds: its variables, and their attributes one level
    down (`self.model` in a trainer object), each once."""
    frame = _user_frame(sys._getframe(1))
    if frame is None:
        return []
    found: dict[int, nn.Module] = {}
    for value in [*frame.f_locals.values(), *frame.f_globals.values()]:
        if isinstance(value, ModuleType):  # `import torch`: a library's namespace, not the script's objects
            continue
        for v in [value, *_members(value).values()]:
            if isinstance(v, nn.Module):
                found.setdefault(id(v), v)
    return list(found.values())


def _members(value: object) -> dict:
    """A value's attributes by name: a module's submodules, another object's `__dict__` ({} if none)."""
    attrs = value._modules if isinstance(value, nn.Module) else getattr(value, "__dict__", None)
    return attrs if isinstance(attrs, dict) else {}
