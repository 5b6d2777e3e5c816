import math

import torch
import torch.nn.functional as F

import anybit
from anybit.eval import perplexity

from conftest import STORIES_TEST, needs_stories, tiny_model


def test_ppl_is_gptq_definition():
    model = tiny_model("llama")
    windows = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, windows, progress=False)
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[None]).logits[0, :-1], w[1:]).item() for w in windows]
    assert math.isclose(res.ppl, math.exp(sum(losses) / 3), rel_tol=1e-5)
    assert res.tokens == 96 and res.windows == 3 and res.seqlen == 32


def test_kl_zero_against_itself_and_positive_after_quantization():
    model = tiny_model("llama")
    ref = tiny_model("llama")
    windows = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    assert abs(perplexity(model, windows, reference=ref, progress=False).kl) < 1e-6
    anybit.quantize(model, anybit.QuantConfig(wbits=2, group_size=16), progress=False)
    assert perplexity(model, windows, reference=ref, progress=False).kl > 1e-4


@needs_stories
def test_stories260k_rtn_w4_close_to_fp32(fresh_stories):
    """Real model, in-domain text: 4-bit g32 RTN costs little, 2-bit costs a lot."""
    model, tok = fresh_stories.model, fresh_stories.tokenizer
    fp = anybit.evaluate(model, tok, str(STORIES_TEST), seqlen=256, max_windows=40, progress=False)
    assert 3.0 < fp.ppl < 6.5
    anybit.quantize(model, anybit.QuantConfig(wbits=4, group_size=32), progress=False)
    w4 = anybit.evaluate(model, tok, str(STORIES_TEST), seqlen=256, max_windows=40, progress=False)
    assert fp.ppl < w4.ppl < fp.ppl * 1.2


@needs_stories
def test_generate_greedy_story(stories):
    model, tok = stories
    out = anybit.generate(model, tok, "Once upon a time", max_new_tokens=12)
    assert out.startswith("Once upon a time") and "Lily" in out
