import json

import pytest
import torch

import anybit
from anybit.data import calibration_windows, load_text
from anybit.formats import FormatSpec, pot
from anybit.methods.blocktrain import fast_bf16, resolve_amp
from anybit.methods.potptq import PoTFakeLinear

from conftest import STORIES_TRAIN, needs_stories, tiny_model


@pytest.mark.parametrize("fmt", ["pot", "potz"])
def test_fake_linear_matches_packed_pot_and_has_gradient(fmt):
    torch.manual_seed(0)
    lin = torch.nn.Linear(172, 12, bias=True)
    spec = FormatSpec(fmt, 3, 32)
    s = pot.init_scales(lin.weight.data, spec, grid=(0.5, 1.0, 1.5))
    fake = PoTFakeLinear(lin, s, spec)
    x = torch.randn(3, 172)
    w_ref = pot.decode(pot.encode(lin.weight.data, s, spec), s, spec)
    assert torch.allclose(fake.fake_weight(), w_ref)
    fake(x).pow(2).sum().backward()
    assert fake.gamma.grad is not None and fake.gamma.grad.abs().sum() > 0


def test_refinement_lowers_block_error_and_is_deterministic():
    cal = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = cal  # refinement minimises the output error on the calibration windows
    ref = tiny_model("llama")
    with torch.no_grad():
        target = ref(ids).logits

    def run(steps, epochs=4, zero=True):
        m = tiny_model("llama")
        cfg = anybit.QuantConfig(method="potptq", wbits=2, group_size=32,
                                 options={"steps": steps, "epochs": epochs, "lr": 5e-3, "zero_level": zero})
        anybit.quantize(m, cfg, cal, progress=False)
        with torch.no_grad():
            return m, ((m(ids).logits - target) ** 2).mean().item()

    m1, e_init = run("init")
    m2, e_both = run("both")
    m3, _ = run("both")
    assert {v["format"] for v in m2.anybit_info["layers"].values()} == {"potz"}
    assert e_both < e_init
    s2, s3 = m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s2[k], s3[k]) for k in s2)
    m4, e_plain = run("both", zero=False)
    assert {v["format"] for v in m4.anybit_info["layers"].values()} == {"pot"}


def test_log_domain_straight_through_gives_no_gradient_to_unclamped_scales():
    """Why step 2 holds the exponent fixed: with an STE on round(log2(|w|/s)), s·2^e equals
    |w| to first order, so weights whose exponent is not clamped give the scale no gradient."""
    torch.manual_seed(0)
    spec = FormatSpec("pot", 3, 8)  # exponents 0..3
    s = torch.ones(4, 2)
    w = (torch.rand(4, 16) * 5 + 1.6) * torch.sign(torch.randn(4, 16))  # |w|/s in (1.6, 6.6): e in 1..3, unclamped
    lin = torch.nn.Linear(16, 4, bias=False)
    lin.weight.data = w
    grads = {}
    for mode in ("log", "scale"):
        fake = PoTFakeLinear(lin, s, spec, straight_through=mode)
        (fake.fake_weight() * torch.randn(4, 16, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads[mode] = fake.gamma.grad.abs().sum().item()
    assert grads["log"] < 1e-5 < grads["scale"]


def test_amp_unset_follows_the_cpu_and_a_given_value_wins():
    assert resolve_amp(None) is fast_bf16()
    assert resolve_amp(True) is True and resolve_amp(False) is False


@needs_stories
def test_step2_moves_gamma_and_lowers_every_block_error_on_stories():
    """The paper's loss (both norms as sums) lets Γ move: with a mean-form data term next to
    a sum-form ‖Γ‖², λ was B·T·D times too strong and Γ stayed at ~0."""
    lm = anybit.load_model("stories260k")
    calib = calibration_windows(lm.tokenizer, load_text(str(STORIES_TRAIN), "train"), 8, 128)
    cfg = anybit.QuantConfig(method="potptq", wbits=3, group_size=32)  # the paper: 10 epochs at 3 bits
    anybit.quantize(lm.model, cfg, calib, progress=False)
    blocks = lm.model.anybit_info["blocks"]
    assert len(blocks) == lm.model.config.num_hidden_layers
    for b in blocks:
        assert b["steps"] == 80
        assert b["gamma_abs_mean"] > 1e-3, b
        assert b["error_after"] < b["error_before"], b
        assert b["kept_epoch"] == 10
        assert b["amp"] is fast_bf16()  # unset amp: bfloat16 only where the CPU multiplies it natively
    json.dumps(lm.model.anybit_info, allow_nan=False)  # config.json stays strict JSON
