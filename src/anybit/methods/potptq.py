"""PoTPTQ (arXiv 2507.11959): power-of-two weights with two-step post-training (SPEC §3).

Step 1, data-free (``steps`` ``init``): per group, the scale ``s = s0·β`` with β on
``{0.01·i, i = 1..200}`` minimising ‖W_g − Q(W_g; s)‖² (:func:`anybit.formats.pot.init_scales`).
Step 2 (``refine``): block by block on the calibration set, a learnable residual Γ
(init 0) gives ``Ŝ = S ⊙ (1 + Γ)``; the exponents are recomputed from Ŝ at every step
with a straight-through estimator for the rounding; only Γ is trained, by Adam, on

    L(Γ) = ‖F(W, X) − F(W̃(Γ), X)‖² + (λ/2)‖Γ‖²

where F is the decoder block and X its inputs (outputs of the already-quantized blocks),
both norms squared Frobenius norms, i.e. sums (a mean-form data term would make λ
B·T·D ≈ 3×10⁵ times stronger on a SmolLM2 block and pin Γ at 0). Batch 1 (one window per
Adam step), as the paper; ``amp`` (default on) runs the steps under bfloat16 autocast
(:mod:`anybit.methods.blocktrain`).
``guard``: rounding flips make the loss piecewise constant in Γ, so training can raise
the block error; ``end`` (default) keeps Γ = 0 if the block error after the last epoch is
above the untrained one, ``best`` keeps the best epoch (one extra block pass per epoch),
``none`` keeps the last Γ. Per block, ``config.json`` records the block output error
before and after, mean and max |Γ|, the steps run and the epoch kept.
``steps``: ``init`` (step 1 only), ``refine`` (step 2 from the plain base scale s0),
``both`` (default), ``none`` (base scale, no tuning: the ablation's first row).
Defaults from the paper: lr 1e-3, λ 0.1, 10 epochs at 3 bits, 40 at 2 bits.

``zero_level`` (default true): the ``potz`` format, exponent code 0 = 0 (SPEC §2 leaves the
choice open). Without a zero level PoTPTQ breaks SmolLM2-135M (docs/potptq.md);
``zero_level=false`` gives the plain ``pot`` format.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..formats import FormatSpec, get_format
from ..formats import pot
from ..formats.base import grouped
from ..kernels import native
from ..models import Adapter
from ..nn import QuantLinear
from ..nn.attention import enable as enable_attention
from .base import LayerReport, Method, MethodResult, quantize_layers_data_free, relative_error
from .blocktrain import epoch_order, freeze_except, keep_freed_memory, output_of, resolve_amp, train_autocast
from .options import Options, opt
from .sequential import BlockInputs, block_forward, run_sequential

_DEBUG = bool(os.environ.get("ANYBIT_DEBUG"))
STEPS = ("none", "init", "refine", "both")


def default_epochs(bits: int) -> int:
    return 40 if bits <= 2 else 10


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _ScaleTimesLevels(torch.autograd.Function):
    """``W̃ = expand(Ŝ) ⊙ P`` for per-group scales ``Ŝ [N, G]`` and fixed levels
    ``P [N, G, g]`` (sign·2^e, 0 for the zero level and for padding); the gradient to Ŝ is
    ``Σ_group dW̃ ⊙ P ⊙ mask`` (mask: which weights pass gradient), without autograd
    keeping the intermediates of the elementwise graph."""

    @staticmethod
    def forward(ctx, s_hat, levels, grad_mask, k: int):
        ctx.save_for_backward(levels if grad_mask is None else levels * grad_mask)
        ctx.k = k
        n, g, gs = levels.shape
        return (s_hat.unsqueeze(-1) * levels).reshape(n, g * gs)[:, :k]

    @staticmethod
    def backward(ctx, grad_w):
        (levels,) = ctx.saved_tensors
        return _scale_grad(grad_w, levels, ctx.k), None, None, None


def _scale_grad(grad_w: torch.Tensor, levels: torch.Tensor, k: int) -> torch.Tensor:
    """``Σ_group dW̃ ⊙ P``: the gradient to the per-group scales of ``W̃ = expand(Ŝ) ⊙ P``."""
    n, g, gs = levels.shape
    grad_w = grad_w.float()  # exact: a bfloat16 gradient as autocast's cast would return it
    pad = g * gs - k
    if pad:
        grad_w = F.pad(grad_w, (0, pad))
    return (grad_w.reshape(n, g, gs) * levels).sum(-1)


class _NativePoTWeight(torch.autograd.Function):
    """:meth:`PoTFakeLinear.fake_weight` (``straight_through="scale"``) in one native pass
    (:func:`anybit.kernels.native.pot_fake_weight`), the weight already in the dtype the
    linear multiplies in; values and gradient equal the PyTorch path's bit for bit."""

    @staticmethod
    def forward(ctx, s_hat, log_abs, sign, k: int, top: int, zero: bool, dtype):
        levels, w = native.pot_fake_weight(log_abs, sign, s_hat, k, top, zero, dtype)
        ctx.save_for_backward(levels)
        ctx.k = k
        return w

    @staticmethod
    def backward(ctx, grad_w):
        (levels,) = ctx.saved_tensors
        return _scale_grad(grad_w, levels, ctx.k), None, None, None, None, None, None


