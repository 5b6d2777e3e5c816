"""GPTQ (Frantar et al., 2023), following IST-DASLab/gptq ``gptq.py`` line by line.

Per linear layer, with ``X`` its calibration inputs (Alg. 1 of the paper):
  H = 2 X Xᵀ / n                                  (Hessian of the layer's squared output error)
  dead columns (H_jj = 0): H_jj = 1, W_:j = 0
  H += λ I, λ = damp_percent · mean(diag H)       (dampening)
  U = chol(H⁻¹)ᵀ (upper)                          (Cholesky form of the inverse Hessian)
  for each block of B columns, for each column j:
      q_j = quant(w_j);  e_j = (w_j - q_j) / U_jj
      W_:,j+1..  -= e_j U_j,j+1..                  (OBS update, inside the block)
  W_:,after block -= E U_block,after              (lazy batch update)
Column order (``order``): ``none`` (the natural order); ``act`` (act-order, columns by
decreasing H_jj, with static groups: group parameters from the unquantized weight, so the
stored layout stays group-contiguous); ``gar`` (group-aware reordering, Gafni et al. 2025,
GPTQModel's default without act-order: columns by decreasing H_jj *within* each group,
groups by their largest H_jj; each group's parameters are set when its first column comes,
from the error-updated weights, and the layout needs no g_idx). A ragged last group stays last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import FormatSpec, get_format
from ..formats import int as intfmt
from ..models import Adapter
from ..nn import QuantLinear
from .base import LayerReport, Method, MethodResult
from .options import Options, opt
from .sequential import BlockInputs, run_sequential


# defaults, chosen by measurement on SmolLM2-135M (Q4_1-dequantized), C4 32 x 512
# (docs/RESULTS.md, papers'-budget grid): act-order is the best order at W2 g64 (4,376 vs
# natural 14,988), W3 g128 (55.83 vs 77.27; group-aware 59.46) and W4 g128 (25.98 vs 28.12;
# 26.38); dampening 0.05 beats 0.01 at W3 g128 in both orders (54.42 vs 55.83, 74.98 vs
# 77.27). GPTQModel's defaults are the same (desc_act, damp_percent 0.05).
DEFAULT_ORDER = "act"
DEFAULT_DAMP = 0.05


class HessianAccumulator:
    """Accumulates ``H = 2/n Σ x xᵀ`` over the tokens seen by one linear layer."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = math.sqrt(2 / self.n) * x
        self.H += x.t() @ x


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # [N, G]
    zeros: torch.Tensor  # [N, G]
    weight: torch.Tensor  # dequantized float32 [N, K]
    error: float  # tr(E H Eᵀ) / tr(W H Wᵀ): relative output error on the calibration inputs


ORDERS = ("none", "act", "gar")


def gar_permutation(diag: torch.Tensor, g: int) -> torch.Tensor:
    """Group-aware reordering: within each group by decreasing ``diag``, groups by their
    largest ``diag`` (descending); a ragged last group is kept last."""
    k = diag.numel()
    full = k // g
    within = torch.argsort(diag[: full * g].view(full, g), dim=1, descending=True, stable=True)
    order = torch.argsort(diag[: full * g].view(full, g).amax(1), descending=True, stable=True)
    perm = (within[order] + order.unsqueeze(1) * g).reshape(-1)
    if k > full * g:
        tail = torch.argsort(diag[full * g:], descending=True, stable=True) + full * g
        perm = torch.cat([perm, tail])
    return perm


class Grid(Protocol):
    """The number grid GPTQ rounds each column onto (Alg. 1's ``quant``), per group."""

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) ``[N, 1]`` of a group from its (error-updated) columns ``w [N, g]``."""

    def round(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, values) ``[N]`` of column ``w [N]`` on the grid of ``scale``/``zero`` ``[N]``."""


