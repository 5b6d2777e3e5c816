"""FlexQ (arXiv 2508.04405): INT6 weights, 6-bit activations, and 8-bit activations kept in
the layers a sensitivity analysis finds most fragile (SPEC §3).

* Weights: symmetric INT (6-bit: ``[−32, 31]``, ``s = absmax/31``) per group of 128 along
  K, round to nearest, calibration-free.
* Activations: dynamic per token and per group of 128 channels (the weight groups, so
  the bit-plane GEMM's group-wise scales line up), symmetric; ``abits`` (6) everywhere
  except the chosen layers, which keep 8 bits. Attention matmuls and KV cache stay float.
* Sensitivity (the paper's metric is not public; these are ours, SPEC *open*), with every
  layer at W6A8 and one layer at a time dropped to A6:
  ``sensitivity="block"`` (default): the relative error that the drop adds to the output
  of the layer's decoder block, on the all-A8 model's block inputs; one pass through the
  model in total plus one block forward per linear, so it is cheap.
  ``sensitivity="kl"``: the increase of the whole model's mean KL divergence to the float
  model; one model pass per linear (210 on SmolLM2-135M: hours on a 2-core CPU), the
  end-to-end measure.
  The ``a8_layers`` most sensitive layers (default: as many as there are decoder blocks,
  ~1/7 of the linears of a Llama model) keep A8. The ranking is printed and kept in the
  checkpoint. With a budget of 0, or of every layer, nothing is ranked.
* The official code's rule instead (``a8="down_proj"``, a regex of layer names): every
  matching layer keeps A8, nothing is ranked (FlyFoxPlayer/FlexQ ``--flex_linear_quant``:
  every down_proj, 32 of 224 linears on LLaMA-7B).
* ``W6A16`` (``abits=16``): the weights alone, to separate W6's cost from A6's.

Both on ``sensitivity_samples`` (4) calibration windows of 512 tokens.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..config import QuantConfig
from ..models import Adapter
from ..nn import QuantLinear
from ..progress import bar
from .base import Method, MethodResult, quantize_layers_data_free
from .options import Options, opt
from .sequential import block_forward, capture_inputs

# tokens per window used for the ranking (bounds the float reference's log-probabilities in memory)
SENSITIVITY_SEQLEN = 512


@torch.no_grad()
def _logprobs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    return [F.log_softmax(model(windows[i: i + 1], use_cache=False).logits[0].float(), -1) for i in range(len(windows))]


@torch.no_grad()
def mean_kl(model, windows: torch.Tensor, ref: list[torch.Tensor]) -> float:
    """Mean per-token KL(P_ref ‖ P_model) over ``windows``."""
    total, count = 0.0, 0
    for i in range(len(windows)):
        lp = F.log_softmax(model(windows[i: i + 1], use_cache=False).logits[0].float(), -1)
        total += (ref[i].exp() * (ref[i] - lp)).sum().item()
        count += lp.shape[0]
    return total / count


@torch.no_grad()
def block_sensitivity(model, adapter: Adapter, layers: dict, windows: torch.Tensor, low: dict, high_act: dict,
                      progress: bool) -> dict[str, float]:
    """Per linear: ‖Y_b(that layer at A_low) − Y_b(all A_high)‖² / ‖Y_b(all A_high)‖² for its block b,
    block by block along the all-A_high model (every layer is at ``high_act`` on entry)."""
    inputs = capture_inputs(model, adapter, windows, None)
    hidden = inputs.hidden
    scores: dict[str, float] = {}
    blocks = adapter.get_blocks(model)
    it = bar(range(len(blocks)), desc="flexq-sensitivity", enabled=progress, unit="block")
    for i in it:
        ref = block_forward(blocks[i], hidden, inputs.kwargs)
        denom = ref.pow(2).sum().item() + 1e-30
        prefix = f"{adapter.blocks}.{i}."
        for n in [n for n in layers if n.startswith(prefix)]:
            layers[n].act = low[n]
            scores[n] = (block_forward(blocks[i], hidden, inputs.kwargs) - ref).pow(2).sum().item() / denom
            layers[n].act = high_act[n]
        hidden = ref
    return scores


def _is_regex(v: str) -> bool:
    try:
        re.compile(v)
    except re.error:
        return False
    return True


@dataclass(frozen=True)
class FlexQOptions(Options):
    a8_layers: int | None = opt(None, "how many of the most sensitive layers keep 8-bit activations "
                                "(default: one per block)", check=lambda v: v >= 0, must=">= 0",
                                flag="--a8-layers")
    a8: str | None = opt(None, "keep 8-bit activations in the layers matching this regex (the official "
                         "rule: down_proj) instead of the sensitivity ranking", check=_is_regex,
                         must="a regex of layer names (e.g. down_proj)", flag="--a8")
    sensitivity_samples: int = opt(4, "calibration windows for the sensitivity ranking", check=lambda v: v >= 1,
                                   must=">= 1", flag="--sensitivity-samples")
    sensitivity: str = opt("block", "rank layers by the error added to their block's output, or by whole-model KL",
                           choices=("block", "kl"), flag="--sensitivity")
    high_abits: int = opt(8, "the activation bits the chosen layers keep", check=lambda v: 2 <= v <= 8,
                          must="between 2 and 8")


class FlexQ(Method):
    name = "flexq"
    needs_calibration = True  # the sensitivity ranking only
    supports_act = True
    options_cls = FlexQOptions

    def uses_calibration(self, config) -> bool:
        o = self.options(config)  # the official a8 rule, W6A8 or no A8 layer need no ranking
        return o.a8 is None and config.abits < o.high_abits and o.a8_layers != 0

    def prepare(self, config: QuantConfig) -> QuantConfig:
        """FlexQ's fixed conventions: symmetric weights and activations, activation groups = weight groups."""
        return replace(config, sym=True, act_sym=True, act_group_size=config.group_size)

    def validate(self, config: QuantConfig) -> None:
        super().validate(self.prepare(config))

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration, progress=True, run_dir=None,
            run_key: str = "") -> MethodResult:
        config = self.prepare(config)
        o = self.options(config)
        high, nwin, metric = o.high_abits, o.sensitivity_samples, o.sensitivity
        windows = calibration[:nwin, :SENSITIVITY_SEQLEN] if calibration is not None else None
        ranked = o.a8 is None and config.abits < high
        ref = _logprobs(model, windows) if metric == "kl" and ranked else None  # the float model's
        result = quantize_layers_data_free(self, model, adapter, config,
                                           lambda lin, spec: QuantLinear.from_linear(lin, spec), "flexq-w", progress)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
        budget = o.a8_layers if o.a8_layers is not None else len(adapter.get_blocks(model))
        low = {n: m.act for n, m in layers.items()}
        high_act = {n: replace(a, bits=high) for n, a in low.items()}
        if o.a8 is not None and config.abits < high:  # the official rule: a fixed set of layers
            rule = re.compile(o.a8)
            keep = [n for n in layers if rule.search(n)]
            for n, m in layers.items():
                m.act = high_act[n] if n in keep else low[n]
            result.extra["sensitivity"] = {"metric": f"none: layers matching {rule.pattern!r} keep A{high}",
                                           "a8_layers": keep}
            return result
        for n, m in layers.items():
            m.act = high_act[n]
        if budget == 0 or budget >= len(layers) or config.abits >= high:
            for n, m in layers.items():  # nothing to choose: every layer at A{abits}, or every layer at A{high}
                m.act = high_act[n] if budget >= len(layers) else low[n]
            return result
        if metric == "kl":
            base = mean_kl(model, windows, ref)
            scores = {}
            it = bar(list(layers), desc="flexq-sensitivity", enabled=progress, unit="layer")
            for n in it:
                layers[n].act = low[n]
                scores[n] = mean_kl(model, windows, ref) - base
                layers[n].act = high_act[n]
                it.set_postfix(layer=n.split(".", 2)[-1], dkl=f"{scores[n]:.2e}", refresh=False)
            what = f"increase of mean KL to the float model when only this layer drops from A{high} to A{config.abits}"
        else:
            base = None  # no whole-model KL is measured (and config.json must stay strict JSON: no NaN)
            scores = block_sensitivity(model, adapter, layers, windows, low, high_act, progress)
            what = (f"relative error added to its decoder block's output when only this layer drops from A{high} to "
                    f"A{config.abits} (all others A{high}, inputs from the all-A{high} model)")
        ranking = sorted(scores, key=scores.get, reverse=True)
        keep = set(ranking[:budget])
        for n, m in layers.items():
            m.act = high_act[n] if n in keep else low[n]
        result.extra["sensitivity"] = {
            "metric": f"{what}; {windows.shape[0]} x {windows.shape[1]} calibration tokens",
            "a8_layers": ranking[:budget], "scores": {n: scores[n] for n in ranking}}
        if base is not None:
            result.extra["sensitivity"]["base_kl"] = base
        if progress:
            print(f"flexq: A{high} kept in {budget} of {len(layers)} layers ({metric} sensitivity); "
                  "most sensitive first:", file=sys.stderr)
            for n in ranking[: max(budget, 10)]:
                print(f"  {n:40s} {scores[n]:.3e}{'  A' + str(high) if n in keep else ''}", file=sys.stderr)
        return result
