"""Export an anybit folder to compressed-tensors and decompress every layer with the
compressed-tensors library itself (the [export] extra); prints how many layers are not
bit-exact (docs/export.md).

    python benchmarks/ct_check.py DIR OUT
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file


def main(src: str, out: str) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    import anybit
    from anybit.io.compressed_tensors import export_compressed_tensors
    from anybit.nn import QuantLinear

    export_compressed_tensors(src, out, overwrite=True)
    model, _ = anybit.load(src)
    st = load_file(f"{out}/model.safetensors")
    groups = json.load(open(f"{out}/config.json"))["quantization_config"]["config_groups"].values()
    schemes = [(g["targets"], QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**g["weights"])))
               for g in groups]
    total = bad = 0
    for name, mod in model.named_modules():
        scheme = next((s for t, s in schemes if f"re:^{name}$" in t), None)
        if not isinstance(mod, QuantLinear) or scheme is None:
            continue
        local = {k[len(name) + 1:]: v for k, v in st.items() if k.startswith(name + ".")}
        w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        total += 1
        bad += not torch.equal(w.float(), mod.dequantize_weight())
    print(json.dumps({"model": src, "layers": total, "not_bit_exact": bad}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
