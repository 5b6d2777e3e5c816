"""GPTQT (Guo et al., 2024, arXiv 2407.02891): quantize twice.

Step 1: GPTQ to a relatively high bit width h on the uniform grid (``intermediate_bits``).
Step 2: convert each group of the h-bit weight to q-bit binary coding (BCQ), and
"re-explore" the step-1 scale: step 1 is repeated with the group ranges scaled by each
factor of ``scale_grid`` and the candidate whose *final BCQ weight* has the smallest
layer output error on the calibration data, ``tr(E H Eᵀ)/tr(W H Wᵀ)``, is kept (the
paper reports that judging by weight error alone overfits).

The conversion fits the q-bit BCQ to the h-bit group values by alternating least
squares, weighting each column by ``diag(H)`` (its share of the output error). The
result is pure binary coding: scale and zero point of step 1 are absorbed into α and
the offset, so inference is a BCQ (LUT-GEMM) layer.

Open choices (SPEC §3), measured in docs/gptq.md: ``intermediate_bits`` (default
``q + 3``, at most 8: on stories260K h = 6 was best at q = 3 and h = 5 at q = 2, and
h = q + 1 was worst) and ``scale_grid`` (default 0.80…1.10 in steps of 0.05). Candidates
are compared after ``search_rounds`` (3) alternating rounds; the winner is refitted with
``rounds`` (15). ``offset16``: store the offset in float16 (format ``bcq16``, 0.125 b/w
less at g128).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import FormatSpec, get_format
from ..formats.bcq import _assign, _round_coefs, fit_alternating, signs_of
from ..formats.base import grouped
from ..nn import QuantLinear
from .gptq import GPTQ, GPTQOptions, IntGrid, gptq_quantize, output_error
from .options import opt


def default_intermediate_bits(q: int) -> int:
    return min(8, q + 3)


DEFAULT_SCALE_GRID = (0.80, 0.85, 0.90, 0.95, 1.00, 1.05, 1.10)


def to_bcq(w_int: torch.Tensor, spec: FormatSpec, col_weight: torch.Tensor | None, rounds: int = 15):
    """Step 2's conversion: q-bit BCQ ``(b, alpha, offset)`` of the step-1 weight, float16 coefficients."""
    b, alpha, offset = fit_alternating(w_int, spec, rounds, col_weight)
    alpha, offset = _round_coefs(alpha, offset, get_format(spec.format).offset_dtype)
    wg, mask = grouped(w_int.float(), spec.group_size)
    b = _assign(torch.where(mask, wg, 0), alpha, offset)
    return b, alpha, offset


@dataclass(frozen=True)
class GPTQTOptions(GPTQOptions):
    intermediate_bits: int | None = opt(None, "bit width of step 1 (default wbits + 3, at most 8)",
                                        flag="--intermediate-bits")
    scale_grid: tuple[float, ...] = opt(DEFAULT_SCALE_GRID, "range factors of step 1 to re-explore "
                                        "(comma- or /-separated)", check=lambda g: len(g) > 0 and min(g) > 0,
                                        must="positive factors such as 0.9/0.95/1.0", flag="--scale-grid")
    offset16: bool = opt(False, "store the BCQ offset in float16 (format bcq16; 0.125 b/w less at g128)")
    hessian_weighted_fit: bool = opt(True, "weight the BCQ fit's columns by diag(H)")
    search_rounds: int = opt(3, "alternating rounds per candidate scale", check=lambda v: v >= 0, must=">= 0")
    rounds: int = opt(15, "alternating rounds of the winner's refit", check=lambda v: v >= 0, must=">= 0")


class GPTQT(GPTQ):
    name = "gptqt"
    weight_format = "bcq"
    supports_act = False
    options_cls = GPTQTOptions

    def spec_from_fields(self, config: QuantConfig, fields: dict) -> FormatSpec:
        spec = super().spec_from_fields(config, fields)
        fmt = "bcq16" if self.options(config).offset16 else "bcq"
        return FormatSpec(fmt, spec.bits, spec.group_size, spec.sym)

    def validate(self, config: QuantConfig) -> None:
        o = self.options(config)
        h = o.intermediate_bits or default_intermediate_bits(config.wbits)
        if not 1 <= config.wbits < h <= 8:
            raise AnybitError(f"gptqt needs --wbits below --intermediate-bits ({h}) and at most 8; got --wbits {config.wbits}")
        super().validate(config)

    def quantize_layer(self, lin: nn.Module, H: torch.Tensor, spec: FormatSpec, config: QuantConfig):
        o = self.options(config)
        h = o.intermediate_bits or default_intermediate_bits(spec.bits)
        grid = o.scale_grid
        weighted = o.hessian_weighted_fit
        W = lin.weight.data.float()
        ispec = FormatSpec("int", h, spec.group_size, config.sym)
        gopts = self.gptq_options(config)
        col_weight = torch.diag(H) if weighted else None
        fmt = get_format(spec.format)
        # The search judges each candidate with a short fit (``search_rounds``); only the
        # winner gets the full alternating fit (``rounds``): the fits were ~70 % of the time.
        search_rounds, rounds = o.search_rounds, o.rounds

        def bcq_of(w_int: torch.Tensor, n_rounds: int):
            b, alpha, offset = to_bcq(w_int, spec, col_weight, n_rounds)
            packed = fmt.pack(fmt.Parts(signs_of(b, tuple(W.shape)), alpha, offset), spec, tuple(W.shape))
            return output_error(W, fmt.dequantize(packed, spec, tuple(W.shape)), H), packed

        best = None
        for gamma in grid:
            step1 = gptq_quantize(W, H, ispec, grid=IntGrid(ispec, gamma, gopts['sym_rule']), **gopts)
            err, packed = bcq_of(step1.weight, search_rounds)
            if best is None or err < best[0]:
                best = (err, packed, step1.weight)
        if rounds > search_rounds:
            err, packed = bcq_of(best[2], rounds)
            if err < best[0]:
                best = (err, packed, best[2])
        bias = lin.bias.data if lin.bias is not None else None
        return QuantLinear.from_packed(best[1], spec, tuple(W.shape), bias), best[0]
