"""PoT W3 step 1 with the beta grid restricted to >= 0.5 / >= 0.25 (3 windows of 512 tokens)."""
import torch, anybit, sys
from anybit.data import eval_windows, load_text
from anybit.eval import perplexity
from anybit.formats import pot
torch.set_num_threads(1)
lm0 = anybit.load_model("smollm2-135m")
text = load_text("wikitext2", "test")
win = eval_windows(lm0.tokenizer, text, 512, 3)
d = pot.init_scales.__defaults__
print(d[:-1])
for lo in (0.5, 0.25):
    pot.init_scales.__defaults__ = (*d[:-1], tuple(0.01 * i for i in range(int(lo * 100), 201)))
    lm = anybit.load_model("smollm2-135m")
    anybit.quantize(lm.model, anybit.QuantConfig(method="potptq", wbits=3, group_size=128, options={"steps": "init", "zero_level": False}), torch.randint(0, 1000, (1, 16)), progress=False)
    print("beta>=", lo, perplexity(lm.model, win, dataset="w", progress=False).ppl, flush=True)
