import json

import pytest
import torch

import anybit
from anybit.nn import QuantLinear

from conftest import tiny_model


@pytest.mark.parametrize("metric", ["block", "kl"])
def test_flexq_conventions_ranking_and_budget(metric):
    m = tiny_model("llama")
    cal = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    anybit.quantize(m, anybit.QuantConfig("flexq", wbits=6, abits=6, group_size=32,
                                          options={"a8_layers": 3, "sensitivity": metric}), cal, progress=False)
    layers = {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}
    assert all(x.spec.sym and x.spec.bits == 6 and x.spec.format == "bitplane" for x in layers.values())
    assert all(x.act.sym and x.act.group_size == 32 for x in layers.values())
    sens = m.anybit_info["sensitivity"]
    assert len(sens["a8_layers"]) == 3 and set(sens["scores"]) == set(layers)
    ranked = list(sens["scores"])
    assert [sens["scores"][n] for n in ranked] == sorted(sens["scores"].values(), reverse=True)
    assert {n for n, x in layers.items() if x.act.bits == 8} == set(sens["a8_layers"]) == set(ranked[:3])
    assert all(x.act.bits == 6 for n, x in layers.items() if n not in sens["a8_layers"])
    assert m.anybit_info["sym"] is True
    json.dumps(m.anybit_info, allow_nan=False)  # config.json stays strict JSON
    if metric == "block":  # dropping a layer to A6 always adds some error to its block (the KL may not grow)
        assert all(v > 0 for v in sens["scores"].values())


@pytest.mark.parametrize("abits,budget,expect", [(6, 0, 6), (8, 3, 8)])
def test_flexq_without_a_choice_skips_the_ranking(abits, budget, expect):
    m = tiny_model("llama")
    cal = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    anybit.quantize(m, anybit.QuantConfig("flexq", wbits=6, abits=abits, group_size=32, options={"a8_layers": budget}),
                    cal, progress=False)
    layers = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert {x.act.bits for x in layers} == {expect}
    assert "sensitivity" not in m.anybit_info


def test_flexq_block_sensitivity_matches_a_direct_block_error():
    from anybit.methods.flexq import block_sensitivity
    from anybit.models import get_adapter
    from anybit.methods.sequential import block_forward, capture_inputs
    from dataclasses import replace as dc_replace
    m = tiny_model("llama")
    cal = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    anybit.quantize(m, anybit.QuantConfig("rtn", wbits=6, abits=8, group_size=32), cal, progress=False)
    ad = get_adapter(m)
    layers = {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}
    high = {n: x.act for n, x in layers.items()}
    low = {n: dc_replace(a, bits=4) for n, a in high.items()}
    scores = block_sensitivity(m, ad, layers, cal, low, high, progress=False)
    name = f"{ad.blocks}.0.mlp.down_proj"
    inputs = capture_inputs(m, ad, cal, None)
    block = ad.get_blocks(m)[0]
    ref = block_forward(block, inputs.hidden, inputs.kwargs)
    layers[name].act = low[name]
    out = block_forward(block, inputs.hidden, inputs.kwargs)
    layers[name].act = high[name]
    assert scores[name] == pytest.approx(((out - ref) ** 2).sum().item() / (ref ** 2).sum().item(), rel=1e-5)
    assert all(x.act.bits == 8 for x in layers.values())  # restored


def test_flexq_official_rule_and_weight_only_row():
    cal = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    m = tiny_model("llama")
    anybit.quantize(m, anybit.QuantConfig("flexq", wbits=6, abits=6, group_size=32, options={"a8": "down_proj"}),
                    cal, progress=False)
    layers = {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}
    assert {n for n, x in layers.items() if x.act.bits == 8} == {n for n in layers if n.endswith("down_proj")}
    assert m.anybit_info["sensitivity"]["a8_layers"] == [n for n in layers if n.endswith("down_proj")]
    w = tiny_model("llama")
    anybit.quantize(w, anybit.QuantConfig("flexq", wbits=6, abits=16, group_size=32), cal, progress=False)
    wl = [x for x in w.modules() if isinstance(x, QuantLinear)]
    assert all(not x.act.enabled and x.spec.format == "int" and x.spec.sym and x.spec.bits == 6 for x in wl)
