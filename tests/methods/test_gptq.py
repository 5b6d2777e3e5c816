import torch

import anybit
from anybit.formats import FormatSpec, get_format
from anybit.formats import int as intfmt
from anybit.methods.gptq import HessianAccumulator, gptq_quantize

from conftest import STORIES_TEST, STORIES_TRAIN, needs_stories, tiny_model


def _problem(n=24, k=172, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    # correlated inputs, as real activations are
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    X = torch.randn(tokens, k, generator=g) @ mix
    acc = HessianAccumulator(k)
    for chunk in X.split(300):
        acc.add(chunk)
    return W, X, acc.H


def test_hessian_is_2_xxt_over_n():
    W, X, H = _problem()
    assert torch.allclose(H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-4)


def test_identity_hessian_reduces_to_rtn():
    W, _, _ = _problem()
    spec = FormatSpec("int", 3, 32, False)
    res = gptq_quantize(W, torch.eye(W.shape[1]), spec, damp_percent=0.0)
    s, z = intfmt.group_params(W, spec)
    assert torch.equal(res.codes, intfmt.encode(W, s, z, spec))


def test_gptq_beats_rtn_on_output_error_ragged_groups():
    W, X, H = _problem()
    for bits, group in [(4, 32), (3, 32), (2, 64), (3, -1)]:
        spec = FormatSpec("int", bits, group, False)
        res = gptq_quantize(W, H, spec)
        rtn = intfmt.fake_quantize(W, spec)
        out_err = lambda Wq: ((X @ (W - Wq).t()) ** 2).mean().item()
        assert out_err(res.weight) < 0.9 * out_err(rtn), (bits, group)
        # the packed codes decode to exactly the weight GPTQ reported
        packed = get_format("int").pack(get_format("int").Parts(res.codes, res.scales, res.zeros), spec, tuple(W.shape))
        assert torch.equal(get_format("int").dequantize(packed, spec, tuple(W.shape)), res.weight)


def test_act_order_static_groups_and_dead_columns():
    W, X, H = _problem()
    H[5, :] = 0
    H[:, 5] = 0
    spec = FormatSpec("int", 3, 32, True)
    res = gptq_quantize(W, H, spec, act_order=True, static_groups=True)
    assert torch.all(res.weight[:, 5] == 0)
    plain = gptq_quantize(W, H, spec)
    assert res.error < 1.0 and plain.error < 1.0


def test_tiny_model_gptq_deterministic_and_complete():
    cal = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    a, b = tiny_model("llama"), tiny_model("llama")
    cfg = anybit.QuantConfig(method="gptq", wbits=3, group_size=32)
    anybit.quantize(a, cfg, cal, progress=False)
    anybit.quantize(b, cfg, cal, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(a.anybit_info["layers"]) == 14


@needs_stories
def test_stories_gptq_beats_rtn_at_3_bits(fresh_stories):
    from anybit.data import calibration_windows, eval_windows, load_text

    tok = fresh_stories.tokenizer
    cal = calibration_windows(tok, load_text(str(STORIES_TRAIN), "train"), 16, 256, seed=0)
    win = eval_windows(tok, load_text(str(STORIES_TEST), "test"), 256, max_windows=40)
    gptq = fresh_stories.model
    anybit.quantize(gptq, anybit.QuantConfig(method="gptq", wbits=3, group_size=32), cal, progress=False)
    rtn = anybit.load_model("stories260k").model
    anybit.quantize(rtn, anybit.QuantConfig(method="rtn", wbits=3, group_size=32), progress=False)
    p_gptq = anybit.eval.perplexity(gptq, win, progress=False).ppl
    p_rtn = anybit.eval.perplexity(rtn, win, progress=False).ppl
    assert p_gptq < 0.95 * p_rtn, (p_gptq, p_rtn)


def test_gar_permutation_keeps_groups_whole_and_orders_them():
    from anybit.methods.gptq import gar_permutation

    diag = torch.rand(172, generator=torch.Generator().manual_seed(1))
    perm = gar_permutation(diag, 32)
    assert sorted(perm.tolist()) == list(range(172))
    blocks = [perm[i:i + 32] for i in range(0, 172, 32)]
    for b in blocks:  # each aligned block is one original group (the ragged one last), sorted within
        assert len(set((b // 32).tolist())) == 1
        assert torch.all(diag[b][:-1] >= diag[b][1:])
    assert int(blocks[-1][0]) // 32 == 5
    maxes = [float(diag[b].max()) for b in blocks[:-1]]
    assert maxes == sorted(maxes, reverse=True)


def test_gar_and_sym_rules_give_valid_packed_grids():
    W, X, H = _problem()
    for order in ("none", "gar"):
        for rule in ("absmax", "range"):
            spec = FormatSpec("int", 3, 32, True)
            res = gptq_quantize(W, H, spec, order=order, sym_rule=rule)
            packed = get_format("int").pack(get_format("int").Parts(res.codes, res.scales, res.zeros), spec, tuple(W.shape))
            assert torch.equal(get_format("int").dequantize(packed, spec, tuple(W.shape)), res.weight)
            rtn = intfmt.fake_quantize(W, spec)
            out_err = lambda Wq: ((X @ (W - Wq).t()) ** 2).mean().item()
            assert out_err(res.weight) < 0.9 * out_err(rtn), (order, rule)
    # the range rule uses the lowest code, the absmax rule never does
    s, z = intfmt.group_params(W, FormatSpec("int", 4, 32, True), sym_rule="range")
    codes = intfmt.encode(W, s, z, FormatSpec("int", 4, 32, True))
    assert (codes == 0).any() and codes.max() <= 15
    s, z = intfmt.group_params(W, FormatSpec("int", 4, 32, True))
    assert (intfmt.encode(W, s, z, FormatSpec("int", 4, 32, True)) >= 1).all()


def test_gptq_takes_its_grid_as_a_parameter():
    """GPTQ's rounding step is the grid object's: the default IntGrid reproduces the INT
    path bit for bit, and any other grid (here a ternary one, {-s, 0, s}) gets GPTQ's error
    feedback: a lower output error than rounding each weight onto that grid alone."""
    from anybit.methods.gptq import IntGrid

    W, X, H = _problem()
    spec = FormatSpec("int", 3, 32, False)
    a, b = gptq_quantize(W, H, spec), gptq_quantize(W, H, spec, grid=IntGrid(spec))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.codes, b.codes)

    class Ternary:
        def params(self, w):
            s = w.abs().mean(1, keepdim=True).clamp_min(1e-8)
            return s, torch.ones_like(s)

        def round(self, w, s, z):
            c = torch.clamp(torch.round(w / s) + z, 0, 2)
            return c, s * (c - z)

    t = gptq_quantize(W, H, spec, grid=Ternary())
    assert int(t.codes.max()) <= 2
    s = t.scales.repeat_interleave(32, dim=1)[:, : W.shape[1]]
    assert torch.allclose(t.weight, s * (t.codes.float() - 1))  # every value on the ternary grid
    rtn = torch.clamp(torch.round(W / s) + 1, 0, 2)
    out_err = lambda Wq: ((X @ (W - Wq).t()) ** 2).mean().item()
    assert out_err(t.weight) < 0.9 * out_err(s * (rtn - 1))
