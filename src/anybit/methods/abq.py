"""ABQ-LLM (arXiv 2408.08554; code bytedance/ABQ-LLM, derived from OmniQuant): arbitrary
weight and activation bits, trained block by block (SPEC §3), as the official code runs it.

Per decoder block, on the calibration windows, with the block frozen and only these trained:
* **LWC**, learnable weight clipping: per (row, group) ``xmax' = σ(γ)·max``,
  ``xmin' = σ(β)·min`` (γ = β = 4 at start), asymmetric grid from the clipped range;
* **LET**, learnable equivalent transformation: per-channel scales on the pairs
  norm→q/k/v, norm→gate/up, v→o, up→down (init ``act_max^0.5 / w_max^0.5``), and shifts
  where the norm has a bias (OPT); weights are transformed and quantized at every step,
  and folded for good at the end (:mod:`anybit.methods.smoothing`);
* **Q/K transform** (``qk``; the official ``qkt_smooth_scale``, init 1): K rows × s, Q rows
  ÷ s, which moves range between the quantized Q and K and leaves Q·Kᵀ unchanged. With
  rotary embeddings s is shared by the two channels that RoPE rotates together (i and
  i + d/2), so that the transform commutes with RoPE and stays exact; the official code
  does not tie them (its fold then changes the float function a little). Off where the
  attention normalises Q and K per head (Qwen3's q_norm/k_norm undo any scale);
* **distribution correction** (blocks ``i ≤ 2`` and ``i ≥ L−4``): a rank-1 term on
  down_proj, ``W' = W + a·bᵀ`` (a = 0, b = 1 at start, lr 1e-2), added after the
  equivalent transforms and merged before quantization;
* **bit balance** (``W2*``): a 2-bit asymmetric grid with ``qmax = 2^2`` (5 levels), stored
  and executed in 3 bits (``QuantConfig.bit_balance``).

The block loss (``loss="official"``, in **every** block, as ``abq_llm.py``):
``|KL(P_fp‖P_q)| + |KL(P_q‖P_fp)| + MSE(Y_fp, Y_q) + MSE(Y_fp2, Y_q) − log|cos(Y_q, Y_fp)| − log|cos(Y_q, Y_fp2)|``
with P the head-averaged attention maps, Y_fp the float block on the float chain's inputs
and Y_fp2 the float block on the quantized chain's inputs. ``kl="official"`` is the
official term, ``KLDivLoss(reduction="mean")`` on the re-softmaxed maps (numerically ≈ 0:
a softmax of probabilities is nearly uniform, and the mean divides by T²);
``kl="maps"`` is the KL of the maps themselves (mean over query positions);
``kl="none"`` drops it (and needs no maps: the fast SDPA path). ``loss="mse"`` is
OmniQuant's ``MSE(Y_fp, Y_q)`` alone.
``skip_positions=N`` (not in the official code; default 0) leaves the first N positions of
each window out of the output terms: on SmolLM2 one value at position 0 holds 71-97 % of Σh²
from block 11 on, so the MSE measures little else (docs/weight_activation.md).
Activations: dynamic per token, asymmetric, at ``abits``; Q, K and V also at ``abits``
(:mod:`anybit.nn.attention`); the softmax output stays in float. AdamW (weight decay 0),
lr 5e-3 (LET, Q/K), 1e-2 (LWC, DC); 20 epochs, 40 for W2 settings and W8A8; batch 1;
steps under bfloat16 autocast (``amp``; the official code trains under CUDA AMP).
The official LLaMA scripts quantize weights per channel: ``group_size=-1``.
Each component can be switched off (``let``, ``lwc``, ``dc``, ``qk`` options) for the ablation.
Per block, ``config.json`` records the loss of the first and last epoch, the block output
error before and after training (``error_*``: against the float chain, which includes what
the earlier quantized blocks left in the inputs; ``own_error_*``: against the float block on
the same inputs, the part training can act on), and the clip factors, LET and Q/K scale ranges.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import ActSpec, FormatSpec, get_format
from ..formats import int as intfmt
from ..formats.activation import fake_quantize
from ..formats.base import expand_groups, grouped
from ..kernels import native
from ..models import Adapter
from ..nn import QuantLinear
from ..nn.attention import attention_modules, enable, set_qkv
from .base import LayerReport, Method, MethodResult, relative_error
from .blocktrain import epoch_order, freeze_except, keep_freed_memory, output_of, resolve_amp, summary, train_autocast
from .options import Options, opt
from .sequential import BlockInputs, block_forward, run_sequential
from .smoothing import Pair, absmax, fold_producer, input_range, pairs, smooth_scales, weight_absmax

_DEBUG = bool(os.environ.get("ANYBIT_DEBUG"))  # per-block errors on stderr (trained vs packed)
LWC_INIT = 4.0
SCALE_FLOOR = 1e-2  # LET and Q/K scales are kept at or above this before every step (official)
DC_FIRST, DC_LAST = 3, 4  # blocks i <= 2 and i >= L - 4
LOSSES = ("official", "mse")
KLS = ("official", "maps", "none")


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


class _LWCFakeQuant(torch.autograd.Function):
    """ABQ-LLM/OmniQuant's fake-quantized weight with learned clipping, forward and backward
    written out: ``wq = (clamp(round(w/s) + z, 0, H) − z)·s`` with per-(row, group) ``s, z``
    from the clipped range; straight-through rounding; gradients to w (including through the
    group max/min), γ and β equal autograd's on the unfused expression. float32 weights take
    the per-group sums and the max/min terms from two native passes where they are built
    (:func:`anybit.kernels.native.fq_backward`; equal to float32 rounding)."""

    @staticmethod
    def forward(ctx, w, gamma, beta, g: int, bits: int, qmax: int, sym: bool):
        n, k = w.shape
        wg = w.view(n, k // g, g)
        wmax, wmin = wg.amax(-1), wg.amin(-1)
        sg = torch.sigmoid(gamma)
        if sym:
            q = (1 << (bits - 1)) - 1
            araw = torch.maximum(wmax.abs(), wmin.abs())
            s_raw = araw * sg / q
            z = torch.full_like(s_raw, float(1 << (bits - 1)))
            top = (1 << bits) - 1
            sb = None
        else:
            sb = torch.sigmoid(beta)
            hi, lo = wmax.clamp_min(0) * sg, wmin.clamp_max(0) * sb
            s_raw = (hi - lo) / qmax
            top = qmax
        s = s_raw.clamp_min(1e-5)
        if not sym:
            v = -lo / s
            z = torch.round(v).clamp(0, qmax)
        se, ze = s.unsqueeze(-1), z.unsqueeze(-1)
        c = torch.clamp(torch.round(wg / se) + ze, 0, top)
        wq = ((c - ze) * se).view(n, k)
        ctx.save_for_backward(w, gamma, beta if beta is not None else gamma, wmax, wmin, s_raw, s, z)
        ctx.cfg = (g, bits, qmax, sym, top)
        return wq

    @staticmethod
    def backward(ctx, gq):
        w, gamma, beta, wmax, wmin, s_raw, s, z = ctx.saved_tensors
        g, bits, qmax, sym, top = ctx.cfg
        n, k = w.shape
        wg = w.view(n, k // g, g)
        fused = w.dtype == torch.float32 and native.has_train_kernels()
        if fused:  # the same sums in one native pass (float32; summed in another order)
            gw, gs, gzp, nmax, nmin = native.fq_backward(w.view(-1, g), gq.reshape(-1, g), s.reshape(-1), z.reshape(-1),
                                                         wmax.reshape(-1), wmin.reshape(-1), top)
            gs, gz = gs.view_as(s), -gzp.view_as(s) * s
        else:
            gq = gq.reshape(n, k // g, g)
            se, ze = s.unsqueeze(-1), z.unsqueeze(-1)
            u = wg / se
            cpre = torch.round(u) + ze
            inside = (cpre >= 0) & (cpre <= top)
            c = cpre.clamp(0, top)
            gw = torch.where(inside, gq, 0.0)
            gs = (gq * (c - ze)).sum(-1) - (gw * u).sum(-1)           # direct path of s
            gz = -(gq.sum(-1) - gw.sum(-1)) * s                         # outside: ∂wq/∂z = −s
        sin = (s_raw >= 1e-5).to(s.dtype)
        sg = torch.sigmoid(gamma)
        if sym:
            q = (1 << (bits - 1)) - 1
            gsr = gs * sin
            araw = torch.maximum(wmax.abs(), wmin.abs())
            g_gamma = gsr * araw * sg * (1 - sg) / q
            g_araw = gsr * sg / q
            am, an = wmax.abs(), wmin.abs()
            share_max = torch.where(am > an, 1.0, torch.where(am == an, 0.5, 0.0))
            g_wmax = g_araw * share_max * torch.sign(wmax)
            g_wmin = g_araw * (1 - share_max) * torch.sign(wmin)
            g_beta = None
        else:
            sb = torch.sigmoid(beta)
            lo = wmin.clamp_max(0) * sb
            v = -lo / s
            zin = ((torch.round(v) >= 0) & (torch.round(v) <= qmax)).to(s.dtype)
            gs_tot = gs + gz * zin * lo / (s * s)
            glo = -gz * zin / s
            gsr = gs_tot * sin
            g_hi = gsr / qmax
            g_lo = -gsr / qmax + glo
            g_gamma = g_hi * wmax.clamp_min(0) * sg * (1 - sg)
            g_beta = g_lo * wmin.clamp_max(0) * sb * (1 - sb)
            g_wmax = g_hi * sg * (wmax >= 0).to(s.dtype)
            g_wmin = g_lo * sb * (wmin <= 0).to(s.dtype)
        if fused:
            native.fq_add_extremes(gw, w.view(-1, g), wmax.reshape(-1), wmin.reshape(-1),
                                   (g_wmax / nmax.view_as(s)).reshape(-1), (g_wmin / nmin.view_as(s)).reshape(-1))
            return gw.view(n, k), g_gamma, g_beta, None, None, None, None
        ismax = wg == wmax.unsqueeze(-1)
        ismin = wg == wmin.unsqueeze(-1)
        gw = gw + torch.where(ismax, (g_wmax / ismax.sum(-1)).unsqueeze(-1), 0.0)
        gw = gw + torch.where(ismin, (g_wmin / ismin.sum(-1)).unsqueeze(-1), 0.0)
        return gw.view(n, k), g_gamma, g_beta, None, None, None, None


class LETParams(nn.Module):
    """Learnable scale (and shift) of one pair."""

    def __init__(self, pair: Pair, scale: torch.Tensor, shift: torch.Tensor | None):
        super().__init__()
        self.pair = pair
        self.init = scale.detach().clone()
        self.scale = nn.Parameter(scale.clone())
        self.shift = nn.Parameter(shift.clone()) if shift is not None else None

    def s(self) -> torch.Tensor:
        return self.scale.clamp_min(1e-5)


class QKScale(nn.Module):
    """The Q/K equivalent transform: per key channel ``s`` (init 1); K rows × s, Q rows ÷ s
    (each query head divided by the s of the key/value head it reads)."""

    def __init__(self, kv_heads: int, head_dim: int, rep: int, rope: bool):
        super().__init__()
        self.rep, self.rope = rep, rope
        self.scale = nn.Parameter(torch.ones(kv_heads, head_dim // 2 if rope else head_dim))

    def full(self) -> torch.Tensor:
        """``[kv_heads, head_dim]``; with RoPE the two rotated halves share their s."""
        s = self.scale.clamp_min(1e-5)
        return torch.cat([s, s], -1) if self.rope else s

    def k_rows(self) -> torch.Tensor:
        return self.full().reshape(-1)

    def q_rows(self) -> torch.Tensor:
        return (1 / self.full()).repeat_interleave(self.rep, 0).reshape(-1)


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
    ``diag(r) · ((W + a·bᵀ) · s_in) / s_out`` (r: the Q/K row scales) is fake-quantized with
    learned clipping, the input with the dynamic activation quantizer (straight-through
    rounding everywhere)."""

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
        self.row_scales: list = []  # callables giving a per-output-row factor (the Q/K transform)
        # shared by the linears of one block: layers that read the same input (q/k/v,
        # gate/up) quantize it once per step
        self.act_cache: dict | None = None

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight
        b = self.bias
        for let in self.let_in:
            if let.shift is not None:
                extra = w @ let.pair.expand(let.shift)
                b = extra if b is None else b + extra
            w = w * let.pair.expand(let.s()).unsqueeze(0)
        for let in self.let_out:
            w = w / let.s().unsqueeze(1)
            if b is not None:
                b = b / let.s()
        for rows in self.row_scales:
            r = rows()
            w = w * r.unsqueeze(1)
            if b is not None:
                b = b * r
        if self.dc_a is not None:  # after the transforms, as the official smooth_and_quant_temporary
            w = w + self.dc_a @ self.dc_b
        return w, b

    def clip_params(self, w: torch.Tensor):
        ones = torch.full((w.shape[0], 1), 100.0)  # σ(100) = 1: no clipping
        gamma = self.gamma if self.gamma is not None else ones
        beta = self.beta if self.beta is not None else ones
        return clipped_params(w, self.spec, gamma, beta)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.act_cache
        if cache is not None:
            hit = cache.get(id(x))
            if hit is not None and hit[0] is x and hit[1] == self.act:
                return hit[2]
        xq = fake_quantize(x, self.act, ste=True)
        if cache is not None:
            cache[id(x)] = (x, self.act, xq)
        return xq

    def fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The fake-quantized ``w`` (whole groups: the fused function; a ragged last group:
        the same expression through autograd)."""
        k = w.shape[1]
        g = k if self.spec.group_size == -1 else self.spec.group_size
        if k % g == 0:
            ones = torch.full((w.shape[0], k // g), 100.0)  # σ(100) = 1: no clipping
            gamma = self.gamma if self.gamma is not None else ones
            beta = None if self.spec.sym else (self.beta if self.beta is not None else ones)
            return _LWCFakeQuant.apply(w, gamma, beta, g, self.spec.bits, self.spec.qmax, self.spec.sym)
        s, z = self.clip_params(w)
        se, ze = expand_groups(s, self.spec.group_size, k), expand_groups(z, self.spec.group_size, k)
        hi = (1 << self.spec.bits) - 1 if self.spec.sym else self.spec.qmax
        return (torch.clamp(round_ste(w / se) + ze, 0, hi) - ze) * se

    def forward(self, x):
        w, b = self.effective()
        return F.linear(self.quant_input(x), self.fake_weight(w), b)

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
        fmt = get_format(self.spec.format)
        return fmt.pack(fmt.Parts(codes, s16, z), self.spec, tuple(w.shape)), w, b


def kl_official(p_fp: torch.Tensor, p_q: torch.Tensor) -> torch.Tensor:
    """The official ABQ-LLM attention term: ``KLDivLoss(reduction="mean")`` between the
    softmaxes of the head-averaged probability maps, in both directions:
    ``mean(q·(log q − log f)) + mean(f·(log f − log q))`` with ``f, q`` the softmaxes of
    the float and quantized maps (written with log-softmaxes: no ``xlogy``, one pass each)."""
    lf, lq = F.log_softmax(p_fp, -1), F.log_softmax(p_q, -1)
    d = lq - lf
    n = d.numel()
    return (torch.exp(lq) * d).sum().abs() / n + (torch.exp(lf) * d).sum().abs() / n


def kl_maps(p_fp: torch.Tensor, p_q: torch.Tensor) -> torch.Tensor:
    """KL of the maps themselves, both directions, each the mean over query positions of
    ``Σ_k p log(p/q)`` (row-stochastic ``[B, T, T]`` maps)."""
    eps = 1e-10
    lp, lq = torch.log(p_fp + eps), torch.log(p_q + eps)
    return (p_fp * (lp - lq)).sum(-1).mean().abs() + (p_q * (lq - lp)).sum(-1).mean().abs()


def _neg_log_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.log(F.cosine_similarity(a, b, dim=-1).mean().abs() + 1e-8)


def block_loss(y: torch.Tensor, y_fp: torch.Tensor, y_fp2: torch.Tensor | None, kind: str = "official",
               kl=None, p_fp: torch.Tensor | None = None, p_q: torch.Tensor | None = None,
               skip: int = 0) -> torch.Tensor:
    """The training loss of one step on block outputs ``[B, T, D]``: OmniQuant's
    ``MSE(Y_fp, Y_q)`` (``kind="mse"``) or the official sum (module docstring) with the
    attention term ``kl(p_fp, p_q)`` where given. ``skip`` leaves the first ``skip``
    positions of each window out of the output terms (the maps stay whole): where one
    position carries a massive activation (SmolLM2: position 0, ~26,000 in one channel,
    71-97 % of Σh² from block 11 on) the MSE measures little else."""
    y, y_fp = y[:, skip:], y_fp[:, skip:]
    if kind == "mse":
        return F.mse_loss(y, y_fp)
    y_fp2 = y_fp2[:, skip:]
    loss = F.mse_loss(y, y_fp) + F.mse_loss(y, y_fp2) + _neg_log_cos(y, y_fp) + _neg_log_cos(y, y_fp2)
    if kl is not None and p_q is not None:
        loss = loss + kl(p_fp, p_q)
    return loss


def _qk_transform(adapter: Adapter, block: nn.Module) -> tuple[str, str, QKScale] | None:
    """The Q/K transform for ``block``'s attention, or None where it would not be exact."""
    attn = attention_modules(block)
    if len(attn) != 1 or hasattr(attn[0], "q_norm") or hasattr(attn[0], "k_norm"):
        return None
    names = [n for n in adapter.linear_names() if n.endswith(("q_proj", "k_proj"))]
    if len(names) != 2:
        return None
    qn, kn = sorted(names, key=lambda n: not n.endswith("q_proj"))
    q, k = block.get_submodule(qn), block.get_submodule(kn)
    head_dim = getattr(attn[0], "head_dim", None)
    if not head_dim or k.out_features % head_dim or q.out_features % k.out_features:
        return None
    rope = any("rotary" in e for e in adapter.embed)
    return qn, kn, QKScale(k.out_features // head_dim, head_dim, q.out_features // k.out_features, rope)


@dataclass(frozen=True)
class ABQOptions(Options):
    let: bool = opt(True, "learnable equivalent transformation", flag="--no-let")
    lwc: bool = opt(True, "learnable weight clipping", flag="--no-lwc")
    dc: bool = opt(True, "distribution correction (rank-1 term on down_proj, first 3 and last 4 blocks)",
                   flag="--no-dc")
    qk: bool = opt(True, "the Q/K equivalent transform (qkt_smooth_scale; with let)")
    qkv: bool = opt(True, "quantize Q/K/V inside attention at --abits", flag="--no-qkv")
    epochs: int | None = opt(None, "training epochs (default 20; 40 at W2 and W8A8)", check=lambda v: v >= 0,
                             must=">= 0", flag="--epochs")
    batch: int = opt(1, "windows per AdamW step (the official scripts: 1)", check=lambda v: v >= 1, must=">= 1",
                     flag="--batch")
    lr_let: float = opt(5e-3, "learning rate of the LET and Q/K scales", check=lambda v: v > 0, must="positive")
    lr_lwc: float = opt(1e-2, "learning rate of the clipping factors", check=lambda v: v > 0, must="positive")
    lr_dc: float = opt(1e-2, "learning rate of the distribution correction", check=lambda v: v > 0,
                       must="positive")
    amp: bool | None = opt(None, "train under bfloat16 autocast (false: float32; unset: on where the CPU "
                                     "multiplies bfloat16 natively, AVX512-BF16/AMX, else float32)")
    loss: str = opt("official", "block loss: the official sum of MSE, cosine and KL terms, or OmniQuant's MSE",
                    choices=LOSSES)
    kl: str = opt("official", "attention-map KL term: the official form (numerically ~0), the maps' own KL, "
                  "or none", choices=KLS)
    skip_positions: int = opt(0, "leave the first N positions of each window out of the loss's output terms "
                              "(0: all, as the official code; 1 drops SmolLM2's massive-activation position)",
                              check=lambda v: v >= 0, must=">= 0")


class ABQ(Method):
    name = "abq"
    needs_calibration = True
    streams = True  # one block at a time (models/lazy.py)
    supports_act = True
    options_cls = ABQOptions

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration, progress=True, run_dir=None,
            run_key: str = "") -> MethodResult:
        keep_freed_memory()
        o = self.options(config)
        use_let, use_lwc, use_dc, use_qk = o.let, o.lwc, o.dc, o.qk
        epochs = o.epochs if o.epochs is not None else default_epochs(config)
        lr_let, lr_lwc, lr_dc = o.lr_let, o.lr_lwc, o.lr_dc
        batch, amp, loss_kind, kl_kind, skip = o.batch, resolve_amp(o.amp), o.loss, o.kl, o.skip_positions
        kl_fn = kl_official if kl_kind == "official" else kl_maps
        if calibration is not None and skip >= calibration.shape[1]:
            raise AnybitError(f"abq: skip_positions={skip} leaves nothing of the {calibration.shape[1]}-token "
                              f"calibration windows; lower it below --seqlen")
        qkv = ActSpec(config.abits, -1, False) if config.abits < 16 and o.qkv else None
        n_blocks = len(adapter.get_blocks(model))
        enable(model)  # attention through anybit's function: Q/K/V quantization and map capture

        def run_block(block, hidden, kwargs, maps: bool):
            """Outputs (and head-averaged maps) of ``block`` on ``hidden``."""
            attn = attention_modules(block)
            if maps:
                for m in attn:
                    m.anybit_maps = []
            try:
                y = output_of(block(hidden, **kwargs))
                p = torch.cat([torch.stack(m.anybit_maps).mean(0) for m in attn]) if maps else None
            finally:
                for m in attn:
                    m.__dict__.pop("anybit_maps", None)
            return y, p

        def float_maps(block, hidden, kwargs) -> torch.Tensor:
            n, t = hidden.shape[:2]
            out = torch.empty(n, t, t, dtype=torch.bfloat16 if amp else torch.float32)
            with torch.no_grad(), train_autocast(amp):
                for s in range(n):
                    out[s: s + 1] = run_block(block, hidden[s: s + 1], kwargs, True)[1]
            return out

        def process(i: int, block: nn.Module, inputs: BlockInputs, forward):
            dc_block = use_dc and (i < DC_FIRST or i >= n_blocks - DC_LAST)
            y_fp = inputs.fp_out
            official = loss_kind == "official"
            # the float block on the quantized chain's inputs: a loss target (official) and the
            # reference of the block's own error (the error vs y_fp also carries what the
            # quantized blocks before this one left in its inputs, which training cannot undo)
            y_fp2 = forward(block)
            want_maps = official and kl_kind != "none" and epochs > 0
            p_fp = float_maps(block, inputs.fp_hidden, inputs.kwargs) if want_maps else None
            linears = adapter.get_linears(block)
            names = {n: f"{adapter.blocks}.{i}.{n}" for n in linears}
            specs = {n: self.layer_spec(config, names[n]) for n in linears}
            # LET scales from the calibration statistics, before anything is wrapped
            lets: list[LETParams] = []
            if use_let:
                ps = pairs(adapter, block, linear_pairs=True)
                # a pair with a skipped (float) member is left out: the float layer would not
                # absorb its half of the transform and the block's function would change
                ps = [p for p in ps if all(specs.get(c) is not None for c in p.consumers)
                      and (p.producer_is_norm or specs.get(p.producer) is not None)]
                stats = input_range(block, [p.consumers[0] for p in ps], forward) if ps else {}
                for p in ps:
                    rng = stats[p.consumers[0]]
                    shift = None
                    if p.producer_is_norm and getattr(block.get_submodule(p.producer), "bias", None) is not None:
                        shift = (rng[0] + rng[1]) / 2  # OPT: centre each channel first (OmniQuant's init)
                        rng = (rng[0] - shift, rng[1] - shift)
                    scale = smooth_scales(p.reduce(absmax(rng)), weight_absmax(block, p), 0.5)
                    lets.append(LETParams(p, scale, shift))
            qk = _qk_transform(adapter, block) if use_let and use_qk else None
            wrapped: dict[str, ABQLinear] = {}
            act_cache: dict = {}
            for n, lin in linears.items():
                if specs[n] is None:
                    continue
                wrapped[n] = ABQLinear(lin, specs[n], self.layer_act(config, names[n]), use_lwc,
                                       dc_block and n == adapter.sequential[-1][0])
                wrapped[n].act_cache = act_cache
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
            if qk is not None and not (qk[0] in wrapped and qk[1] in wrapped):
                qk = None  # a skipped q or k layer cannot absorb its half of the transform
            if qk is not None:
                wrapped[qk[0]].row_scales.append(qk[2].q_rows)
                wrapped[qk[1]].row_scales.append(qk[2].k_rows)
            for n, w in wrapped.items():
                block.set_submodule(n, w)
            if qkv is not None:
                for m in attention_modules(block):
                    m.anybit_qkv = qkv
            let_params = [p for let in lets for p in (let.scale, let.shift) if p is not None]
            let_params += [qk[2].scale] if qk is not None else []
            lwc_params = [p for w in wrapped.values() for p in (w.gamma, w.beta) if p is not None]
            dc_params = [p for w in wrapped.values() for p in (w.dc_a, w.dc_b) if p is not None]
            freeze_except(block, let_params + lwc_params + dc_params)
            scale_params = [let.scale for let in lets] + ([qk[2].scale] if qk is not None else [])
            groups = [{"params": ps, "lr": lr} for ps, lr in
                      ((let_params, lr_let), (lwc_params, lr_lwc), (dc_params, lr_dc)) if ps]

            def step_loss(idx) -> torch.Tensor:
                act_cache.clear()
                y, p_q = run_block(block, inputs.hidden[idx], inputs.kwargs, want_maps)
                return block_loss(y.float(), y_fp[idx], y_fp2[idx], loss_kind, kl_fn,
                                  p_fp[idx].float() if p_q is not None else None,
                                  p_q.float() if p_q is not None else None, skip)

            def quantized_errors() -> tuple[float, float]:
                """Relative output error vs the float chain and vs the float block (own)."""
                act_cache.clear()
                y = block_forward(block, inputs.hidden, inputs.kwargs)
                return relative_error(y_fp, y), relative_error(y_fp2, y)

            n = inputs.hidden.shape[0]
            err_before, own_before = quantized_errors()
            losses = []
            if groups and epochs:
                opt = torch.optim.AdamW(groups, weight_decay=0.0)
                for epoch in range(epochs):
                    total = 0.0
                    order = epoch_order(n, config.seed, i, epoch)
                    for s in range(0, n, batch):
                        with torch.no_grad():  # the official truncate_number: scales at least 1e-2
                            for p in scale_params:
                                p.clamp_(min=SCALE_FLOOR)
                        with train_autocast(amp):
                            loss = step_loss(order[s: s + batch])
                        if not torch.isfinite(loss):
                            raise AnybitError(f"abq: the loss of block {i} is not finite; lower the learning rates")
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        total += loss.item()
                    losses.append(total / -(-n // batch))
            act_cache.clear()
            with torch.no_grad():
                for p in scale_params:
                    p.clamp_(min=SCALE_FLOOR)
            err_trained = quantized_errors()[0] if _DEBUG else None
            stats = self.block_stats(wrapped, lets, qk[2] if qk is not None else None)
            # fold the learned transforms for good, then pack
            with torch.no_grad():
                for n_, w in wrapped.items():
                    packed, weff, beff = w.export()
                    block.set_submodule(n_, QuantLinear.from_packed(packed, w.spec, tuple(weff.shape), beff, act=w.act))
                for name, norm in norms.items():
                    block.set_submodule(name, norm)
                for let in lets:
                    if let.pair.producer_is_norm:
                        fold_producer(block.get_submodule(let.pair.producer), let.pair, let.s(), let.shift)
                y = block_forward(block, inputs.hidden, inputs.kwargs)
                err, own = relative_error(y_fp, y), relative_error(y_fp2, y)
            if _DEBUG:
                print(f"abq block {i}: error {err_before:.4e} -> trained {err_trained:.4e} -> packed {err:.4e}; "
                      f"own {own_before:.4e} -> {own:.4e}; loss {losses[0] if losses else 0:.4g} -> "
                      f"{losses[-1] if losses else 0:.4g}", file=sys.stderr)
            stats.update(error_before=err_before, error_after=err, own_error_before=own_before, own_error_after=own, steps=epochs * -(-n // batch) if groups else 0, amp=amp,
                         loss_first_epoch=losses[0] if losses else None, loss_last_epoch=losses[-1] if losses else None,
                         postfix=f"own err {own_before:.3e}->{own:.3e}"
                                 + (f" loss {losses[0]:.3g}->{losses[-1]:.3g}" if losses else ""))
            return [LayerReport(names[n_], w.spec, err) for n_, w in wrapped.items()], stats

        result = run_sequential(model, adapter, calibration, process, run_dir, run_key, desc=f"abq-{config.scheme}",
                                progress=progress, fp_chain=True)
        set_qkv(model, qkv)
        return result

    @staticmethod
    def block_stats(wrapped: dict[str, ABQLinear], lets: list[LETParams], qk: QKScale | None) -> dict:
        """Where the trained parameters ended: clip factors σ(γ), σ(β); LET scales and their
        ratio to the initial ones; Q/K scales; the largest DC term."""
        out: dict = {}
        with torch.no_grad():
            g = [torch.sigmoid(w.gamma).flatten() for w in wrapped.values() if w.gamma is not None]
            b = [torch.sigmoid(w.beta).flatten() for w in wrapped.values() if w.beta is not None]
            if g:
                out["clip_gamma"] = summary(torch.cat(g))
            if b:
                out["clip_beta"] = summary(torch.cat(b))
            if lets:
                out["let_scale"] = summary(torch.cat([let.s().flatten() for let in lets]))
                out["let_ratio"] = summary(torch.cat([(let.s() / let.init.clamp_min(1e-5)).flatten() for let in lets]))
            if qk is not None:
                out["qk_scale"] = summary(qk.full())
            dc = [w.dc_a.abs().max() for w in wrapped.values() if w.dc_a is not None]
            if dc:
                out["dc_a_abs_max"] = float(max(dc))
        return out
