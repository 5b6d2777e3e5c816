import json
import math

import pytest
import torch

import anybit
from anybit.errors import AnybitError
from anybit.io.checkpoint import WEIGHTS

from conftest import needs_stories, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_save_load_logits_equal(tmp_path, family):
    model = tiny_model(family)
    anybit.quantize(model, anybit.QuantConfig(wbits=3, group_size=32), progress=False)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    out = anybit.save(model, None, tmp_path / "q")
    loaded, tok = anybit.load(out)
    assert tok is None  # saved without a tokenizer
    assert torch.equal(_logits(loaded, ids), before)


@needs_stories
@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 128, True), (2, -1, False)])
def test_stories_round_trip_logits_equal(tmp_path, fresh_stories, bits, group, sym):
    model, tok = fresh_stories.model, fresh_stories.tokenizer
    anybit.quantize(model, anybit.QuantConfig(wbits=bits, group_size=group, sym=sym), progress=False)
    ids = tok("Once upon a time there was a dog.", return_tensors="pt").input_ids
    before = _logits(model, ids)
    out = anybit.save(model, tok, tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left
    loaded, tok2 = anybit.load(out)
    assert torch.equal(_logits(loaded, ids), before)
    assert tok2("hi").input_ids == tok("hi").input_ids
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "anybit" and qc["bits"] == bits and qc["group_size"] == group and qc["sym"] == sym
    assert len(qc["layers"]) == 5 * 7


def test_file_size_reflects_packed_bits(tmp_path):
    """3-bit g128 linear weights take about (3 + 19/128)/32 of their fp32 size on disk."""
    model = tiny_model("llama", hidden_size=256, intermediate_size=512)
    linear_fp32 = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and "layers" in n)
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if not ("layers" in n and "proj" in n))
    anybit.quantize(model, anybit.QuantConfig(wbits=3, group_size=128), progress=False)
    out = anybit.save(model, None, tmp_path / "q")
    packed = (out / WEIGHTS).stat().st_size - other
    ratio = packed / linear_fp32
    assert math.isclose(ratio, (3 + 19 / 128) / 32, rel_tol=0.03), ratio
    info = anybit.inspect(out)
    # zero points round up to whole bytes per row, hence a little over 3 + 19/128
    assert 3 + 19 / 128 <= info["bits_per_weight"] < 3 + 19 / 128 + 0.01


def test_existing_output_refused_and_overwrite(tmp_path):
    model = tiny_model("llama")
    anybit.quantize(model, anybit.QuantConfig(wbits=4, group_size=32), progress=False)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep").write_text("x")
    with pytest.raises(AnybitError, match="already exists"):
        anybit.save(model, None, tmp_path / "q")
    assert (tmp_path / "q" / "keep").exists()
    anybit.save(model, None, tmp_path / "q", overwrite=True)
    assert not (tmp_path / "q" / "keep").exists() and (tmp_path / "q" / WEIGHTS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@needs_stories
def test_corrupt_checkpoints_are_clear_errors(tmp_path, fresh_stories):
    model, tok = fresh_stories.model, fresh_stories.tokenizer
    anybit.quantize(model, anybit.QuantConfig(wbits=4, group_size=32), progress=False)
    out = anybit.save(model, tok, tmp_path / "q")
    data = (out / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(AnybitError, match="corrupt"):
        anybit.load(out)
    (out / WEIGHTS).unlink()
    with pytest.raises(AnybitError, match="missing"):
        anybit.load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(AnybitError, match="corrupt"):
        anybit.load(out)
    with pytest.raises(AnybitError, match="does not exist"):
        anybit.load(tmp_path / "nothing")


def test_quantize_is_deterministic():
    a, b = tiny_model("llama"), tiny_model("llama")
    cfg = anybit.QuantConfig(wbits=3, group_size=32, options={"clip_search": True})
    anybit.quantize(a, cfg, progress=False)
    anybit.quantize(b, cfg, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_weights_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(AnybitError, match="NaN"):
        anybit.quantize(model, anybit.QuantConfig(), progress=False)


@needs_stories
def test_quantized_lm_head_is_untied_and_round_trips(tmp_path, fresh_stories):
    import anybit
    from anybit.nn import QuantLinear

    model, tok = fresh_stories.model, fresh_stories.tokenizer
    emb = model.get_input_embeddings().weight.detach().clone()
    anybit.quantize(model, anybit.QuantConfig(wbits=4, group_size=32, lm_head_bits=8), progress=False)
    assert isinstance(model.lm_head, QuantLinear) and "lm_head" in model.anybit_info["layers"]
    assert torch.equal(model.get_input_embeddings().weight, emb)  # the lookup keeps the float table
    ids = torch.arange(20)[None]
    with torch.no_grad():
        before = model(ids).logits
    anybit.save(model, tok, tmp_path / "q")
    loaded, _ = anybit.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


@needs_stories
@pytest.mark.parametrize("extra", [[], ["--lm-head-bits", "8"], ["--abits", "8", "--method", "rtn"]])
def test_transformers_from_pretrained_loads_anybit_folders(tmp_path, extra):
    """After `import anybit`, AutoModelForCausalLM.from_pretrained(folder) is anybit.load's model."""
    from transformers import AutoModelForCausalLM

    import anybit
    from anybit.cli import main
    from anybit.nn import QuantLinear

    out = tmp_path / "q"
    assert main(["quantize", "stories260k", "--wbits", "4", "--group-size", "32", *extra, "--out", str(out),
                 "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    ref, tok = anybit.load(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert isinstance(model.model.layers[2].mlp.down_proj, QuantLinear)
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
