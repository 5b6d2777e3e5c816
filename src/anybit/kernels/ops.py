"""The quantized linear as a PyTorch operator (``torch.ops.anybit.qlinear``), so that a
model with :class:`anybit.nn.QuantLinear` layers traces whole under ``torch.compile``
(``fullgraph=True``: no graph break at each layer) and under ``torch.export``.

The operator takes the input and an integer handle of the layer; its real implementation is
the kernel dispatch (native or reference, as eager calls); its fake implementation gives
the output's shape and dtype without touching the packed weights, which is all the tracer
needs. The handle (not the packed tensors) is the argument because each kernel keeps its own
layout of the weights, built once and cached on the layer.

Eager calls do not go through the operator (its dispatch costs a few microseconds per call,
which at batch 1 is a tenth of a small layer's product); ``QuantLinear.forward`` uses it only
while compiling.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_layers: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_next = itertools.count(1)


def register(module: torch.nn.Module) -> int:
    """A new handle for ``module`` (held weakly). QuantLinear registers itself when built and
    when copied or unpickled, so that a copy never answers to its original's handle."""
    h = next(_next)
    _layers[h] = module
    return h


@torch.library.custom_op("anybit::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    """``y = Q_a(x) Wᵀ + b`` of the QuantLinear with handle ``layer``."""
    from . import linear

    module = _layers.get(layer)
    if module is None:
        raise RuntimeError(f"anybit::qlinear: no live layer with handle {layer}")
    y = linear(x, module)
    return y.clone() if y is x else y  # an operator's output must not alias its input


@qlinear.register_fake
def _(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))
