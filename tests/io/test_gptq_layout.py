"""The GPTQ export, read back with an independent unpacking written from the layout's
documentation (numpy bit arrays, not anybit's packing code), compared bit for bit."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import anybit
from anybit.cli import main
from anybit.nn import QuantLinear

from conftest import tiny_model


def unpack_gptq_bits(words: np.ndarray, bits: int, axis_len: int) -> np.ndarray:
    """int32 words packed along axis 0 (a little-endian bit stream per column) -> values [axis_len, cols].

    Documented GPTQ layout: value j uses stream bits j*b..j*b+b-1; stream bit i is bit i%32 of word i//32.
    """
    u = words.astype("<i4").view("<u4")
    cols = u.shape[1]
    # bit stream per column: words in order, bits LSB first
    bits_arr = np.unpackbits(u.T.copy().view(np.uint8).reshape(cols, -1), axis=1, bitorder="little")
    vals = bits_arr[:, : axis_len * bits].reshape(cols, axis_len, bits)
    weights = (1 << np.arange(bits)).astype(np.int64)
    return (vals.astype(np.int64) * weights).sum(-1).T  # [axis_len, cols]


def read_gptq_layer(st: dict, name: str, bits: int, k: int, n: int, v2: bool = False) -> np.ndarray:
    q = unpack_gptq_bits(st[f"{name}.qweight"], bits, k)  # [K, N]
    # v1 stores zero-1, GPTQModel's v2 the zero point itself
    z = unpack_gptq_bits(st[f"{name}.qzeros"].T.copy(), bits, n).T + (0 if v2 else 1)  # [G, N]
    s = st[f"{name}.scales"].astype(np.float32)  # [G, N]
    g_idx = st[f"{name}.g_idx"]
    w = s[g_idx] * (q.astype(np.float32) - z[g_idx].astype(np.float32))
    return w.T  # [N, K]


@pytest.mark.parametrize("bits,group,sym,fmt", [(4, 32, False, "gptq"), (3, 32, True, "auto"), (2, 64, False, "auto"),
                                             (8, -1, True, "gptq_v2"), (3, 128, False, "gptq"), (4, 32, False, "auto")])
def test_export_matches_bit_for_bit(tmp_path, capsys, bits, group, sym, fmt):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    if fmt == "gptq" and not sym:
        with torch.no_grad():  # no all-positive groups: GPTQ v1 cannot store zero point 0
            for p in model.parameters():
                p[(p.abs() < 1e-3)] = 1e-3
    anybit.quantize(model, anybit.QuantConfig(wbits=bits, group_size=group, sym=sym), progress=False)
    src = anybit.save(model, None, tmp_path / "q")
    assert main(["export", str(src), "--format", "gptq", "--out", str(tmp_path / "g"), "--checkpoint-format", fmt]) == 0
    st = load_file(str(tmp_path / "g" / "model.safetensors"))
    qcfg = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert qcfg["bits"] == bits and qcfg["group_size"] == group and qcfg["sym"] == sym
    v2 = qcfg["checkpoint_format"] == "gptq_v2"
    assert v2 == (fmt == "gptq_v2" or (fmt == "auto" and not sym))
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == qcfg["checkpoint_format"]
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n, k = m.out_features, m.in_features
            assert st[f"{name}.qweight"].shape == (k * bits // 32, n) and st[f"{name}.qweight"].dtype == np.int32
            g = k if group == -1 else group
            assert st[f"{name}.qzeros"].shape == (-(-k // g), n * bits // 32)
            assert st[f"{name}.scales"].dtype == np.float16
            theirs = read_gptq_layer(st, name, bits, k, n, v2)
            ours = m.dequantize_weight().numpy()
            assert np.array_equal(theirs, ours), name


def test_export_refuses_what_gptq_cannot_hold(tmp_path, capsys):
    model = tiny_model("llama")  # FFN 172: not divisible by 32
    anybit.quantize(model, anybit.QuantConfig(wbits=4, group_size=32), progress=False)
    src = anybit.save(model, None, tmp_path / "q")
    assert main(["export", str(src), "--out", str(tmp_path / "g")]) == 2
    assert "divisible by 32" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_v1_refuses_zero_point_zero_and_v2_holds_it(tmp_path, capsys):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    with torch.no_grad():  # one all-positive group -> asymmetric zero point 0
        model.model.layers[0].mlp.up_proj.weight[:, :32] = model.model.layers[0].mlp.up_proj.weight[:, :32].abs() + 0.01
    anybit.quantize(model, anybit.QuantConfig(wbits=4, group_size=32, sym=False), progress=False)
    src = anybit.save(model, None, tmp_path / "q")
    assert main(["export", str(src), "--out", str(tmp_path / "g1"), "--checkpoint-format", "gptq"]) == 2
    err = capsys.readouterr().err
    assert "zero point 0" in err and "gptq_v2" in err and err.count("\n") == 1
    assert not (tmp_path / "g1").exists()
    assert main(["export", str(src), "--out", str(tmp_path / "g2")]) == 0
    st = load_file(str(tmp_path / "g2" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    m = dict(model.named_modules())[name]
    assert np.array_equal(read_gptq_layer(st, name, 4, m.in_features, m.out_features, v2=True),
                          m.dequantize_weight().numpy())
