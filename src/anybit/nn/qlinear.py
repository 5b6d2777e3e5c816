"""A linear layer whose weight is held packed in one of the registered formats."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..kernels import ops
from ..formats import ActSpec, FormatSpec, get_format


class QuantLinear(nn.Module):
    """``y = Q_a(x) Wᵀ + b`` with ``W`` stored packed; computed through the kernel dispatch.

    The packed tensors are buffers named after the format's layout, so ``state_dict``
    holds exactly what goes to disk. ``act`` says how the input is quantized at run time
    (dynamic, per token or token group; ``bits = 16``: float input).
    """

    def __init__(self, in_features: int, out_features: int, spec: FormatSpec, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, act: ActSpec | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.act = act or ActSpec()
        self.fmt = get_format(spec.format)
        for name, (shape, dt) in self.fmt.packed_layout(spec, self.shape).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.bias = None
        self._anybit_handle = ops.register(self)  # how the traced operator finds this layer

    def __getstate__(self):  # the prepared native call points into this module's layouts
        state = self.__dict__.copy()
        state.pop("_anybit_fast", None)
        return state

    def __setstate__(self, state):  # copy.deepcopy, pickle: the copy gets its own handle
        super().__setstate__(state)
        self._anybit_handle = ops.register(self)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def packed_key(self) -> list:
        """Storage address and version counter of every packed tensor and the bias: anything
        derived from them (the reference's dequantized weight, a native kernel layout) is
        stale when this changes. Cheap, since the kernels call it on every decoding step;
        the address (not the Python object) catches ``.data`` reassignment."""
        # a list comprehension: half the time of a generator into tuple() (0.6 vs 1.1 us)
        return [None if t is None else (t.data_ptr(), t._version) for t in (*self._buffers.values(), self.bias)]

    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.fmt.packed_layout(self.spec, self.shape)}

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int],
                    bias: torch.Tensor | None = None, act: ActSpec | None = None) -> "QuantLinear":
        n, k = shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(k, n, spec, bias=bias is not None, dtype=dtype, act=act)
        for name, t in packed.items():
            expected = getattr(m, name)
            if tuple(t.shape) != tuple(expected.shape) or t.dtype != expected.dtype:
                raise ValueError(f"packed tensor {name}: got {tuple(t.shape)} {t.dtype}, "
                                 f"expected {tuple(expected.shape)} {expected.dtype}")
            setattr(m, name, t.contiguous())
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: FormatSpec, act: ActSpec | None = None, **options) -> "QuantLinear":
        """Round-to-nearest quantization of a float linear layer (``options`` go to the format)."""
        fmt = get_format(spec.format)
        packed = fmt.quantize(linear.weight.data.float(), spec, **options)
        bias = linear.bias.data if linear.bias is not None else None
        return cls.from_packed(packed, spec, tuple(linear.weight.shape), bias, act=act)

    def dequantize_weight(self) -> torch.Tensor:
        return self.fmt.dequantize(self.packed(), self.spec, self.shape)

    def bits_per_weight(self) -> float:
        return self.fmt.bits_per_weight(self.spec, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one traceable operator (kernels/ops.py)
            return torch.ops.anybit.qlinear(x, self._anybit_handle, self.out_features)
        return kernels.linear(x, self)

    def extra_repr(self) -> str:
        s = self.spec
        a = f", abits={self.act.bits}" if self.act.enabled else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={s.format}, "
                f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}{a}, bias={self.bias is not None}")
