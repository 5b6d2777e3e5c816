"""ABQ-LLM (arXiv 2408.08554; code bytedance/ABQ-LLM, derived from OmniQuant): arbitrary
weight and activation bits, trained block by block (SPEC §3).

Per decoder block, on the calibration windows, with the block frozen and only these trained:
* **LWC**, learnable weight clipping: per (row, group) ``xmax' = σ(γ)·max``,
  ``xmin' = σ(β)·min`` (γ = β = 4 at start), asymmetric grid from the clipped range;
* **LET**, learnable equivalent transformation: per-channel scales on the pairs
  norm→q/k/v, norm→gate/up, v→o, up→down (init ``act_max^0.5 / w_max^0.5``), and shifts
  where the norm has a bias (OPT); weights are transformed and quantized at every step,
  and folded for good at the end (:mod:`anybit.methods.smoothing`);
* **distribution correction** (blocks ``i ≤ 2`` and ``i ≥ L−4``): a rank-1 term on
  down_proj, ``W' = W + a·bᵀ`` (a = 0, b = 1 at start), merged before quantization, and the
  block loss
  ``|KL(P_fp‖P_q)| + |KL(P_q‖P_fp)| + MSE(Y_fp, Y_q) + MSE(Y_fp2, Y_q) − log|cos(Y_q, Y_fp)| − log|cos(Y_q, Y_fp2)|``
  with P the head-averaged attention maps, Y_fp the float block on the float chain's
  inputs and Y_fp2 the float block on the quantized chain's inputs; other blocks use
  OmniQuant's ``MSE(Y_fp, Y_q)``;
* **bit balance** (``W2*``): a 2-bit asymmetric grid with ``qmax = 2^2`` (5 levels), stored
  and executed in 3 bits (``QuantConfig.bit_balance``).
Activations: dynamic per token, asymmetric, at ``abits``; Q, K and V also at ``abits``
(:mod:`anybit.nn.attention`); the softmax output stays in float. AdamW (weight decay 0),
lr 5e-3 (LET), 1e-2 (LWC, DC); 20 epochs, 40 for W2 settings and W8A8.
Each component can be switched off (``let``, ``lwc``, ``dc`` options) for the ablation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import ActSpec, FormatSpec, get_format
from ..formats import int as intfmt
from ..formats.activation import fake_quantize
from ..formats.base import expand_groups, grouped
from ..models import Adapter
from ..nn import QuantLinear
from ..nn.attention import attention_modules, enable, set_qkv
from .base import LayerReport, Method, MethodResult, relative_error
from .sequential import BlockInputs, block_forward, block_generator, run_sequential
from .smoothing import Pair, absmax, fold_producer, input_range, pairs, smooth_scales, weight_absmax

LWC_INIT = 4.0
DC_FIRST, DC_LAST = 3, 4  # blocks i <= 2 and i >= L - 4


def default_epochs(config: QuantConfig) -> int:
    return 40 if config.wbits <= 2 or (config.wbits == 8 and config.abits == 8) else 20


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def clipped_params(w: torch.Tensor, spec: FormatSpec, gamma: torch.Tensor, beta: torch.Tensor):
    """LWC's per-group ``(scale, zero)`` ``[N, G]`` from the clipped range (differentiable)."""
    wg, mask = grouped(w, spec.group_size)
    big = torch.finfo(w.dtype).max
    wmax = torch.where(mask, wg, -big).amax(-1)
    wmin = torch.where(mask, wg, big).amin(-1)
    if spec.sym:
        amax = torch.maximum(wmax.abs(), wmin.abs()) * torch.sigmoid(gamma)
        s = (amax / ((1 << (spec.bits - 1)) - 1)).clamp_min(1e-5)
        return s, torch.full_like(s, float(1 << (spec.bits - 1)))
    hi = wmax.clamp_min(0) * torch.sigmoid(gamma)
    lo = wmin.clamp_max(0) * torch.sigmoid(beta)
    s = ((hi - lo) / spec.qmax).clamp_min(1e-5)
    return s, torch.clamp(round_ste(-lo / s), 0, spec.qmax)


class LETParams(nn.Module):
    """Learnable scale (and shift) of one pair."""

    def __init__(self, pair: Pair, scale: torch.Tensor, shift: torch.Tensor | None):
        super().__init__()
        self.pair = pair
        self.scale = nn.Parameter(scale.clone())
        self.shift = nn.Parameter(shift.clone()) if shift is not None else None

    def s(self) -> torch.Tensor:
        return self.scale.clamp_min(1e-5)


class LETNorm(nn.Module):
    """A norm followed by its pair's transform, ``(norm(x) − δ) / s`` (training only)."""

    def __init__(self, norm: nn.Module, let: LETParams):
        super().__init__()
        self.norm = norm
        self.let = [let]  # a list: the parameters are registered once, on the method's container

    def forward(self, x):
        y = self.norm(x)
        let = self.let[0]
        if let.shift is not None:
            y = y - let.shift
        return y / let.s()


