import torch

import anybit
from anybit.nn import QuantLinear

from conftest import tiny_model


def test_flexq_conventions_ranking_and_budget():
    m = tiny_model("llama")
    cal = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    anybit.quantize(m, anybit.QuantConfig("flexq", wbits=6, abits=6, group_size=32, options={"a8_layers": 3}), cal,
                    progress=False)
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
