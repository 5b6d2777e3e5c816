"""Kernel dispatch: ``(backend, format) -> linear function``.

The reference backend handles every format. Fast backends register functions for the
formats they implement; a format a backend lacks falls back to the reference. The
backend is chosen by ``ANYBIT_KERNEL`` (default ``auto``: the fastest registered, i.e.
``native`` when the extension is built) or :func:`use` / ``--kernel``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

from ..errors import AnybitError
from . import reference

LinearFn = Callable[[torch.Tensor, "torch.nn.Module"], torch.Tensor]

# backend name -> format name -> function; "reference" covers every format via "*"
_REGISTRY: dict[str, dict[str, LinearFn]] = {"reference": {"*": reference.linear}}
# preference order for "auto"
_PRIORITY: list[str] = ["reference"]
_current: str | None = None


def register(backend: str, fmt: str, fn: LinearFn, priority: int = 0) -> None:
    """Register ``fn`` as ``backend``'s kernel for weight format ``fmt``."""
    _REGISTRY.setdefault(backend, {})[fmt] = fn
    if backend not in _PRIORITY:
        _PRIORITY.insert(priority, backend)


def backends() -> list[str]:
    return ["auto", *_PRIORITY]


def current() -> str:
    name = _current or os.environ.get("ANYBIT_KERNEL", "auto")
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


def resolve(fmt: str) -> LinearFn:
    """The kernel the current backend uses for format ``fmt``."""
    name = current()
    order = _PRIORITY if name == "auto" else [name]
    for b in order:
        fns = _REGISTRY[b]
        if fmt in fns:
            return fns[fmt]
    return reference.linear


def linear(x: torch.Tensor, module) -> torch.Tensor:
    fn = resolve(module.spec.format)
    # the native kernels read CPU memory: tensors elsewhere (CUDA, meta) take the reference
    if fn is not reference.linear and x.device.type != "cpu":
        return reference.linear(x, module)
    return fn(x, module)


def _register_native() -> None:
    from . import native

    if native.available():
        for fmt, fn in native.KERNELS.items():
            register("native", fmt, fn, priority=0)


_register_native()
