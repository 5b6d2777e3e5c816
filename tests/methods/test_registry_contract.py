"""The contract every registered method keeps, looped over the method registry (a new method
must be added to SCHEMES here): same seed and data give the same bytes, the saved folder
loads back to the same logits, and the recorded config names the method and its layers.
(Resume after a crash: tests/methods/test_resume.py and tests/io's fault injection.)"""

import pytest
import torch

import anybit
from anybit.methods import METHODS
from anybit.nn import QuantLinear

from conftest import METHOD_SCHEMES, tiny_model

SCHEMES = METHOD_SCHEMES


def test_every_registered_method_is_covered():
    assert set(SCHEMES) == set(METHODS)


def _quantized(name: str):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = anybit.QuantConfig(method=name, seed=0, **SCHEMES[name])
    return anybit.quantize(model, cfg, calib if METHODS[name].needs_calibration else None, progress=False)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_method_contract(tmp_path, name):
    a, b = _quantized(name), _quantized(name)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "not deterministic"
    layers = [n for n, m in a.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14  # 2 blocks x 7 linears
    info = a.anybit_info
    assert info["method"] == name and set(info["layers"]) == set(layers)
    out = anybit.save(a, None, tmp_path / "q")
    loaded, _ = anybit.load(out)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, a(ids).logits, rtol=0, atol=0)