@dataclass(frozen=True)
class IntGrid:
    """The uniform INT grid of ``spec`` (formats/int.py): min/max (or symmetric, by ``sym_rule``)
    group range scaled by ``shrink``, codes ``clamp(round(w/s) + z, 0, qmax)``."""

    spec: FormatSpec
    shrink: float = 1.0
    sym_rule: str = "absmax"

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return intfmt.group_params(w, replace(self.spec, group_size=-1), self.shrink, self.sym_rule)

    def round(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.clamp(torch.round(w / scale) + zero, 0, self.spec.qmax)
        return c, scale * (c - zero)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: FormatSpec, blocksize: int = 128,
                  damp_percent: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  shrink: float = 1.0, order: str | None = None, sym_rule: str = "absmax",
                  grid: Grid | None = None) -> GPTQResult:
    """Quantize ``W [N, K]`` with GPTQ given its Hessian ``H [K, K]`` on ``grid`` (default
    :class:`IntGrid` of ``spec`` with ``shrink`` and ``sym_rule``); ``spec`` gives the group size.

    ``shrink`` scales every group's min/max range before its grid is set (GPTQT's scale
    re-exploration searches it). ``order`` (``none``/``act``/``gar``; ``act_order=True``
    is ``act``) and ``sym_rule`` (:func:`anybit.formats.int.group_params`): see the module.
    """
    grid = grid if grid is not None else IntGrid(spec, shrink, sym_rule)
    order = order or ("act" if act_order else "none")
    if order == "gar" and spec.group_size == -1:
        order = "none"  # one group per row: nothing to reorder within
    # the caller's W and H stay as they are (the output error is measured on them); the
    # K x K work arrays are freed as soon as used: a 70B down_proj's Hessian is 3.3 GB
    W_orig, H_orig = W, H
    W = W.clone().float()
    H = H.clone()
    n, k = W.shape
    g = k if spec.group_size == -1 else spec.group_size
    ng = math.ceil(k / g)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(n, ng)
    zeros = torch.zeros(n, ng)
    if static_groups or spec.group_size == -1:
        for gi in range(ng):
            scales[:, gi:gi + 1], zeros[:, gi:gi + 1] = grid.params(W[:, gi * g:(gi + 1) * g])
    perm = None
    if order == "act":
        if spec.group_size != -1 and not static_groups:
            raise AnybitError("act-order with groups needs static groups (--static-groups) to keep the packed layout")
        perm = torch.argsort(torch.diag(H), descending=True)
    elif order == "gar":
        perm = gar_permutation(torch.diag(H), g)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    # group of each (possibly permuted) column
    col_group = (perm if perm is not None else torch.arange(k)) // g

    damp = damp_percent * torch.mean(torch.diag(H))
    H[torch.arange(k), torch.arange(k)] += damp
    try:
        L = torch.linalg.cholesky(H)
        del H
        Hinv = torch.cholesky_inverse(L)
        del L
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except torch._C._LinAlgError:
        raise AnybitError("the layer Hessian is not positive definite; raise --damp-percent or use more calibration data") from None

    # blocks hold whole groups, so that a group's parameters see its up-to-date columns
    if not static_groups and spec.group_size != -1:
        blocksize = g * max(1, blocksize // g)
    Q = torch.zeros_like(W)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = int(col_group[col])
            if not static_groups and spec.group_size != -1 and col % g == 0:
                scales[:, gi:gi + 1], zeros[:, gi:gi + 1] = grid.params(W1[:, i:i + g])
            w = W1[:, i]
            d = Hinv1[i, i]
            c, q = grid.round(w, scales[:, gi], zeros[:, gi])
            codes[:, col] = c.to(torch.uint8)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        codes = codes[:, inv]
    return GPTQResult(codes, scales, zeros, Q, output_error(W_orig, Q, H_orig))


def collect_hessians(block: nn.Module, linears: dict[str, nn.Module], forward) -> dict[str, HessianAccumulator]:
    """Run the block once with hooks that accumulate each linear's input Hessian."""
    accs = {name: HessianAccumulator(m.in_features) for name, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, inp, out, a=accs[name]: a.add(inp[0].detach()))
               for name, m in linears.items()]
    try:
        forward(block)
    finally:
        for h in handles:
            h.remove()
    return accs


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer output error on the calibration inputs: tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ."""
    E = W.float() - W_hat.float()
    den = ((W.float() @ H) * W.float()).sum().item()
    return ((E @ H) * E).sum().item() / den if den > 0 else 0.0


@dataclass(frozen=True)
class GPTQOptions(Options):
    damp_percent: float = opt(DEFAULT_DAMP, "dampening: lambda = damp_percent * mean(diag H)",
                              check=lambda v: 0 < v < 1, must="between 0 and 1", flag="--damp-percent")
    order: str | None = opt(None, "column order: act (act-order, the default), none (natural) or gar "
                            "(group-aware reordering)", choices=ORDERS, flag="--order")
    act_order: bool = opt(False, "the same as order=act", flag="--act-order")
    static_groups: bool = opt(False, "group parameters from the float weight (implied by act-order with groups)",
                              flag="--static-groups")
    true_sequential: bool = opt(True, "quantize a block's linears in GPTQ's sequential groups (q/k/v, o, "
                                "gate/up, down), each on the inputs the quantized earlier ones give",
                                flag="--no-true-sequential")
    blocksize: int = opt(128, "columns per lazy batch update", check=lambda v: v >= 1, must=">= 1")
    sym_rule: str = opt("absmax", "symmetric grid (with --sym): absmax, range (GPTQ's 2*absmax/(2^b-1)) or "
                        "signed (ggml's Q4_0 rule)", choices=intfmt.SYM_RULES)


class GPTQ(Method):
    name = "gptq"
    needs_calibration = True
    streams = True  # one block at a time (models/lazy.py)
    supports_act = True  # GPTQ weights with dynamic activations (W4A8, ...)
    options_cls = GPTQOptions

    def gptq_options(self, config: QuantConfig) -> dict:
        """The keyword arguments of :func:`gptq_quantize`."""
        o = self.options(config)
        order = o.order or ("act" if o.act_order else DEFAULT_ORDER)
        return {
            "damp_percent": o.damp_percent,
            "order": order,
            "static_groups": o.static_groups or (order == "act" and config.group_size != -1),
            "blocksize": o.blocksize,
            "sym_rule": o.sym_rule,
        }

    def quantize_layer(self, lin: nn.Module, H: torch.Tensor, spec: FormatSpec, config: QuantConfig
                       ) -> tuple[QuantLinear, float]:
        """Quantize one linear layer given its input Hessian; returns the module and its error."""
        res = gptq_quantize(lin.weight.data, H, spec, **self.gptq_options(config))
        fmt = get_format(spec.format)
        packed = fmt.pack(fmt.Parts(res.codes, res.scales, res.zeros), spec, tuple(lin.weight.shape))
        bias = lin.bias.data if lin.bias is not None else None
        return QuantLinear.from_packed(packed, spec, tuple(lin.weight.shape), bias), res.error

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration, progress=True, run_dir=None,
            run_key: str = "") -> MethodResult:
        true_seq = self.options(config).true_sequential

        def process(i: int, block: nn.Module, inputs: BlockInputs, forward) -> list[LayerReport]:
            groups = adapter.sequential if true_seq else (tuple(adapter.linear_names()),)
            reports = []
            for group in groups:
                specs = {n: self.layer_spec(config, f"{adapter.blocks}.{i}.{n}") for n in group}
                linears = {n: block.get_submodule(n) for n in group if specs[n] is not None}
                if not linears:
                    continue
                accs = collect_hessians(block, linears, forward)
                for name, lin in linears.items():
                    q, err = self.quantize_layer(lin, accs.pop(name).H, specs[name], config)
                    q.act = self.layer_act(config, f"{adapter.blocks}.{i}.{name}")
                    block.set_submodule(name, q)
                    reports.append(LayerReport(f"{adapter.blocks}.{i}.{name}", specs[name], err))
            return reports

        return run_sequential(model, adapter, calibration, process, run_dir, run_key, desc=self.name,
                              progress=progress)
