"""Hooks, only ever inside context managers that remove them, also when the body raises.

Every function here leaves the model exactly as it found it on exit: no hook handle, no
replaced `forward`, no changed weight survives the `with` block.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rankone.core.architectures import get_module


def _first(x: Any) -> torch.Tensor:
    # Modules return a tensor or a tuple whose first element is the hidden state.
    return x[0] if isinstance(x, (tuple, list)) else x


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    if isinstance(x, tuple):
        return (new,) + tuple(x[1:])
    if isinstance(x, list):
        return [new] + list(x[1:])
    return new


class Captured:
    """What `capture` recorded: the latest input and output of each module, by path."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}


@contextmanager
def capture(
    model: nn.Module, paths: list[str], *, inputs: bool = True, outputs: bool = True,
    detach: bool = True,
) -> Iterator[Captured]:
    """Record the first positional input and the output of each module in `paths`."""
    rec = Captured()

    def make_hook(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # Copies, not views: some models write into these tensors in place afterwards
            # (Falcon adds the attention output into the MLP output).
            if inputs:
                x = args[0]
                rec.inputs[path] = x.detach().clone() if detach else x
            if outputs:
                y = _first(output)
                rec.outputs[path] = y.detach().clone() if detach else y

        return hook

    with ExitStack() as stack:
        for p in paths:
            h = get_module(model, p).register_forward_hook(make_hook(p))
            stack.callback(h.remove)
        yield rec


class _Stop(Exception):
    """Raised by a `stop_at` hook to end a forward pass; never escapes the `with` block."""


class Stopped:
    """What `stop_at` saw: whether the pass reached the module, and the module's input."""

    def __init__(self) -> None:
        self.reached = False
        self.input: torch.Tensor | None = None


@contextmanager
def stop_at(module: nn.Module, *, before: bool = False, detach: bool = True) -> Iterator[Stopped]:
    """A forward pass inside ends at `module`: right after it runs, or (before=True) before it
    runs, keeping its first positional input.

    Layers past the point, and the LM head, are never computed: that is the point. The hook
    raises a private exception that this context swallows, so the `with` body should be the
    forward call alone. Hooks run in registration order: enter this after any `capture` of the
    same module so that the capture still sees it.
    """
    st = Stopped()

    def pre(mod: nn.Module, args: tuple) -> None:
        x = args[0]
        st.input = x.detach() if detach else x
        raise _Stop

    def post(mod: nn.Module, args: tuple, output: Any) -> None:
        raise _Stop

    h = module.register_forward_pre_hook(pre) if before else module.register_forward_hook(post)
    try:
        yield st
    except _Stop:
        st.reached = True
    finally:
        h.remove()


@contextmanager
def map_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's output (its first element, for tuples) by fn(output)."""

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        return _replace_first(output, fn(_first(output)))

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextmanager
def after_forward(module: nn.Module, fn: Callable[[], None]) -> Iterator[None]:
    """Call fn() after each forward pass of the module (e.g. to count optimisation steps)."""
    h = module.register_forward_hook(lambda mod, args, output: fn())
    try:
        yield
    finally:
        h.remove()


def add_at_positions(
    hidden: torch.Tensor, delta: torch.Tensor, positions: list[int] | torch.Tensor
) -> torch.Tensor:
    """hidden [batch, pos, d] + delta [d] at (i, positions[i]) for every row i, differentiably."""
    idx = torch.as_tensor(positions, device=hidden.device)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    mask = torch.zeros(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    mask[rows, idx] = 1
    return hidden + mask[:, :, None] * delta.to(hidden.device, hidden.dtype)[None, None, :]


@contextmanager
def replace_forward(module: nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """Make `module(...)` return fn(*args, **kwargs) instead of running the module.

    Used to skip the layers below the edited one by replaying their cached output; the instance
    attribute shadows the class method (and wraps whatever accelerate installed) until exit.
    """
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = fn  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            module.forward = previous  # type: ignore[method-assign]
        else:
            del module.forward


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (only δ is optimised); the flags come back on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
