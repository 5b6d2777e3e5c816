import pytest
import torch

from anybit.errors import AnybitError
from anybit.models import get_adapter, load_model, supported_model_types

from conftest import needs_stories, tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "opt"])
def test_adapter_finds_blocks_linears_and_norms(family):
    model = tiny_model(family)
    a = get_adapter(model)
    blocks = a.get_blocks(model)
    assert len(blocks) == 2
    linears = a.get_linears(blocks[0])
    assert len(linears) == (7 if family != "opt" else 6)
    assert all(isinstance(m, torch.nn.Linear) for m in linears.values())
    for norm, targets in a.norm_to.items():
        blocks[0].get_submodule(norm)
        assert set(targets) <= set(linears)
    model.get_submodule(a.lm_head)
    model.get_submodule(a.final_norm)


def test_unsupported_architecture_names_supported_ones():
    model = tiny_model("llama")
    model.config.model_type = "gpt2"
    with pytest.raises(AnybitError) as e:
        get_adapter(model)
    for t in ("llama", "opt", "qwen2", "mistral"):
        assert t in str(e.value)
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2", "opt"}


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(AnybitError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(AnybitError, match="not a .gguf"):
        load_model(str(tmp_path / "x.bin"))


def test_unsupported_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(AnybitError, match="unsupported architecture 'bert'"):
        load_model(str(tmp_path))


@needs_stories
def test_stories260k_loads(stories):
    model, tok = stories
    assert model.config.model_type == "llama" and model.config.intermediate_size == 172
    assert len(get_adapter(model).get_blocks(model)) == 5


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "opt"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_supported_type_quantizes_saves_loads_and_evaluates(tmp_path, family, method):
    """Issue 15 item 7: a tiny random model of each supported type through the whole pipeline."""
    import anybit
    from anybit.eval import perplexity
    from anybit.nn import QuantLinear

    model = tiny_model(family, hidden_size=64, intermediate_size=128)
    assert family in supported_model_types()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(1, 500, (4, 32), generator=g) if method == "gptq" else None
    anybit.quantize(model, anybit.QuantConfig(method=method, wbits=4, group_size=32), calib, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * (7 if family != "opt" else 6)
    out = anybit.save(model, None, tmp_path / "q")
    loaded, tok = anybit.load(out)
    assert tok is None
    ids = torch.randint(1, 500, (2, 24), generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    res = perplexity(loaded, ids, progress=False)
    assert res.tokens == 48 and 1 < res.ppl < 1e4
