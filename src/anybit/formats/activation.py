"""Dynamic integer activations (the A of ``WxAy``; SmoothQuant, ABQ-LLM, FlexQ).

Activations are quantized at run time, per token (``group_size = -1``) or per group of
``group_size`` consecutive channels of each token (FlexQ: 128), to ``bits`` 2..8:

  asymmetric: ``s = (max − min) / (2^b − 1)``, ``z = round(−min / s)``, ``q ∈ [0, 2^b − 1]``,
              ``x ≈ s·(q − z)``  (ABQ-LLM, OmniQuant: "per_token" dynamic, asymmetric);
  symmetric:  ``s = absmax / (2^(b−1) − 1)``, ``q ∈ [−2^(b−1), 2^(b−1) − 1]``, ``x ≈ s·q``
              (SmoothQuant, FlexQ: 6-bit ``absmax/31``, 8-bit ``absmax/127``).

``bits = 16`` means float activations (no quantization). Nothing is stored: the spec
travels with each :class:`anybit.nn.QuantLinear` and in the checkpoint's config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import AnybitError

FLOAT_BITS = 16
# keeps all-zero tokens (padding, dead channels) from dividing by zero
_MIN_SCALE = 1e-8


@dataclass(frozen=True)
class ActSpec:
    """How a linear layer's input is quantized at run time."""

    bits: int = FLOAT_BITS
    group_size: int = -1
    sym: bool = False

    @property
    def enabled(self) -> bool:
        return self.bits < FLOAT_BITS

    def validate(self) -> None:
        if self.bits != FLOAT_BITS and not 2 <= self.bits <= 8:
            raise AnybitError(f"--abits must be between 2 and 8, or 16 for float activations, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise AnybitError(f"--act-group-size must be -1 (per token) or positive, got {self.group_size}")

    def bits_per_activation(self, k: int) -> float:
        """Code bits plus the run-time float32 scale (and b-bit zero point) per token group."""
        g = k if self.group_size == -1 else min(self.group_size, k)
        return self.bits + (32 + (0 if self.sym else self.bits)) / g

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_layer(cls, d: dict) -> "ActSpec":
        """From a checkpoint's layer entry (``act``, or the bare ``abits`` of older files)."""
        a = d.get("act")
        spec = cls(int(a["bits"]), int(a["group_size"]), bool(a["sym"])) if isinstance(a, dict) \
            else cls(int(d.get("abits", FLOAT_BITS)))
        spec.validate()
        return spec


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``x [..., K]`` as ``[..., G, g]`` (zero-padded ragged tail: zeros never widen a range
    that contains 0, and symmetric/asymmetric ranges here always contain 0)."""
    k = x.shape[-1]
    g = k if group_size == -1 else group_size
    ng = math.ceil(k / g)
    pad = ng * g - k
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    return xp.reshape(*x.shape[:-1], ng, g), pad


def act_params(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token-group ``(scales, zeros)`` of shape ``[..., G]`` (float32; zeros are integers,
    0 for symmetric)."""
    xg, _ = _grouped(x.float(), spec.group_size)
    if spec.sym:
        s = xg.abs().amax(-1) / ((1 << (spec.bits - 1)) - 1)
        return s.clamp_min(_MIN_SCALE), torch.zeros_like(s)
    # the range always contains 0 (as for weights), so zero stays exact
    xmax = xg.amax(-1).clamp_min(0)
    xmin = xg.amin(-1).clamp_max(0)
    s = ((xmax - xmin) / ((1 << spec.bits) - 1)).clamp_min(_MIN_SCALE)
    return s, torch.round(-xmin / s)


def expand_groups_tokens(t: torch.Tensor, group_len: int, k: int) -> torch.Tensor:
    """Per token-group values ``[..., G]`` repeated to per-channel ``[..., K]``."""
    return t.repeat_interleave(group_len, dim=-1)[..., :k]


def qrange(spec: ActSpec) -> tuple[int, int]:
    if spec.sym:
        return -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    return 0, (1 << spec.bits) - 1


def quantize(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[..., K]`` (int32; signed for symmetric), scales and zeros ``[..., G]``."""
    s, z = act_params(x, spec)
    xg, pad = _grouped(x.float(), spec.group_size)
    lo, hi = qrange(spec)
    q = torch.clamp(torch.round(xg / s.unsqueeze(-1)) + z.unsqueeze(-1), lo, hi)
    q = q.reshape(*x.shape[:-1], -1)
    if pad:
        q = q[..., : x.shape[-1]]
    return q.to(torch.int32), s, z


class _PerTokenFakeQuant(torch.autograd.Function):
    """Asymmetric per-token fake quantization with straight-through rounding, forward and
    backward written out (training: ABQ-LLM's activations and Q/K/V). The gradient equals
    autograd's on the plain expression of :func:`fake_quantize`: to ``x`` where the code is
    not clamped, and through the scale ``s = (max⁺ − min⁻)/(2^b − 1)`` to each token's
    largest and smallest entry (``z = round(−min/s)`` has no gradient, as there). The
    backward runs as two native passes where they are built
    (:func:`anybit.kernels.native.fq_backward`; equal to float32 rounding)."""

    @staticmethod
    def forward(ctx, x, bits: int):
        levels = (1 << bits) - 1
        xf = x.float()
        xmax, xmin = xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True)
        s_raw = (xmax.clamp_min(0) - xmin.clamp_max(0)) / levels
        s = s_raw.clamp_min(_MIN_SCALE)
        z = torch.round(-xmin.clamp_max(0) / s)
        y = (torch.clamp(torch.round(xf / s) + z, 0, levels) - z) * s
        ctx.save_for_backward(x, xmax, xmin, s_raw, s, z)
        ctx.levels = levels
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, xmax, xmin, s_raw, s, z = ctx.saved_tensors
        levels = ctx.levels
        from ..kernels import native  # here: kernels import formats

        if x.dtype in (torch.float32, torch.bfloat16) and native.has_train_kernels():
            # the same sums in one native pass (summed in another order than below)
            k = x.shape[-1]
            x2 = x.reshape(-1, k)
            xmax, xmin, s_raw = xmax.reshape(-1), xmin.reshape(-1), s_raw.reshape(-1)
            gx, gs, _, nmax, nmin = native.fq_backward(x2, gy.reshape(-1, k), s.reshape(-1), z.reshape(-1),
                                                       xmax, xmin, levels)
            gs = gs * (s_raw >= _MIN_SCALE) / levels
            native.fq_add_extremes(gx, x2, xmax, xmin, gs * (xmax >= 0) / nmax, -gs * (xmin <= 0) / nmin)
            return gx.view(x.shape).to(x.dtype), None
        xf, gy = x.float(), gy.float()
        u = xf / s
        cpre = torch.round(u) + z
        inside = (cpre >= 0) & (cpre <= levels)
        gin = torch.where(inside, gy, 0.0)
        gs = (gy * (cpre.clamp(0, levels) - z)).sum(-1, keepdim=True) - (gin * u).sum(-1, keepdim=True)
        gs = gs * (s_raw >= _MIN_SCALE) / levels
        ismax, ismin = xf == xmax, xf == xmin
        g_max = gs * (xmax >= 0) / ismax.sum(-1, keepdim=True)
        g_min = -gs * (xmin <= 0) / ismin.sum(-1, keepdim=True)
        gx = gin + torch.where(ismax, g_max, 0.0) + torch.where(ismin, g_min, 0.0)
        return gx.to(x.dtype), None


def fake_quantize(x: torch.Tensor, spec: ActSpec, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` (same dtype); ``ste``: straight-through gradient for training.

    The scales are computed from ``x`` itself (dynamic); with ``ste`` their gradient flows
    too, as in OmniQuant's dynamic activation quantizer.
    """
    if not spec.enabled:
        return x
    if ste and spec.group_size == -1 and not spec.sym:
        return _PerTokenFakeQuant.apply(x, spec.bits)
    k = x.shape[-1]
    s, z = act_params(x, spec)
    xg, pad = _grouped(x.float(), spec.group_size)
    lo, hi = qrange(spec)
    rnd = _round_ste if ste else torch.round
    q = torch.clamp(rnd(xg / s.unsqueeze(-1)) + z.unsqueeze(-1), lo, hi)
    y = ((q - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(*x.shape[:-1], -1)
    if pad:
        y = y[..., :k]
    return y.to(x.dtype)
