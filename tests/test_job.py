"""anybit.Job: the pipeline as one object (load -> calibration -> quantize -> eval -> save),
the one that `anybit quantize` and `anybit compare` run."""

import pytest

import anybit
from anybit.errors import AnybitError

from conftest import needs_corpora, needs_stories


@needs_stories
@needs_corpora
def test_job_runs_every_step(tmp_path):
    logs = []
    job = anybit.Job("stories260k", anybit.QuantConfig(method="gptq", wbits=4, group_size=32), nsamples=4, seqlen=64,
                     evals=("wikitext2",), max_windows=2, kl_windows=1, eval_before=True, eval_fallback=True,
                     out=str(tmp_path / "q"), progress=False, log=logs.append)
    rep = job.run()
    assert rep["method"] == "gptq" and rep["scheme"] == "W4A16G32"
    assert rep["calibration"]["nsamples"] == 4 and rep["calibration"]["seqlen"] == 64
    (name, before), = rep["before"].items()
    after = rep["after"][name]
    assert after["windows"] == 2 and after["ppl"] > before["ppl"] * 0.9
    assert rep["kl"] > 0 and rep["kl_tokens"] == 64
    assert rep["size"]["bits_per_weight"] < 6 and rep["out"] == str(tmp_path / "q")
    model, _ = anybit.load(tmp_path / "q")
    assert model.anybit_info["method"] == "gptq"
    assert any(line.startswith("anybit: saved") for line in logs)


def test_job_refuses_bad_config_before_loading(tmp_path):
    logs = []
    job = anybit.Job("no/such/model", anybit.QuantConfig(method="gptq", options={"epochs": 3}), log=logs.append)
    with pytest.raises(AnybitError, match="method gptq has no option 'epochs'"):
        job.run()
    (tmp_path / "exists").mkdir()
    job = anybit.Job("no/such/model", anybit.QuantConfig(method="rtn"), out=str(tmp_path / "exists"), log=logs.append)
    with pytest.raises(AnybitError, match="already exists"):
        job.run()
    assert logs == []  # nothing was loaded


@needs_stories
@pytest.mark.parametrize("method,options,abits", [("potptq", {"steps": "init"}, 16), ("flexq", {"a8": "down_proj"}, 6)])
def test_data_free_runs_of_calibrated_methods_read_no_calibration(method, options, abits, monkeypatch, tmp_path):
    """PoTPTQ's step 1 alone and FlexQ with the official A8 rule use no data: no calibration
    set is read (it took ~40 minutes at 128 x 2048 on SmolLM2 for nothing)."""
    def refuse(*a, **k):
        raise AssertionError("calibration read")

    monkeypatch.setattr(anybit.Job, "calibration", refuse)
    cfg = anybit.QuantConfig(method=method, wbits=6 if method == "flexq" else 3, abits=abits, group_size=32,
                             options=options)
    rep = anybit.Job("stories260k", cfg, out=str(tmp_path / "q"), progress=False, log=lambda _: None).run()
    assert "calibration" not in rep and rep["size"]["quantized_layers"] > 0
