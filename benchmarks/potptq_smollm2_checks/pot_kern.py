"""Native PoT kernels vs F.linear with the dequantized weight, SmolLM2-135M PoT W3 (step 1), batches 1/5/16/17/300."""
import torch, anybit, os
from anybit.nn import QuantLinear
from anybit import kernels
torch.set_num_threads(1)
lm = anybit.load_model("smollm2-135m")
cfg = anybit.QuantConfig(method="potptq", wbits=3, group_size=128, options={"steps": "init", "zero_level": False})
anybit.quantize(lm.model, cfg, torch.randint(0, 1000, (1, 16)), progress=False)
qs = [(n, x) for n, x in lm.model.named_modules() if isinstance(x, QuantLinear)]
for n, q in qs[:7]:
    for M in (1, 5, 16, 17, 300):
        x = torch.randn(M, q.in_features)
        y = q(x)
        w = q.dequantize_weight() if hasattr(q, "dequantize_weight") else None
        ref = torch.nn.functional.linear(x, w.float(), q.bias) if w is not None else None
        print(n, M, ((y - ref).norm() / ref.norm()).item() if ref is not None else "no dequant")
