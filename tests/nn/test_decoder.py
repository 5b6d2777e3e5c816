"""The lean decoder against the transformers model it runs: same logits in prefill, in
single-token decoding on its static cache, and in chunked prefill; the native one-call
step against the same decoder's PyTorch step (same int8 kernels, so nearly equal)."""

import pytest
import torch

from anybit import kernels
from anybit.config import QuantConfig
from anybit.nn.decoder import StaticDecoder, unsupported
from anybit.pipeline import quantize

from conftest import tiny_model

FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # biases on Q/K/V
    "qwen3": {"head_dim": 32},  # q/k norms, head_dim != hidden / heads
}


def _hf_logits(model, ids):
    """Logits of the whole sequence (prefill) and of each token decoded one at a time on
    the transformers cache."""
    with torch.inference_mode():
        full = model(ids).logits[0]
        out = model(ids[:, :8], use_cache=True)
        cache, steps = out.past_key_values, []
        for j in range(8, ids.shape[1]):
            out = model(ids[:, j:j + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, -1])
    return full, torch.stack(steps)


def _decoder_logits(model, ids, **kw):
    d = StaticDecoder(model, ids.shape[1] + 4, **kw)
    pre = d(ids[:, :8], all_logits=True)[0]
    steps = torch.stack([d(ids[:, j:j + 1])[0, -1] for j in range(8, ids.shape[1])])
    d.reset()
    d(ids[:, :5])
    chunk = d(ids[:, 5:], all_logits=True)[0]
    return pre, steps, chunk


