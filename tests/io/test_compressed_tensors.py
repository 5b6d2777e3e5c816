"""compressed-tensors export: the layout is as documented, and (where the library is
installed: the [export] extra) its own decompressor gives anybit's weights bit for bit."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from anybit.cli import main
from anybit.io.compressed_tensors import pack_stream

from conftest import needs_stories

has_ct = importlib.util.find_spec("compressed_tensors") is not None


def test_pack_stream_is_a_little_endian_bit_stream():
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0] * 4 + [7]])  # 33 values of 3 bits: 4 words
    words = pack_stream(v, 3)
    assert words.shape == (1, 4) and words.dtype == torch.int32
    stream = sum(int(w) % 2**32 << (32 * i) for i, w in enumerate(words[0]))
    assert [(stream >> (3 * j)) & 7 for j in range(33)] == v[0].tolist()


@needs_stories
@pytest.mark.parametrize("sym", [True, False])
def test_stories_export_and_decompression(tmp_path, capsys, sym):
    q, out = tmp_path / "q", tmp_path / "ct"
    args = ["quantize", "stories260k", "--wbits", "4", "--group-size", "32", "--skip", "down_proj",
            "--lm-head-bits", "8", "--out", str(q), "--quiet"] + (["--sym"] if sym else [])
    assert main(args) == 0
    assert main(["export", str(q), "--format", "compressed-tensors", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    w = next(iter(cfg["config_groups"].values()))["weights"]
    assert w["num_bits"] == 4 and w["symmetric"] == sym and w["group_size"] == 32
    assert "lm_head" in cfg["ignore"] and any("down_proj" in x for x in cfg["ignore"])  # ragged head, skipped layer
    st = load_file(str(out / "model.safetensors"))
    p = "model.layers.1.self_attn.q_proj"
    assert st[p + ".weight_packed"].dtype == torch.int32 and st[p + ".weight_packed"].shape == (64, 8)
    assert (p + ".weight_zero_point" in st) == (not sym)
    assert main(["export", str(q), "--format", "compressed-tensors", "--out", str(out)]) == 2  # exists
    if not has_ct:
        pytest.skip("compressed-tensors not installed (pip install -e '.[export]'): decompression not checked")
    import anybit
    from anybit.nn import QuantLinear
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**w))
    model, _ = anybit.load(q)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and name != "lm_head":
            local = {k[len(name) + 1:]: v for k, v in st.items() if k.startswith(name + ".")}
            got = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(got.float(), mod.dequantize_weight()), name
            n += 1
    assert n == 30  # 5 blocks x 6 quantized linears (down_proj skipped)


@needs_stories
def test_w8a8_export(tmp_path):
    q, out = tmp_path / "q", tmp_path / "ct"
    assert main(["quantize", "stories260k", "--wbits", "8", "--abits", "8", "--group-size", "-1", "--sym", "--act-sym",
                 "--skip", "down_proj", "--out", str(q), "--quiet"]) == 0
    assert main(["export", str(q), "--format", "compressed-tensors", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    g = next(iter(cfg["config_groups"].values()))
    assert cfg["format"] == "int-quantized" and g["input_activations"]["strategy"] == "token"
    assert g["input_activations"]["dynamic"] and g["weights"]["strategy"] == "channel"
    st = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.up_proj"
    assert st[p + ".weight"].dtype == torch.int8 and st[p + ".weight_scale"].shape == (172, 1)
    q2 = tmp_path / "q2"
    assert main(["quantize", "stories260k", "--wbits", "8", "--abits", "8", "--group-size", "-1", "--sym",
                 "--skip", "down_proj", "--out", str(q2), "--quiet"]) == 0  # asymmetric activations
    assert main(["export", str(q2), "--format", "compressed-tensors", "--out", str(tmp_path / "ct2")]) == 2
    if not has_ct:
        pytest.skip("compressed-tensors not installed (pip install -e '.[export]'): decompression not checked")
    import anybit
    from anybit.nn import QuantLinear
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**g["weights"]),
                                input_activations=QuantizationArgs(**g["input_activations"]))
    model, _ = anybit.load(q)
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            local = {k[len(name) + 1:]: v for k, v in st.items() if k.startswith(name + ".")}
            got = IntQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(got.float(), mod.dequantize_weight()), name
            n += 1
    assert n == 30
