"""Perplexity (3 WikiText-2 windows of 512 tokens): PoT W3 step 1, RTN W3, FP."""
import torch, anybit, sys
from anybit.data import eval_windows, load_text
from anybit.eval import perplexity
torch.set_num_threads(1)
lm0 = anybit.load_model("smollm2-135m")
text = load_text("wikitext2", "test")
win = eval_windows(lm0.tokenizer, text, 512, 3)
for opts, method in (({"steps": "init", "zero_level": False}, "potptq"), ({}, "rtn")):
    lm = anybit.load_model("smollm2-135m")
    anybit.quantize(lm.model, anybit.QuantConfig(method=method, wbits=3, group_size=128, options=opts), torch.randint(0, 1000, (1, 16)), progress=False)
    print(method, opts, perplexity(lm.model, win, dataset="w", progress=False).ppl, flush=True)
print("fp", perplexity(lm0.model, win, dataset="w", progress=False).ppl)
