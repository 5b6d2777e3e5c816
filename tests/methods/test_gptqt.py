import torch

import anybit
from anybit.errors import AnybitError
from anybit.formats import FormatSpec, get_format
from anybit.methods.gptq import gptq_quantize, output_error
from anybit.methods.gptqt import to_bcq
from anybit.nn import QuantLinear

from conftest import tiny_model

from .test_gptq import _problem


def test_conversion_of_a_q_bit_grid_is_lossless():
    """An h-bit weight that only uses 2^q levels per group converts to q-bit BCQ exactly."""
    W, _, H = _problem()
    step1 = gptq_quantize(W, H, FormatSpec("int", 2, 32, False))  # a 2-bit grid, stored as is
    spec = FormatSpec("bcq", 2, 32)
    b, alpha, offset = to_bcq(step1.weight, spec, torch.diag(H))
    fmt = get_format("bcq")
    from anybit.formats.bcq import signs_of

    packed = fmt.pack(fmt.Parts(signs_of(b, tuple(W.shape)), alpha, offset), spec, tuple(W.shape))
    w = fmt.dequantize(packed, spec, tuple(W.shape))
    assert torch.allclose(w, step1.weight, atol=2e-3 * step1.weight.abs().max())


def test_gptqt_layer_error_not_worse_than_its_grid_center():
    """The scale re-exploration keeps the best candidate, so adding candidates never hurts."""
    W, X, H = _problem()
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W
    method = anybit.methods.get_method("gptqt")
    spec = FormatSpec("bcq", 2, 32)
    one = anybit.QuantConfig(method="gptqt", wbits=2, group_size=32, options={"scale_grid": [1.0]})
    many = anybit.QuantConfig(method="gptqt", wbits=2, group_size=32, options={"scale_grid": [0.8, 0.9, 1.0, 1.1]})
    q1, e1 = method.quantize_layer(lin, H, spec, one)
    q2, e2 = method.quantize_layer(lin, H, spec, many)
    assert isinstance(q2, QuantLinear) and q2.spec.format == "bcq"
    assert e2 <= e1
    assert abs(output_error(W, q2.dequantize_weight(), H) - e2) < 1e-6


def test_gptqt_end_to_end_tiny_and_validation():
    cal = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    anybit.quantize(model, anybit.QuantConfig(method="gptqt", wbits=2, group_size=32,
                                              options={"scale_grid": [0.9, 1.0]}), cal, progress=False)
    assert {v["format"] for v in model.anybit_info["layers"].values()} == {"bcq"}
    try:
        anybit.quantize(tiny_model("llama"), anybit.QuantConfig(method="gptqt", wbits=4,
                                                                options={"intermediate_bits": 4}), cal, progress=False)
    except AnybitError as e:
        assert "intermediate" in str(e)
    else:
        raise AssertionError("gptqt at 4 bits with a 4-bit intermediate must be refused")
    from anybit.methods.gptqt import default_intermediate_bits

    assert default_intermediate_bits(2) == 5 and default_intermediate_bits(3) == 6 and default_intermediate_bits(7) == 8


def test_scale_grid_option_forms():
    import pytest
    from anybit.errors import AnybitError
    from anybit.methods.gptqt import GPTQTOptions

    def grid(v):
        return GPTQTOptions.parse({"scale_grid": v}, "gptqt").scale_grid

    assert grid("0.9/0.95/1.0") == (0.9, 0.95, 1.0) == grid("0.9,0.95,1.0")
    assert grid([0.8, 1]) == (0.8, 1.0) and grid(1.0) == (1.0,)
    for bad in ("0.9/x", "", [0.0], {"a": 1}):
        with pytest.raises(AnybitError):
            grid(bad)
