import pytest
import torch

import anybit
from anybit.data import calibration_windows, load_text
from anybit.methods.smoothing import fold, pairs
from anybit.models import get_adapter
from anybit.nn import QuantLinear

from conftest import STORIES_TEST, STORIES_TRAIN, needs_stories, tiny_model


@pytest.mark.parametrize("model_type,kw", [("llama", {}), ("llama", {"num_key_value_heads": 1}), ("opt", {})])
def test_fold_keeps_the_function(model_type, kw):
    """Every pair (norm→linears, v→o with GQA, up→down) folded with random scales and,
    where the norm has a bias, shifts: same logits."""
    m = tiny_model(model_type, **kw)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
    adapter = get_adapter(m)
    g = torch.Generator().manual_seed(1)
    for block in adapter.get_blocks(m):
        for p in pairs(adapter, block, linear_pairs=True):
            prod = block.get_submodule(p.producer)
            n = prod.weight.shape[0]
            scale = torch.rand(n, generator=g) * 2 + 0.1
            shift = torch.randn(n, generator=g) if p.producer_is_norm and getattr(prod, "bias", None) is not None else None
            fold(block, p, scale, shift)
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, ref, atol=1e-4)


@needs_stories
def test_smoothquant_beats_rtn_at_w4a4_on_stories():
    def ppl(method):
        lm = anybit.load_model("stories260k")
        calib = calibration_windows(lm.tokenizer, load_text(str(STORIES_TRAIN), "train"), 8, 256)
        anybit.quantize(lm.model, anybit.QuantConfig(method, wbits=4, abits=4, group_size=32), calib, progress=False)
        layers = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == 35 and all(m.act.bits == 4 and m.spec.format == "bitplane" for m in layers)
        return anybit.evaluate(lm.model, lm.tokenizer, str(STORIES_TEST), seqlen=256, max_windows=24,
                               progress=False).ppl

    assert ppl("smoothquant") < ppl("rtn")