class ABQLinear(nn.Module):
    """A linear trained by ABQ-LLM: the effective weight
    ``((W + a·bᵀ) · s_in) / s_out`` is fake-quantized with learned clipping, the input with
    the dynamic activation quantizer (straight-through rounding everywhere)."""

    def __init__(self, linear: nn.Linear, spec: FormatSpec, act: ActSpec, lwc: bool, dc: bool):
        super().__init__()
        self.weight = linear.weight.detach().float()
        self.bias = linear.bias.detach().float() if linear.bias is not None else None
        self.spec, self.act = spec, act
        n, k = self.weight.shape
        ng = math.ceil(k / (k if spec.group_size == -1 else spec.group_size))
        self.gamma = nn.Parameter(torch.full((n, ng), LWC_INIT)) if lwc else None
        self.beta = nn.Parameter(torch.full((n, ng), LWC_INIT)) if lwc and not spec.sym else None
        self.dc_a = nn.Parameter(torch.zeros(n, 1)) if dc else None
        self.dc_b = nn.Parameter(torch.ones(1, k)) if dc else None
        self.let_in: list[LETParams] = []  # this layer consumes the pair's output
        self.let_out: list[LETParams] = []  # this layer produces the pair's input (v_proj, up_proj)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight
        b = self.bias
        if self.dc_a is not None:
            w = w + self.dc_a @ self.dc_b
        for let in self.let_in:
            if let.shift is not None:
                extra = w @ let.pair.expand(let.shift)
                b = extra if b is None else b + extra
            w = w * let.pair.expand(let.s()).unsqueeze(0)
        for let in self.let_out:
            w = w / let.s().unsqueeze(1)
            if b is not None:
                b = b / let.s()
        return w, b

    def clip_params(self, w: torch.Tensor):
        ones = torch.full((w.shape[0], 1), 100.0)  # σ(100) = 1: no clipping
        gamma = self.gamma if self.gamma is not None else ones
        beta = self.beta if self.beta is not None else ones
        return clipped_params(w, self.spec, gamma, beta)

    def forward(self, x):
        w, b = self.effective()
        s, z = self.clip_params(w)
        k = w.shape[1]
        se, ze = expand_groups(s, self.spec.group_size, k), expand_groups(z, self.spec.group_size, k)
        hi = (1 << self.spec.bits) - 1 if self.spec.sym else self.spec.qmax
        wq = (torch.clamp(round_ste(w / se) + ze, 0, hi) - ze) * se
        return F.linear(fake_quantize(x, self.act, ste=True), wq, b)

    @torch.no_grad()
    def export(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Packed tensors of the final weight, its float effective weight and bias. Scales are
        rounded to float16 (as the INT format stores them) and zero points recomputed for them."""
        w, b = self.effective()
        s, z = self.clip_params(w)
        s16 = s.clamp_min(intfmt._MIN_SCALE).to(intfmt.SCALE_DTYPE).float()
        if not self.spec.sym:  # the clipped minimum, s·z up to rounding, keeps its place on the grid
            z = torch.clamp(torch.round(z * s / s16), 0, self.spec.qmax)
        codes = intfmt.encode(w, s16, z, self.spec)
        return get_format(self.spec.format).pack(codes, s16, z, self.spec), w, b


def _kl_maps(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over query positions of KL(p‖q) for row-stochastic ``[B, T, T]`` maps."""
    eps = 1e-10
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1).mean()


def _neg_log_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.log(F.cosine_similarity(a, b, dim=-1).mean().abs() + 1e-8)


