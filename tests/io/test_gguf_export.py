"""GGUF export: each ggml block layout decodes (by the gguf package's own dequantizer) to
anybit's weights; exported models hold exactly anybit's weights; what cannot be written
exactly is refused in one line; llama.cpp itself runs the file (where the [bench] extra is
installed) with logits that agree with anybit's."""

import numpy as np
import pytest
import torch

from anybit.cli import main
from anybit.errors import AnybitError
from anybit.formats import FormatSpec, get_format
from anybit.io.gguf_export import GGML_TYPES, _permute_rows, ggml_type, pack_blocks, plan, refusal
from anybit.peers import llama_cpp

from conftest import needs_stories, tiny_model


@pytest.mark.parametrize("kind,rule", [(k, "absmax") for k in GGML_TYPES] + [("Q4_0", "signed"), ("Q8_0", "signed")])
def test_blocks_decode_to_anybits_weights(kind, rule):
    import gguf.quants

    bits, sym = GGML_TYPES[kind]
    spec = FormatSpec("int", bits, 32, sym)
    torch.manual_seed(0)
    w = torch.randn(7, 96) * torch.rand(7, 1) * 3  # odd rows, 3 groups of various ranges
    fmt = get_format("int")
    packed = fmt.quantize(w, spec, sym_rule=rule)  # signed: negative scales, as ggml writes them
    want = fmt.dequantize(packed, spec, w.shape)
    codes, scales, zeros = fmt.unpack(packed, spec, w.shape)
    blocks, change = pack_blocks(codes, scales, zeros, kind)
    got = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind))
    assert got.shape == (7, 96)
    diff = np.abs(got - want.numpy()).max()
    if sym:
        assert change == 0 and diff == 0  # bit-exact
    else:
        assert diff <= change + 1e-6 and change <= 2 ** -10 * float((scales.float() * zeros).abs().max())


def test_which_grids_have_a_ggml_type():
    assert ggml_type(FormatSpec("int", 4, 32, True)) == "Q4_0"
    assert ggml_type(FormatSpec("int", 4, 32, False)) == "Q4_1"
    assert ggml_type(FormatSpec("int", 8, 32, True)) == "Q8_0"
    for spec in (FormatSpec("int", 4, 128, True), FormatSpec("int", 3, 32, True), FormatSpec("int", 8, 32, False),
                 FormatSpec("pot", 3, 32, False), FormatSpec("int", 3, 32, False, levels=5)):
        assert ggml_type(spec) is None
    msg = refusal(FormatSpec("int", 4, 128, True), "layer")
    assert "--group-size 32 --sym (Q4_0)" in msg and "\n" not in msg
    assert "Q8_0 with --sym" in refusal(FormatSpec("int", 3, 128, False), "layer")


def test_rotary_row_permutation_is_llama_cpps():
    # HF rotate-half order [x0..x3 | x4..x7] per head -> interleaved [x0 x4 x1 x5 ...]
    assert _permute_rows(1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert sorted(_permute_rows(3, 12).tolist()) == list(range(12))


def test_refusals_are_one_line(tmp_path):
    from anybit.config import QuantConfig
    from anybit.pipeline import quantize

    m = tiny_model("llama", hidden_size=64, intermediate_size=128)
    quantize(m, QuantConfig(method="rtn", wbits=4, group_size=64))
    with pytest.raises(AnybitError, match="no ggml type stores exactly; re-quantize with --group-size 32"):
        plan(m)
    m = tiny_model("llama", hidden_size=64, intermediate_size=172)
    quantize(m, QuantConfig(method="rtn", wbits=4, group_size=32, sym=True))
    with pytest.raises(AnybitError, match="172 inputs, not a multiple of 32"):
        plan(m)


@needs_stories
def test_stories_export_holds_anybits_weights(tmp_path, capsys):
    import gguf

    from anybit.io import checkpoint

    q, out = tmp_path / "q", tmp_path / "s.gguf"
    assert main(["quantize", "stories260k", "--wbits", "4", "--group-size", "32", "--sym", "--skip", "down_proj",
                 "--lm-head-bits", "8", "--out", str(q), "--quiet"]) == 0
    assert main(["export", str(q), "--format", "gguf", "--out", str(out)]) == 0
    assert "Q4_0" in capsys.readouterr().out
    assert main(["export", str(q), "--format", "gguf", "--out", str(out)]) == 2  # exists: not overwritten
    model, _ = checkpoint.load(q)
    cfg = model.config
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    layer = model.model.layers[1]
    for name, mod, heads in (("attn_q", layer.self_attn.q_proj, cfg.num_attention_heads),
                             ("attn_k", layer.self_attn.k_proj, cfg.num_key_value_heads),
                             ("ffn_up", layer.mlp.up_proj, None)):
        t = tensors[f"blk.1.{name}.weight"]
        assert t.tensor_type.name == "Q4_0"
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        want = mod.dequantize_weight()
        if heads:
            want = want[_permute_rows(heads, want.shape[0])]
        assert np.array_equal(got, want.numpy())
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "F32"  # skipped: float
    assert tensors["output.weight"].tensor_type.name == "F32"  # INT8 g128 head: its exact F32 values
    assert not (tmp_path / "s.gguf.tmp").exists()


@needs_stories
@pytest.mark.skipif(llama_cpp.unavailable() is not None, reason=str(llama_cpp.unavailable()))
def test_llama_cpp_runs_the_export_like_anybit(tmp_path):
    from anybit.io import checkpoint

    q, out = tmp_path / "q", tmp_path / "s.gguf"
    assert main(["quantize", "stories260k", "--wbits", "4", "--group-size", "32", "--sym", "--skip", "down_proj",
                 "--out", str(q), "--quiet"]) == 0
    assert main(["export", str(q), "--format", "gguf", "--out", str(out)]) == 0
    model, tok = checkpoint.load(q)
    ids = tok("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
              return_tensors="pt")["input_ids"]
    res = llama_cpp.agreement(model, out, ids)
    # llama.cpp rounds the activations to 8 bits (Q8_0) for its Q4_0 products; anything
    # wrong in the file (permutation, scales, tokenizer) gives KL ~1 and top-1 ~0
    assert res["kl"] < 1e-3 and res["top1_agreement"] > 0.95
