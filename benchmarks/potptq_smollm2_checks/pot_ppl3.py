"""PoT W3 step 1 on parts of the model only (skip patterns), 2 windows of 512 tokens."""
import torch, anybit, sys
from anybit.data import eval_windows, load_text
from anybit.eval import perplexity
torch.set_num_threads(2)
lm0 = anybit.load_model("smollm2-135m")
text = load_text("wikitext2", "test")
win = eval_windows(lm0.tokenizer, text, 512, 2)
for skip in ([r"self_attn"], [r"mlp"], [r"^(?!model\.layers\.0\.)"], [r"^(?!model\.layers\.(1|2|3)\.)"]):
    lm = anybit.load_model("smollm2-135m")
    anybit.quantize(lm.model, anybit.QuantConfig(method="potptq", wbits=3, group_size=128, skip=skip, options={"steps": "init", "zero_level": False}), torch.randint(0, 1000, (1, 16)), progress=False)
    print("skip", skip, perplexity(lm.model, win, dataset="w", progress=False).ppl, flush=True)
