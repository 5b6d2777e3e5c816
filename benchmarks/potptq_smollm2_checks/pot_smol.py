"""PoT W3 g128 (step 1) vs RTN INT3 g128 relative weight error, per linear of SmolLM2-135M."""
import torch, anybit
from anybit.formats import FormatSpec, get_format, pot
torch.set_num_threads(1)
lm = anybit.load_model("smollm2-135m")
m = lm.model
fp = get_format("pot"); fi = get_format("int")
worst = []
for name, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear) and "layers." in name:
        w = mod.weight.data.float()
        sp = FormatSpec("pot", 3, 128, False)
        pk = fp.quantize(w, sp, scales=pot.init_scales(w, sp))
        wq = fp.dequantize(pk, sp, tuple(w.shape)).float()
        si = FormatSpec("int", 3, 128, False)
        wi = fi.dequantize(fi.quantize(w, si), si, tuple(w.shape)).float()
        e_p = ((wq - w).norm() / w.norm()).item(); e_i = ((wi - w).norm() / w.norm()).item()
        worst.append((e_p, e_i, name, torch.isfinite(wq).all().item(), wq.abs().max().item(), w.abs().max().item()))
worst.sort(reverse=True)
for r in worst[:8]: print(r)
print("median pot", sorted(x[0] for x in worst)[len(worst)//2], "median int", sorted(x[1] for x in worst)[len(worst)//2])
