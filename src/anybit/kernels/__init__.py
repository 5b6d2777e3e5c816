"""Kernel dispatch: ``(backend, format) -> linear function``, asked per call.

The reference backend handles every format, input dtype and device. A fast backend
registers, per format, its function and a ``supports(x, module)`` predicate (the device,
the input, the module's activation scheme, group size, rows); the dispatch takes the first
backend in preference order whose predicate accepts the call, so a CUDA tensor, a layer
with quantized activations on an INT-only kernel, or an unsupported group never reaches
code that cannot run it. The preference is ``ANYBIT_KERNEL`` (default ``auto``: the
fastest registered, i.e. ``native`` when the extension is built; read once, when this module is
imported), :func:`use`, :func:`set_backend` or ``--kernel``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

from ..errors import AnybitError
from . import reference

LinearFn = Callable[[torch.Tensor, "torch.nn.Module"], torch.Tensor]
Supports = Callable[[torch.Tensor, "torch.nn.Module"], bool]

# backend name -> format name -> (function, supports or None: everything); "reference"
# covers every format via "*"
_REGISTRY: dict[str, dict[str, tuple[LinearFn, Supports | None]]] = {"reference": {"*": (reference.linear, None)}}
# preference order for "auto"
_PRIORITY: list[str] = ["reference"]
_current: str | None = None
# ANYBIT_KERNEL, read at import: reading the environment costs 0.7 us, which every eager call of
# a layer paid to see whether the preference changed (use()/set_backend() change it at run time)
_ENV_KERNEL = os.environ.get("ANYBIT_KERNEL", "auto")
# backend -> format -> maker(module) of a prepared call (or None), see linear()
_FAST: dict[str, dict[str, Callable]] = {}


def register(backend: str, fmt: str, fn: LinearFn, priority: int = 0, supports: Supports | None = None,
             fast: Callable | None = None) -> None:
    """Register ``fn`` as ``backend``'s kernel for weight format ``fmt``; ``supports(x, module)``
    says whether it can run a given call (None: every call). ``fast(x, module)``: optionally, a
    prepared call for that module made after ``fn`` ran on ``x`` (or None: none for such
    calls), ``call(x, module) -> y or None`` with ``call.valid(module)`` (see :func:`linear`)."""
    _REGISTRY.setdefault(backend, {})[fmt] = (fn, supports)
    if fast is not None:
        _FAST.setdefault(backend, {})[fmt] = fast
    if backend not in _PRIORITY:
        _PRIORITY.insert(priority, backend)


def backends() -> list[str]:
    return ["auto", *_PRIORITY]


def current() -> str:
    name = _current or _ENV_KERNEL
    if name != "auto" and name not in _REGISTRY:
        raise AnybitError(f"unknown kernel backend {name!r}; choose one of {', '.join(backends())}")
    return name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the enclosed code with kernel backend ``name``."""
    global _current
    if name != "auto" and name not in _REGISTRY:
        raise AnybitError(f"unknown kernel backend {name!r}; choose one of {', '.join(backends())}")
    prev, _current = _current, name
    try:
        yield
    finally:
        _current = prev


def set_backend(name: str) -> None:
    global _current
    if name != "auto" and name not in _REGISTRY:
        raise AnybitError(f"unknown kernel backend {name!r}; choose one of {', '.join(backends())}")
    _current = name


def choose(x: torch.Tensor, module) -> tuple[str, LinearFn]:
    """(backend name, function) that runs ``module`` on input ``x`` under the current preference."""
    name = current()
    for b in _PRIORITY if name == "auto" else [name]:
        fns = _REGISTRY[b]
        entry = fns.get(module.spec.format) or fns.get("*")
        if entry is not None and (entry[1] is None or entry[1](x, module)):
            return b, entry[0]
    return "reference", reference.linear


def linear(x: torch.Tensor, module) -> torch.Tensor:
    """``module`` on ``x`` with the kernel :func:`choose` picks. Where that backend prepared a
    call for the module (its constant arguments converted once), later calls try it first: it
    serves the calls it can (the kernels are the same) and answers None to the others, and it
    is dropped when the backend preference changes or it is no longer valid for the module."""
    prefs = _current
    fast = module.__dict__.get("_anybit_fast")
    if fast is not None and fast[0] == prefs:
        y = fast[1](x, module)
        if y is not None:
            return y
    backend, fn = choose(x, module)
    y = fn(x, module)
    maker = _FAST.get(backend, {}).get(module.spec.format)
    if maker is not None and (fast is None or fast[0] != prefs or not fast[1].valid(module)):
        call = maker(x, module)
        module.__dict__["_anybit_fast"] = None if call is None else (prefs, call)
    return y


def _register_native() -> None:
    from . import native

    if native.available():
        for fmt, (fn, supports) in native.KERNELS.items():
            register("native", fmt, fn, priority=0, supports=supports, fast=native.fast_linear)


_register_native()