@pytest.mark.parametrize("family", FAMILIES)
def test_float_decoder_matches_transformers(family):
    model = tiny_model(family, **FAMILIES[family])
    ids = torch.randint(1, 500, (1, 23), generator=torch.Generator().manual_seed(1))
    full, steps = _hf_logits(model, ids)
    pre, dec, chunk = _decoder_logits(model, ids)
    torch.testing.assert_close(pre, full[:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec, steps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunk, full[5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_float_native_step_matches_the_pytorch_step(family):
    """A float model decodes on the native step too (its linears: kind 4, float32 GEMV); the
    same logits as the PyTorch step but for the order of the float sums."""
    from anybit.kernels import native

    if not native.available():
        pytest.skip("the native extension is not built")
    model = tiny_model(family, **FAMILIES[family])
    ids = torch.randint(1, 500, (1, 15), generator=torch.Generator().manual_seed(4))
    fast, slow = StaticDecoder(model, 20), StaticDecoder(model, 20)
    assert fast.fast is not None
    slow.fast = None
    fast(ids[:, :6]), slow(ids[:, :6])
    for j in range(6, 15):
        torch.testing.assert_close(fast(ids[:, j:j + 1]), slow(ids[:, j:j + 1]), atol=1e-4, rtol=1e-4)
    with kernels.use("reference"):  # the reference backend keeps the PyTorch step
        assert StaticDecoder(model, 20).fast is None


def _close_up_to_int8_flips(a, b):
    """Equal but for the rare activation whose int8 rounding flips between two float paths
    (a flip moves the logits by ~1 % of their spread; a wrong step moves them by ~100 %)."""
    rel = (a - b).float().pow(2).mean().sqrt() / b.float().std()
    assert rel < 3e-2, f"relative RMS difference {rel:.3g}"


def _quantized(family, wbits=4, group=64, lm_head_bits=8):
    model = tiny_model(family, hidden_size=128, intermediate_size=256, **FAMILIES[family])
    quantize(model, QuantConfig(method="rtn", wbits=wbits, group_size=group, lm_head_bits=lm_head_bits))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("wbits", [4, 3])
def test_native_step_matches_the_pytorch_step(family, wbits):
    from anybit.kernels import native

    if not native.available() or not native._lib.anybit_has_q8():
        pytest.skip("the int8-activation kernels need AVX2 (portable instruction set in use)")
    model = _quantized(family, wbits)
    ids = torch.randint(1, 500, (1, 21), generator=torch.Generator().manual_seed(2))
    fast = StaticDecoder(model, 32)
    assert fast.fast is not None  # every layer on the one-call native step
    slow = StaticDecoder(model, 32)
    slow.fast = None  # same plans, PyTorch operators between them
    a, b = fast(ids[:, :9]), slow(ids[:, :9])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for j in range(9, 21):
        _close_up_to_int8_flips(fast(ids[:, j:j + 1]), slow(ids[:, j:j + 1]))
    # one step at a time from the same cache (a prompt takes the same path in both), so that
    # one step's int8 flip does not carry into the next through the cache: most steps agree
    # to float rounding
    exact = 0
    for j in range(9, 21):
        fast.reset(), slow.reset()
        fast(ids[:, :j]), slow(ids[:, :j])
        exact += bool(torch.allclose(fast(ids[:, j:j + 1]), slow(ids[:, j:j + 1]), atol=1e-5, rtol=1e-5))
    assert exact >= 6, f"{exact} of 12 steps agree"
    # and the transformers model decoding on its own cache (its linears: the same kernels
    # per module; the fused plans only concatenate rows)
    _, steps = _hf_logits(model, ids)
    fast.reset()
    fast(ids[:, :8])
    for j, want in zip(range(8, 21), steps):
        _close_up_to_int8_flips(fast(ids[:, j:j + 1])[0, -1], want)


def test_reference_backend_keeps_the_pytorch_path():
    model = _quantized("llama")
    with kernels.use("reference"):
        d = StaticDecoder(model, 16)
    assert d.fast is None and all(p is None for row in d.plans for p in row)
    ids = torch.randint(1, 500, (1, 12), generator=torch.Generator().manual_seed(3))
    with kernels.use("reference"):
        full, steps = _hf_logits(model, ids)
        pre, dec, _ = _decoder_logits(model, ids, plans=False)
    torch.testing.assert_close(pre, full[:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec, steps, atol=1e-4, rtol=1e-4)


def test_what_the_decoder_refuses():
    assert "opt" in unsupported(tiny_model("opt"), 16)
    assert "context" in unsupported(tiny_model("llama"), 1000)
    d = StaticDecoder(tiny_model("llama"), 8)
    d(torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="past"):
        d(torch.ones(1, 1, dtype=torch.long))


@pytest.mark.parametrize("cfg", [dict(method="bcq", wbits=3, group_size=64),
                                 dict(method="rtn", wbits=6, abits=6, group_size=-1),
                                 dict(method="rtn", wbits=4, abits=8, group_size=-1)],
                         ids=["bcq-w3", "bitplane-w6a6", "bitplane-w4a8"])
def test_native_step_runs_bcq_and_bitplane_layers(cfg):
    from anybit.kernels import native

    if not native.available():
        pytest.skip("native kernels not built")
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    quantize(model, QuantConfig(**cfg))
    ids = torch.randint(1, 500, (1, 16), generator=torch.Generator().manual_seed(4))
    fast, slow = StaticDecoder(model, 24), StaticDecoder(model, 24)
    slow.fast = None
    assert fast.fast is not None
    if cfg["method"] == "bcq":  # Q/K/V and gate/up fused into one LUT-GEMM call each, in prefill too
        assert [(row.n_qkv, row.n_gu) for row in fast.fast[1]] == [(1, 1)] * len(fast.fast[1])
        assert all(isinstance(p[0], native.BCQPlan) and isinstance(p[2], native.BCQPlan) for p in fast.plans)
    torch.testing.assert_close(fast(ids[:, :8]), slow(ids[:, :8]), atol=1e-4, rtol=1e-4)
    for j in range(8, 16):
        _close_up_to_int8_flips(fast(ids[:, j:j + 1]), slow(ids[:, j:j + 1]))


@pytest.mark.parametrize("cfg", [dict(method="rtn", wbits=3, group_size=32),
                                 dict(method="rtn", wbits=4, group_size=64),
                                 dict(method="bcq", wbits=3, group_size=64),
                                 dict(method="rtn", wbits=6, abits=6, group_size=-1),
                                 dict(method="rtn", wbits=4, abits=8, group_size=-1, popcount=True),
                                 # plain PoT W4 (two byte tables, native.pot_halves) in blocks of 32:
                                 # one pass per table, the second pass's output added per thread
                                 dict(method="potptq", wbits=4, group_size=32,
                                      options={"steps": "init", "zero_level": False})],
                         ids=["int3-g32", "int4-g64", "bcq-w3", "bitplane-w6a6", "bitplane-w4a8-popcount",
                              "pot-w4-g32-two-tables"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_native_step_on_one_thread_team_equals_a_team_per_linear(cfg, family, monkeypatch):
    """The whole stack on one thread team (each thread quantizing the linears' input itself,
    heads and SiLU split over the team) gives the bits of the path with a team per linear."""
    from anybit.kernels import native

    if not native.available():
        pytest.skip("native kernels not built")
    cfg = dict(cfg)
    if cfg.pop("popcount", False):  # the AND+popcount bit-plane kernel (kind 2) instead of integer dots
        monkeypatch.setattr(native, "BITPLANE_DOTS", False)
    kw = {"head_dim": 32} if family == "qwen3" else {}
    model = tiny_model(family, hidden_size=128, intermediate_size=320, **kw)  # 320: a SiLU span cut short
    quantize(model, QuantConfig(**cfg))
    ids = torch.randint(1, 500, (1, 20), generator=torch.Generator().manual_seed(5))
    d = StaticDecoder(model, 24)
    assert d.fast is not None
    lib, table = d.fast[0], d.fast[1]
    if not native.BITPLANE_DOTS:
        assert table[0].o.kind == 2
    for row in table:  # both paths on two threads (the team only forms with more than one)
        for lin in [*row.qkv[:row.n_qkv], row.o, *row.gu[:row.n_gu], row.down]:
            lin.threads = 2
    runs = []
    try:
        for team in (1, 0):
            lib.anybit_set_decode_team(team)
            d.reset()
            d(ids[:, :6])
            runs.append(torch.stack([d(ids[:, j:j + 1])[0, -1] for j in range(6, 20)]))
    finally:
        lib.anybit_set_decode_team(1)
    assert torch.equal(runs[0], runs[1])