class PoTFakeLinear(nn.Module):
    """A linear whose weight is PoT-quantized on the fly from ``Ŝ = S ⊙ (1 + Γ)`` (training only).

    ``log2|w|`` and ``sign(w)`` are computed once (the weight is frozen); a step recomputes
    the exponents ``e = clamp(round(log2|w| − log2 Ŝ), 0, E)`` (what :func:`pot.encode`
    does) and ``W̃ = Ŝ · sign · 2^e``."""

    def __init__(self, linear: nn.Linear, scales: torch.Tensor, spec: FormatSpec, straight_through: str = "scale"):
        super().__init__()
        self.straight_through = straight_through
        w = linear.weight.detach().float()
        self.k = w.shape[1]
        self.bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("scales", scales.float())
        self.gamma = nn.Parameter(torch.zeros_like(self.scales))
        self.spec = spec
        wg, mask = grouped(w, spec.group_size)  # [N, G, g], NaN padding
        wg = torch.where(mask, wg, 0.0)
        self.log_abs = torch.log2(wg.abs().clamp_min(1e-30))
        # pot maps w = 0 to +s (no zero level); padding gets sign 0, so it contributes nothing
        self.sign = torch.where(wg < 0, -1.0, 1.0) * mask

    def current_scales(self) -> torch.Tensor:
        return self.scales * (1 + self.gamma)

    def fake_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Ŝ · sign · 2^e`` with ``e`` recomputed from ``Ŝ``. The gradient reaches Ŝ through
        the product with the exponent held fixed (``straight_through="scale"``, default). A
        straight-through estimator on the rounding of ``log2(|w|/Ŝ)`` instead
        (``"log"``) makes ``Ŝ·2^ẽ = |w|`` to first order, so the two gradient paths cancel
        and only clamped weights (rounded exponent outside 0..E) move Ŝ: measured in
        docs/potptq.md."""
        s_hat = self.current_scales()
        if self.straight_through == "scale" and dtype in (torch.float32, torch.bfloat16) and native.has_train_kernels():
            return _NativePoTWeight.apply(s_hat, self.log_abs, self.sign, self.k, pot.top_exponent(self.spec),
                                          pot.has_zero(self.spec), dtype)
        with torch.no_grad():
            r = torch.round(self.log_abs - torch.log2(s_hat.clamp_min(1e-30)).unsqueeze(-1))
            top = pot.top_exponent(self.spec)
            levels = self.sign * torch.exp2(r.clamp(0, top))
            if pot.has_zero(self.spec):  # |w|/Ŝ < 1/2, i.e. log2 < −1: the zero level
                levels = torch.where(self.log_abs - torch.log2(s_hat).unsqueeze(-1) < -1, 0.0, levels)
            grad_mask = ((r < 0) | (r > top)).float() if self.straight_through == "log" else None
        return _ScaleTimesLevels.apply(s_hat, levels, grad_mask, self.k).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the dtype the linear will multiply in (autocast casts a float32 weight to it)
        bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                             and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return F.linear(x, self.fake_weight(torch.bfloat16 if bf16 else x.dtype), self.bias)


@dataclass(frozen=True)
class PoTPTQOptions(Options):
    steps: str = opt("both", "scale init (step 1), refinement (step 2), both or none", choices=STEPS,
                     flag="--steps")
    zero_level: bool = opt(True, "the potz format (exponent code 0 = 0); false: the plain pot format",
                           flag="--no-zero-level")
    base_scale: str = opt("pow", "step 1's base scale: max|w| / 2^(e_max-1) (pow) or / (2^e_max - 1) (range)",
                          choices=("pow", "range"))
    epochs: int | None = opt(None, "step 2 epochs over the calibration windows (default 10; 40 at 2 bits)",
                             check=lambda v: v >= 0, must=">= 0", flag="--epochs")
    lr: float = opt(1e-3, "step 2 Adam learning rate for Gamma", check=lambda v: v > 0, must="positive",
                    flag="--lr")
    lam: float = opt(0.1, "step 2 weight of (lambda/2)*||Gamma||^2", check=lambda v: v >= 0, must=">= 0",
                     flag="--lambda", key="lambda")
    batch: int = opt(1, "windows per Adam step (the paper: 1)", check=lambda v: v >= 1, must=">= 1",
                     flag="--batch")
    amp: bool | None = opt(None, "train under bfloat16 autocast (false: float32; unset: on where the CPU "
                                     "multiplies bfloat16 natively, AVX512-BF16/AMX, else float32)")
    guard: str = opt("end", "keep the trained scales only if the block error fell: at the end, the best "
                     "epoch, or never check", choices=("end", "best", "none"))
    straight_through: str = opt("scale", "gradient path of the rounding: through the scale or its log",
                                choices=("scale", "log"))


class PoTPTQ(Method):
    name = "potptq"
    weight_format = "pot"  # or "potz" with the zero level: spec_from_fields chooses
    needs_calibration = True  # step 2
    streams = True  # one block at a time (models/lazy.py)
    options_cls = PoTPTQOptions

    def uses_calibration(self, config) -> bool:
        return self.options(config).steps in ("refine", "both")  # "init"/"none" are data-free

    def spec_from_fields(self, config: QuantConfig, fields: dict) -> FormatSpec:
        spec = super().spec_from_fields(config, fields)
        fmt = "potz" if self.options(config).zero_level else "pot"
        return FormatSpec(fmt, spec.bits, spec.group_size, spec.sym)

    def initial_scales(self, w: torch.Tensor, spec: FormatSpec, config: QuantConfig) -> torch.Tensor:
        o = self.options(config)
        steps, rule = o.steps, o.base_scale
        if steps in ("init", "both"):
            return pot.init_scales(w, spec, rule)
        return pot._clamp_scale(pot.base_scale(w, spec, rule)).to(pot.SCALE_DTYPE).float()

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration, progress=True, run_dir=None,
            run_key: str = "") -> MethodResult:
        o = self.options(config)
        steps = o.steps
        if steps in ("none", "init"):
            return quantize_layers_data_free(
                self, model, adapter, config,
                lambda lin, spec: QuantLinear.from_packed(
                    get_format(spec.format).quantize(lin.weight.data.float(), spec, scales=self.initial_scales(lin.weight.data, spec, config)),
                    spec, tuple(lin.weight.shape), lin.bias.data if lin.bias is not None else None),
                f"potptq-{steps}", progress)
        keep_freed_memory()
        enable_attention(model)  # the training steps use anybit's causal attention (faster backward)
        lr, lam, batch, amp = o.lr, o.lam, o.batch, resolve_amp(o.amp)  # batch 1: one window per Adam step, as the paper
        epochs = o.epochs if o.epochs is not None else default_epochs(config.wbits)
        guard, straight_through = o.guard, o.straight_through

        def process(i: int, block: nn.Module, inputs: BlockInputs, forward):
            target = forward(block)
            fakes: dict[str, PoTFakeLinear] = {}
            originals = {}
            for name, lin in adapter.get_linears(block).items():
                spec = self.layer_spec(config, f"{adapter.blocks}.{i}.{name}")
                if spec is None:
                    continue
                fakes[name] = PoTFakeLinear(lin, self.initial_scales(lin.weight.data, spec, config), spec,
                                            straight_through)
                originals[name] = lin
                block.set_submodule(name, fakes[name])
            params = [f.gamma for f in fakes.values()]
            freeze_except(block, params)
            opt = torch.optim.Adam(params, lr=lr)
            n = inputs.hidden.shape[0]

            def block_error(precise: bool) -> float:
                with torch.no_grad(), train_autocast(amp and not precise):
                    return relative_error(target, block_forward(block, inputs.hidden, inputs.kwargs, batch=batch))

            err0 = block_error(precise=True)  # the block after step 1 (Γ = 0), in float32
            best_err = None
            if guard != "none":  # compared in the training precision
                best_err = block_error(False) if amp else err0
            best, best_epoch = [p.detach().clone() for p in params], 0
            losses = []
            for epoch in range(epochs):
                total = 0.0
                for s in range(0, n, batch):
                    idx = epoch_order(n, config.seed, i, epoch)[s: s + batch]
                    with train_autocast(amp):
                        y = output_of(block(inputs.hidden[idx], **inputs.kwargs))
                    # Eq. (the paper's loss): squared Frobenius norms, both as sums; a mean-form
                    # data term next to a sum-form regulariser makes λ B·T·D times stronger
                    data = (y.float() - target[idx]).pow(2).sum()
                    loss = data + lam / 2 * sum((p ** 2).sum() for p in params)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += data.item()
                losses.append(total / n)
                if guard == "best" or (guard == "end" and epoch == epochs - 1):
                    err = block_error(False)
                    if err < best_err:
                        best_err, best, best_epoch = err, [p.detach().clone() for p in params], epoch + 1
            if guard == "none":
                best_epoch = epochs
            with torch.no_grad():
                if guard != "none":
                    for p, b in zip(params, best):
                        p.copy_(b)
                gammas = torch.cat([p.detach().abs().flatten() for p in params]) if params else torch.zeros(1)
            reports = []
            with torch.no_grad():
                for name, fake in fakes.items():
                    lin = originals[name]
                    spec = fake.spec
                    packed = get_format(spec.format).quantize(lin.weight.data.float(), spec,
                                                              scales=fake.current_scales().detach())
                    bias = lin.bias.data if lin.bias is not None else None
                    q = QuantLinear.from_packed(packed, spec, tuple(lin.weight.shape), bias)
                    block.set_submodule(name, q)
                    reports.append(LayerReport(f"{adapter.blocks}.{i}.{name}", spec, 0.0))
            # every layer of the block reports the block's relative output error after tuning
            block_err = relative_error(target, forward(block))
            for r in reports:
                r.error = block_err
            stats = {"error_before": err0, "error_after": block_err, "steps": epochs * -(-n // batch), "amp": amp,
                     "gamma_abs_mean": float(gammas.mean()), "gamma_abs_max": float(gammas.max()),
                     "loss_first_epoch": losses[0] if losses else None, "loss_last_epoch": losses[-1] if losses else None,
                     "kept_epoch": best_epoch,
                     "postfix": f"err {err0:.3e}->{block_err:.3e} |G| {float(gammas.mean()):.2e}"}
            if _DEBUG:
                print(f"potptq block {i}: output error {err0:.4e} -> {block_err:.4e}, mean |Γ| {stats['gamma_abs_mean']:.3e}",
                      file=sys.stderr)
            return reports, stats

        return run_sequential(model, adapter, calibration, process, run_dir, run_key, desc=f"potptq-{steps}",
                              progress=progress, batch=batch)
