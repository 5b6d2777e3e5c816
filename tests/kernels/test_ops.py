"""torch.ops.anybit.qlinear: the quantized linear as a traceable PyTorch operator."""

import copy

import torch

import anybit
from anybit.formats import ActSpec, FormatSpec
from anybit.nn import QuantLinear

from conftest import needs_stories


def test_operator_contract_and_handles():
    torch.manual_seed(0)
    for spec, act in [(FormatSpec("int", 4, 32), None), (FormatSpec("bcq", 3, 32), None),
                      (FormatSpec("bitplane", 4, 32), ActSpec(8, -1, False))]:
        q = QuantLinear.from_linear(torch.nn.Linear(64, 37), spec, act=act)
        x = torch.randn(3, 64)
        # schema, fake (meta) implementation and autograd registration checked by torch itself
        torch.library.opcheck(torch.ops.anybit.qlinear.default, (x, q._anybit_handle, 37))
        assert torch.equal(torch.ops.anybit.qlinear(x, q._anybit_handle, 37), q(x))
        c = copy.deepcopy(q)  # a copy answers to its own handle, not its original's
        assert c._anybit_handle != q._anybit_handle
        c.bias.data += 1
        torch.testing.assert_close(torch.ops.anybit.qlinear(x, c._anybit_handle, 37), q(x) + 1, rtol=1e-5, atol=1e-5)


@needs_stories
def test_a_quantized_model_traces_whole(tmp_path):
    """fullgraph=True: no graph break at any quantized layer; same logits as eager."""
    model = anybit.load_model("stories260k").model
    anybit.quantize(model, anybit.QuantConfig(method="rtn", wbits=4, group_size=32), progress=False)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
