import pytest
import torch

from anybit.errors import AnybitError
from anybit.models import get_adapter, load_model, supported_model_types

from conftest import needs_stories, tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_adapter_finds_blocks_linears_and_norms(family):
    model = tiny_model(family)
    a = get_adapter(model)
    blocks = a.get_blocks(model)
    assert len(blocks) == 2
    linears = a.get_linears(blocks[0])
    assert len(linears) == 7 if family != "opt" else 6
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
