"""Per-channel equivalent transforms shared by SmoothQuant (fixed scales) and ABQ-LLM's
LET (learned scales and shifts).

A *pair* is a producer whose output channels feed the input channels of one or more
consumer linears: a norm before q/k/v or gate/up, v_proj before o_proj, up_proj before
down_proj. Dividing the producer's output channel j by ``s_j`` (and subtracting a shift
``δ_j`` first, for norms with a bias) while multiplying the consumers' input column j by
``s_j`` (and adding ``W δ`` to their bias) leaves the block's function unchanged, and
moves activation outliers into the weights (SmoothQuant Eq. 3; OmniQuant/ABQ-LLM LET).

With grouped-query attention, o_proj's input channel ``h·d + i`` reads value channel
``(h // rep)·d + i``; a v→o scale lives on the value channels and is repeated for o_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import Adapter


@dataclass(frozen=True)
class Pair:
    producer: str  # a norm or a linear, relative to the block
    consumers: tuple[str, ...]
    producer_is_norm: bool
    rep: int = 1  # consumer channels per producer channel (GQA v→o: heads per kv head)
    head_dim: int = 0

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """A producer-channel vector on the consumers' input channels."""
        if self.rep == 1:
            return s
        kv = s.reshape(-1, self.head_dim)  # [kv_heads, d]
        return kv.repeat_interleave(self.rep, dim=0).reshape(-1)

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """A consumer-input-channel statistic reduced (max) to producer channels."""
        if self.rep == 1:
            return v
        return v.reshape(-1, self.rep, self.head_dim).amax(1).reshape(-1)


def pairs(adapter: Adapter, block: nn.Module, linear_pairs: bool = True) -> list[Pair]:
    """The smoothable pairs of ``block``: norm→linears always, linear→linear if asked."""
    out = [Pair(norm, tuple(cons), True) for norm, cons in adapter.norm_to.items()]
    if not linear_pairs:
        return out
    for prod, cons in adapter.linear_to.items():
        p = block.get_submodule(prod)
        c = block.get_submodule(cons[0])
        rep, hd = 1, 0
        if c.in_features != p.out_features:  # GQA: o_proj reads each kv head rep times
            attn = block.get_submodule(prod.rsplit(".", 1)[0])
            hd = attn.head_dim
            rep = c.in_features // p.out_features
        out.append(Pair(prod, tuple(cons), False, rep, hd))
    return out


def input_range(block: nn.Module, names: list[str], forward) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per input channel (min, max) of each linear in ``names`` over one pass of ``forward(block)``."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            lo, hi = x.amin(0), x.amax(0)
            if name in stats:
                lo, hi = torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)
            stats[name] = (lo, hi)
        return fn

    handles = [block.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        forward(block)
    finally:
        for h in handles:
            h.remove()
    return stats


def absmax(rng: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.maximum(rng[0].abs(), rng[1].abs())


def weight_absmax(block: nn.Module, pair: Pair) -> torch.Tensor:
    """Per input channel max|W| over the pair's consumers, on producer channels."""
    w = torch.cat([block.get_submodule(c).weight.detach().float() for c in pair.consumers], 0)
    return pair.reduce(w.abs().amax(0))


@torch.no_grad()
def fold_producer(prod: nn.Module, pair: Pair, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """The producer's half of the transform: output channel j → (out_j − δ_j) / s_j."""
    s = scale.float()
    if shift is not None:
        if getattr(prod, "bias", None) is None:
            raise ValueError(f"{pair.producer} has no bias to absorb a shift")
        prod.bias.sub_(shift.to(prod.bias.dtype))
    prod.weight.div_((s if pair.producer_is_norm else s.unsqueeze(1)).to(prod.weight.dtype))
    if getattr(prod, "bias", None) is not None:
        prod.bias.div_(s.to(prod.bias.dtype))


@torch.no_grad()
def fold_consumer(lin: nn.Module, pair: Pair, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """A consumer's half: input column j × s_j, and ``W δ`` added to the bias."""
    if shift is not None:
        extra = lin.weight.float() @ pair.expand(shift.float())
        if lin.bias is None:
            lin.bias = nn.Parameter(extra.to(lin.weight.dtype), requires_grad=False)
        else:
            lin.bias.add_(extra.to(lin.bias.dtype))
    lin.weight.mul_(pair.expand(scale.float()).to(lin.weight.dtype).unsqueeze(0))


def fold(block: nn.Module, pair: Pair, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Apply the transform permanently to the producer and every consumer (function unchanged)."""
    for c in pair.consumers:
        fold_consumer(block.get_submodule(c), pair, scale, shift)
    fold_producer(block.get_submodule(pair.producer), pair, scale, shift)


def smooth_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (clamped away from 0)."""
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)
