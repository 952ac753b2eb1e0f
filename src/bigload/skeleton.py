"""Empty models: parameters on ``meta`` (or a device), ties kept, non-persistent buffers real.

The contexts patch ``nn.Module.register_parameter`` / ``register_buffer`` for the duration of the
block instead of switching torch's default device, so data-dependent code in ``__init__``
(``torch.linspace(...).tolist()``, ``x.item()``) keeps working on real CPU tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .devices import DeviceLike, parse_device

_TWIN = "_bigload_skeleton_twin"
_lock = threading.Lock()
_local = threading.local()  # per thread: the stack of active frames, innermost last
_saved: dict[str, object] = {}  # the register_* functions found when the patch went in
_users = 0  # active blocks over all threads; the patch is installed while > 0


@dataclass(frozen=True)
class _Frame:
    target: torch.device
    include_buffers: bool


@contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build models with every parameter on ``meta``: instant, no memory for weights.

    Persistent buffers go to ``meta`` too with ``include_buffers=True``; non-persistent buffers
    are always real (no checkpoint can supply them, e.g. a rotary ``inv_freq``).
    """
    with init_on_device(torch.device("meta"), include_buffers=include_buffers):
        yield


@contextmanager
def init_on_device(device: DeviceLike, include_buffers: bool = False) -> Iterator[None]:
    """Build models with every parameter created on ``device`` (``"meta"``, ``"cpu"``, ``0``...).

    Blocks nest (the innermost decides) and only affect the thread that entered them.
    """
    frame = _Frame(parse_device(device), include_buffers)
    _install()
    frames = _frames()
    frames.append(frame)
    try:
        yield
    finally:
        frames.pop()
        _uninstall()


def _frames() -> list[_Frame]:
    frames = getattr(_local, "frames", None)
    if frames is None:
        frames = _local.frames = []
    return frames


def _current() -> _Frame | None:
    frames = getattr(_local, "frames", None)
    return frames[-1] if frames else None


def _install() -> None:
    global _users
    with _lock:
        if _users == 0:
            _saved["register_parameter"] = nn.Module.register_parameter
            _saved["register_buffer"] = nn.Module.register_buffer
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
            nn.Module.register_buffer = _register_buffer  # type: ignore[method-assign]
        _users += 1


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            # kept in _saved: a thread already inside a patched call still finds them
            nn.Module.register_parameter = _saved["register_parameter"]  # type: ignore
            nn.Module.register_buffer = _saved["register_buffer"]  # type: ignore


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _saved["register_parameter"](module, name, param)  # type: ignore[operator]
    frame = _current()
    if frame is not None and param is not None and _should_move(param, frame.target):
        module._parameters[name] = _moved_parameter(param, frame.target)


def _register_buffer(
    module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
) -> None:
    _saved["register_buffer"](module, name, tensor, persistent=persistent)  # type: ignore
    frame = _current()
    if frame is None or not frame.include_buffers or tensor is None:
        return
    if frame.target.type == "meta" and not persistent:
        return  # never meta: nothing could ever fill it
    if _should_move(tensor, frame.target):
        module._buffers[name] = tensor.to(frame.target)


def _should_move(tensor: torch.Tensor, target: torch.device) -> bool:
    # A tensor created on meta has no data to copy; it stays meta for materialize() to report.
    return tensor.device != target and tensor.device.type != "meta"


def _moved_parameter(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """The parameter on ``device``, same class and flags; the same twin for the same original,
    so a Parameter object registered in two places stays one object (a tie)."""
    twin = getattr(param, _TWIN, None)
    if twin is not None and twin.device == device:
        return twin
    moved = rebuild_parameter(param, param.data.to(device))
    try:
        setattr(param, _TWIN, moved)
    except (AttributeError, RuntimeError):
        pass
    return moved


def rebuild_parameter(like: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """A parameter of ``like``'s class and ``requires_grad`` holding ``data``; subclass state in
    ``__dict__`` (e.g. quantisation metadata) is carried over."""
    cls = type(like)
    extra = {k: v for k, v in like.__dict__.items() if k != _TWIN}
    try:
        new = cls(data, requires_grad=like.requires_grad, **extra) if extra else cls(
            data, requires_grad=like.requires_grad
        )
    except TypeError:
        new = cls(data, requires_grad=like.requires_grad)
        new.__dict__.update(extra)
    return new
