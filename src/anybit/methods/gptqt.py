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
h = q + 1 was worst) and ``scale_grid`` (default 0.80…1.10 in steps of 0.05).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import FormatSpec, get_format
from ..formats.bcq import _assign, _round_coefs, fit_alternating
from ..formats.base import grouped
from ..nn import QuantLinear
from .gptq import GPTQ, gptq_quantize, output_error



def default_intermediate_bits(q: int) -> int:
    return min(8, q + 3)
DEFAULT_SCALE_GRID = (0.80, 0.85, 0.90, 0.95, 1.00, 1.05, 1.10)


def to_bcq(w_int: torch.Tensor, spec: FormatSpec, col_weight: torch.Tensor | None, rounds: int = 15):
    """Step 2's conversion: q-bit BCQ ``(b, alpha, offset)`` of the step-1 weight, float16 coefficients."""
    b, alpha, offset = fit_alternating(w_int, spec, rounds, col_weight)
    alpha, offset = _round_coefs(alpha, offset)
    wg, mask = grouped(w_int.float(), spec.group_size)
    b = _assign(torch.where(mask, wg, 0), alpha, offset)
    return b, alpha, offset


class GPTQT(GPTQ):
    name = "gptqt"
    weight_format = "bcq"
    supports_act = False

    def validate(self, config: QuantConfig) -> None:
        h = int(config.options.get("intermediate_bits", default_intermediate_bits(config.wbits)))
        if not 1 <= config.wbits < h <= 8:
            raise AnybitError(f"gptqt needs --wbits below --intermediate-bits ({h}) and at most 8; got --wbits {config.wbits}")
        super().validate(config)

    def quantize_layer(self, lin: nn.Module, H: torch.Tensor, spec: FormatSpec, config: QuantConfig):
        opts = config.options
        h = int(opts.get("intermediate_bits", default_intermediate_bits(spec.bits)))
        grid = tuple(float(x) for x in opts.get("scale_grid", DEFAULT_SCALE_GRID))
        weighted = bool(opts.get("hessian_weighted_fit", True))
        W = lin.weight.data.float()
        ispec = FormatSpec("int", h, spec.group_size, config.sym)
        gopts = self.gptq_options(config)
        col_weight = torch.diag(H) if weighted else None
        fmt = get_format("bcq")
        best = None
        for gamma in grid:
            step1 = gptq_quantize(W, H, ispec, shrink=gamma, **gopts)
            b, alpha, offset = to_bcq(step1.weight, spec, col_weight)
            packed = fmt.pack(b, alpha, offset, spec, tuple(W.shape))
            err = output_error(W, fmt.dequantize(packed, spec, tuple(W.shape)), H)
            if best is None or err < best[0]:
                best = (err, packed)
        bias = lin.bias.data if lin.bias is not None else None
        return QuantLinear.from_packed(best[1], spec, tuple(W.shape), bias), best[0]
