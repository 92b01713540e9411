"""How mmrec's kernels become ``torch.library`` ops (namespace ``mmrec``).

Each op is defined from its schema with a PyTorch composite (its CPU implementation, which
also serves any device without its own), a CUDA one (the Triton launcher) and a fake one, so ``torch.compile`` traces it as one node and ``torch.library.opcheck`` tests it.
Its gradient comes from an ``autograd.Function`` registered at the op's ``Autograd`` key.

This does what ``torch.library.custom_op`` with ``register_autograd`` does, with less
Python on every call: that path fills in default arguments and binds the ``setup_context``
signature on each call, which costs about as much as launching a kernel. Here the
``Autograd`` kernel and the ``Function`` call the device implementation directly when the
inputs are plain tensors outside any dispatch mode or ``torch.func`` transform (eager
calls, and a compiled graph when it runs); otherwise (tracing with fake or functional
tensors, tensor subclasses, dispatch modes) they re-enter the dispatcher below autograd,
so every tool still sees the op. For the same reason an eager call of an op skips the
dispatcher altogether (:meth:`Op.__call__`) unless something is watching: ``torch.compile``
tracing, ``torch.jit.trace``, the profiler, a ``__torch_function__`` or dispatch mode, a
transform. (A standalone ``ExecutionTraceObserver``, without the profiler, does not see
such a call.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LIBRARY = torch.library.Library("mmrec", "FRAGMENT")


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)  # a Parameter of a tensor subclass keeps the subclass's type


def _plain(args) -> bool:
    """Whether ``args`` may skip the dispatcher: ordinary tensors or parameters (fake,
    functional and distributed tensors are subclasses), no dispatch mode, no ``torch.func``
    transform."""
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
            and all(type(a) in _PLAIN_TYPES for a in args if isinstance(a, Tensor)))


def _unwatched(args) -> bool:
    """Whether an op call with ``args`` may run its ``Autograd`` kernel without the
    dispatcher: :func:`_plain` tensors (the first argument one), and no ``torch.compile``
    tracing, ``torch.jit.trace``, profiler or ``__torch_function__`` mode that should see
    the op."""
    return (type(args[0]) in _PLAIN_TYPES and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
            and not torch._C._autograd._profiler_enabled() and not torch._C._is_torch_function_mode_enabled()
            and _plain(args))


def requires_grad(args) -> bool:
    """Whether autograd must record a call with ``args``."""
    return torch.is_grad_enabled() and any(a.requires_grad for a in args if isinstance(a, Tensor))


def _or_composite(cuda: Callable, composite: Callable) -> Callable:
    """``cuda``, or ``composite`` where ``cuda`` returns ``NotImplemented``."""
    def run(*args):
        out = cuda(*args)
        return composite(*args) if out is NotImplemented else out
    return run


def _outside_autocast(composite: Callable) -> Callable:
    """``composite`` with autocast off: an op computes in its inputs' dtypes on every device,
    as its Triton kernels do (the caller casts), not in whatever autocast picks for the
    PyTorch operations inside it."""
    def run(*args):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return composite(*args)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return composite(*args)
    return run


class Op:
    """One op: ``Op(schema, composite=..., cuda=..., fake=...)``. Every function registered
    for it must take the schema's arguments with the schema's defaults (the dispatcher
    leaves out arguments equal to their default). ``cuda`` returns ``NotImplemented`` for
    inputs its kernels do not take (no Triton, float64, ...), and the composite runs them."""

    def __init__(self, schema: str, *, composite: Callable, cuda: Callable, fake: Callable):
        self.name = schema.split("(", 1)[0]
        composite = _outside_autocast(composite)
        cuda = _or_composite(cuda, composite)
        LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
        LIBRARY.impl(self.name, composite, "CompositeExplicitAutograd")
        LIBRARY.impl(self.name, cuda, "CUDA")
        torch.library.register_fake(f"mmrec::{self.name}", fake, lib=LIBRARY)
        self.kernels = {"cpu": composite, "cuda": cuda}
        self.overload = getattr(torch.ops.mmrec, self.name).default
        self.autograd_kernel: Callable | None = None

    def __call__(self, *args):
        """The op, autograd included: its ``Autograd`` kernel directly when the call is
        :func:`_unwatched` (what the dispatcher would run, less its cost), otherwise
        through the dispatcher. ``args``: every schema argument, positionally."""
        if self.autograd_kernel is not None and _unwatched(args):
            return self.autograd_kernel(*args)
        return self.overload(*args)

    def below_autograd(self, *args):
        """The op's device implementation, without recording anything for autograd."""
        first = next(a for a in args if isinstance(a, Tensor))
        kernel = self.kernels.get(first.device.type) if _plain(args) else None
        if kernel is not None:
            return kernel(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return self.overload(*args)

    def differentiate(self, autograd_kernel: Callable) -> None:
        """Register ``autograd_kernel`` (the schema's arguments with their defaults) at the
        ``Autograd`` key: it applies the op's ``autograd.Function`` when :func:`requires_grad`,
        and calls :meth:`below_autograd` otherwise."""
        LIBRARY.impl(self.name, autograd_kernel, "Autograd")
        self.autograd_kernel = autograd_kernel