class ABQ(Method):
    name = "abq"
    needs_calibration = True
    supports_act = True

    def validate(self, config: QuantConfig) -> None:
        for key in ("epochs",):
            if int(config.options.get(key, 1)) < 0:
                raise AnybitError(f"--{key} must be >= 0")
        super().validate(config)

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration, progress=True, run_dir=None,
            run_key: str = "") -> MethodResult:
        opts = config.options
        use_let, use_lwc, use_dc = (bool(opts.get(k, True)) for k in ("let", "lwc", "dc"))
        epochs = int(opts.get("epochs", default_epochs(config)))
        lr_let, lr_lwc, lr_dc = (float(opts.get(k, d)) for k, d in (("lr_let", 5e-3), ("lr_lwc", 1e-2), ("lr_dc", 1e-2)))
        batch = int(opts.get("batch", 1))
        qkv = ActSpec(config.abits, -1, False) if config.abits < 16 and bool(opts.get("qkv", True)) else None
        n_blocks = len(adapter.get_blocks(model))
        enable(model)  # attention through anybit's function: Q/K/V quantization and map capture

        def run_block(block, hidden, kwargs, maps: bool):
            """Outputs (and head-averaged maps) of ``block`` on ``hidden``, with gradients."""
            attn = attention_modules(block)
            if maps:
                for m in attn:
                    m.anybit_maps = []
            try:
                y = block(hidden, **kwargs)
                y = y[0] if isinstance(y, tuple) else y
                p = torch.cat([torch.stack(m.anybit_maps).mean(0) for m in attn]) if maps else None
            finally:
                for m in attn:
                    m.__dict__.pop("anybit_maps", None)
            return y, p

        def float_maps(block, hidden, kwargs) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([run_block(block, hidden[s: s + 1], kwargs, True)[1] for s in range(hidden.shape[0])])

        def process(i: int, block: nn.Module, inputs: BlockInputs, forward) -> list[LayerReport]:
            dc_block = use_dc and (i < DC_FIRST or i >= n_blocks - DC_LAST)
            y_fp = inputs.fp_out
            y_fp2 = forward(block)  # the float block on the quantized chain
            p_fp = float_maps(block, inputs.fp_hidden, inputs.kwargs) if dc_block else None
            linears = adapter.get_linears(block)
            names = {n: f"{adapter.blocks}.{i}.{n}" for n in linears}
            specs = {n: self.layer_spec(config, names[n]) for n in linears}
            # LET scales from the calibration statistics, before anything is wrapped
            lets: list[LETParams] = []
            if use_let:
                ps = pairs(adapter, block, linear_pairs=True)
                stats = input_range(block, [p.consumers[0] for p in ps], forward)
                for p in ps:
                    rng = stats[p.consumers[0]]
                    shift = None
                    if p.producer_is_norm and getattr(block.get_submodule(p.producer), "bias", None) is not None:
                        shift = (rng[0] + rng[1]) / 2  # OPT: centre each channel first (OmniQuant's init)
                        rng = (rng[0] - shift, rng[1] - shift)
                    scale = smooth_scales(p.reduce(absmax(rng)), weight_absmax(block, p), 0.5)
                    lets.append(LETParams(p, scale, shift))
            wrapped: dict[str, ABQLinear] = {}
            for n, lin in linears.items():
                if specs[n] is None:
                    continue
                wrapped[n] = ABQLinear(lin, specs[n], self.layer_act(config, names[n]), use_lwc,
                                       dc_block and n == adapter.sequential[-1][0])
            norms = {}
            for let in lets:
                p = let.pair
                for c in p.consumers:
                    if c in wrapped:
                        wrapped[c].let_in.append(let)
                if p.producer_is_norm:
                    norms[p.producer] = block.get_submodule(p.producer)
                    block.set_submodule(p.producer, LETNorm(norms[p.producer], let))
                elif p.producer in wrapped:
                    wrapped[p.producer].let_out.append(let)
            for n, w in wrapped.items():
                block.set_submodule(n, w)
            if qkv is not None:
                for m in attention_modules(block):
                    m.anybit_qkv = qkv
            for prm in block.parameters():
                prm.requires_grad_(False)
            groups = []
            let_params = [p for let in lets for p in (let.scale, let.shift) if p is not None]
            lwc_params = [p for w in wrapped.values() for p in (w.gamma, w.beta) if p is not None]
            dc_params = [p for w in wrapped.values() for p in (w.dc_a, w.dc_b) if p is not None]
            for params, lr in ((let_params, lr_let), (lwc_params, lr_lwc), (dc_params, lr_dc)):
                for p in params:
                    p.requires_grad_(True)
                if params:
                    groups.append({"params": params, "lr": lr})
            n = inputs.hidden.shape[0]
            if groups and epochs:
                opt = torch.optim.AdamW(groups, weight_decay=0.0)
                for epoch in range(epochs):
                    order = torch.randperm(n, generator=block_generator(config.seed, i, epoch))
                    for s in range(0, n, batch):
                        idx = order[s: s + batch]
                        y, p_q = run_block(block, inputs.hidden[idx], inputs.kwargs, dc_block)
                        loss = F.mse_loss(y, y_fp[idx])
                        if dc_block:
                            loss = (loss + _kl_maps(p_fp[idx], p_q).abs() + _kl_maps(p_q, p_fp[idx]).abs()
                                    + F.mse_loss(y, y_fp2[idx]) + _neg_log_cos(y, y_fp[idx]) + _neg_log_cos(y, y_fp2[idx]))
                        if not torch.isfinite(loss):
                            raise AnybitError(f"abq: the loss of block {i} is not finite; lower the learning rates")
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
            # fold the learned transforms for good, then pack
            with torch.no_grad():
                for n, w in wrapped.items():
                    packed, weff, beff = w.export()
                    block.set_submodule(n, QuantLinear.from_packed(packed, w.spec, tuple(weff.shape), beff, act=w.act))
                for name, norm in norms.items():
                    block.set_submodule(name, norm)
                for let in lets:
                    if let.pair.producer_is_norm:
                        fold_producer(block.get_submodule(let.pair.producer), let.pair, let.s(), let.shift)
                err = relative_error(y_fp, block_forward(block, inputs.hidden, inputs.kwargs))
            return [LayerReport(names[n], w.spec, err) for n, w in wrapped.items()]

        result = run_sequential(model, adapter, calibration, process, run_dir, run_key, desc=f"abq-{config.scheme}",
                                progress=progress, fp_chain=True)
        set_qkv(model, qkv)
        return result
