"""PoTPTQ (arXiv 2507.11959): power-of-two weights with two-step post-training (SPEC §3).

Step 1, data-free (``steps`` ``init``): per group, the scale ``s = s0·β`` with β on
``{0.01·i, i = 1..200}`` minimising ‖W_g − Q(W_g; s)‖² (:func:`anybit.formats.pot.init_scales`).
Step 2 (``refine``): block by block on the calibration set, a learnable residual Γ
(init 0) gives ``Ŝ = S ⊙ (1 + Γ)``; the exponents are recomputed from Ŝ at every step
with a straight-through estimator for the rounding; only Γ is trained, by Adam, on

    L(Γ) = ‖F(W, X) − F(W̃(Γ), X)‖² + (λ/2)‖Γ‖²

where F is the decoder block and X its inputs (outputs of the already-quantized blocks).
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

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import FormatSpec, get_format
from ..formats import pot
from ..models import Adapter
from ..nn import QuantLinear
from .base import LayerReport, Method, MethodResult, quantize_layers_data_free, relative_error
from .sequential import BlockInputs, block_forward, block_generator, run_sequential

_DEBUG = bool(os.environ.get("ANYBIT_DEBUG"))
STEPS = ("none", "init", "refine", "both")


def default_epochs(bits: int) -> int:
    return 40 if bits <= 2 else 10


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class PoTFakeLinear(nn.Module):
    """A linear whose weight is PoT-quantized on the fly from ``Ŝ = S ⊙ (1 + Γ)`` (training only)."""

    def __init__(self, linear: nn.Linear, scales: torch.Tensor, spec: FormatSpec, straight_through: str = "scale"):
        super().__init__()
        self.straight_through = straight_through
        self.weight = linear.weight.detach().float()
        self.bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("scales", scales.float())
        self.gamma = nn.Parameter(torch.zeros_like(self.scales))
        self.spec = spec

    def current_scales(self) -> torch.Tensor:
        return self.scales * (1 + self.gamma)

    def fake_weight(self) -> torch.Tensor:
        """``Ŝ · sign · 2^e`` with ``e`` recomputed from ``Ŝ``. The gradient reaches Ŝ through
        the product with the exponent held fixed (``straight_through="scale"``, default). A
        straight-through estimator on the rounding of ``log2(|w|/Ŝ)`` instead
        (``"log"``) makes ``Ŝ·2^ẽ = |w|`` to first order, so the two gradient paths cancel
        and only clamped weights (e = 0 or e = E) move Ŝ: measured in docs/potptq.md."""
        k = self.weight.shape[1]
        s = pot.expand_groups(self.current_scales(), self.spec.group_size, k)
        mag = (self.weight.abs() / s).clamp_min(1e-30)
        if self.straight_through == "log":
            e = round_ste(torch.log2(mag)).clamp(0, pot.top_exponent(self.spec))
        else:
            e = torch.round(torch.log2(mag)).clamp(0, pot.top_exponent(self.spec)).detach()
        w = s * torch.sign(self.weight).where(self.weight != 0, torch.ones_like(self.weight)) * torch.exp2(e)
        if pot.has_zero(self.spec):
            w = torch.where(mag.detach() < 0.5, 0.0, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight().to(x.dtype), self.bias)


class PoTPTQ(Method):
    name = "potptq"
    weight_format = "pot"  # or "potz" with the zero level: spec_from_fields chooses
    needs_calibration = True  # step 2; steps "init"/"none" ignore the data

    def spec_from_fields(self, config: QuantConfig, fields: dict) -> FormatSpec:
        spec = super().spec_from_fields(config, fields)
        fmt = "potz" if config.options.get("zero_level", True) else "pot"
        return FormatSpec(fmt, spec.bits, spec.group_size, spec.sym)

    def validate(self, config: QuantConfig) -> None:
        steps = config.options.get("steps", "both")
        if steps not in STEPS:
            raise AnybitError(f"--steps must be one of {', '.join(STEPS)}, got {steps!r}")
        if not isinstance(config.options.get("zero_level", True), bool):
            raise AnybitError(f"zero_level must be true or false, got {config.options['zero_level']!r}")
        if config.options.get("straight_through", "scale") not in ("scale", "log"):
            raise AnybitError("straight_through must be 'scale' or 'log'")
        super().validate(config)

    def initial_scales(self, w: torch.Tensor, spec: FormatSpec, config: QuantConfig) -> torch.Tensor:
        steps = config.options.get("steps", "both")
        rule = config.options.get("base_scale", "pow")
        if steps in ("init", "both"):
            return pot.init_scales(w, spec, rule)
        return pot._clamp_scale(pot.base_scale(w, spec, rule)).to(pot.SCALE_DTYPE).float()

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration, progress=True, run_dir=None,
            run_key: str = "") -> MethodResult:
        steps = config.options.get("steps", "both")
        if steps in ("none", "init"):
            return quantize_layers_data_free(
                self, model, adapter, config,
                lambda lin, spec: QuantLinear.from_packed(
                    get_format(spec.format).quantize(lin.weight.data.float(), spec, scales=self.initial_scales(lin.weight.data, spec, config)),
                    spec, tuple(lin.weight.shape), lin.bias.data if lin.bias is not None else None),
                f"potptq-{steps}", progress)
        lr = float(config.options.get("lr", 1e-3))
        lam = float(config.options.get("lambda", 0.1))
        epochs = int(config.options.get("epochs", default_epochs(config.wbits)))
        batch = int(config.options.get("batch", 1))  # one window per Adam step, as the paper (OmniQuant-style)

        def process(i: int, block: nn.Module, inputs: BlockInputs, forward) -> list[LayerReport]:
            target = block_forward(block, inputs.hidden, inputs.kwargs, batch=batch)
            fakes: dict[str, PoTFakeLinear] = {}
            originals = {}
            for name, lin in adapter.get_linears(block).items():
                spec = self.layer_spec(config, f"{adapter.blocks}.{i}.{name}")
                if spec is None:
                    continue
                fakes[name] = PoTFakeLinear(lin, self.initial_scales(lin.weight.data, spec, config), spec,
                                            str(config.options.get("straight_through", "scale")))
                originals[name] = lin
                block.set_submodule(name, fakes[name])
            params = [f.gamma for f in fakes.values()]
            for p in block.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            n = inputs.hidden.shape[0]

            def block_loss() -> float:
                with torch.no_grad():
                    return relative_error(target, block_forward(block, inputs.hidden, inputs.kwargs, batch=batch))

            # Rounding flips make the loss piecewise constant in Γ and the straight-through
            # gradient blind to the flips, so an Adam epoch can raise the block error
            # (measured in docs/potptq.md); keep the Γ of the best epoch (epoch 0 = no tuning).
            best_err = err0 = block_loss()
            best = [p.detach().clone() for p in params]
            for epoch in range(epochs):
                order = torch.randperm(n, generator=block_generator(config.seed, i, epoch))
                for s in range(0, n, batch):
                    idx = order[s: s + batch]
                    y = block(inputs.hidden[idx], **inputs.kwargs)
                    y = y[0] if isinstance(y, tuple) else y
                    mse = F.mse_loss(y, target[idx])
                    loss = mse + lam / 2 * sum((p ** 2).sum() for p in params)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                err = block_loss()
                if err < best_err:
                    best_err, best = err, [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, b in zip(params, best):
                    p.copy_(b)
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
            out = block_forward(block, inputs.hidden, inputs.kwargs, batch=batch)
            block_err = relative_error(target, out)
            for r in reports:
                r.error = block_err
            if _DEBUG:
                print(f"potptq block {i}: output error {err0:.4e} -> {block_err:.4e}", file=sys.stderr)
            return reports

        return run_sequential(model, adapter, calibration, process, run_dir, run_key, desc=f"potptq-{steps}",
                              progress=progress, batch=batch)
