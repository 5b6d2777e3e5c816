"""A calibrated run killed midway resumes where it stopped, with the same result."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, STORIES_TRAIN, needs_stories


METHODS = {
    "gptq": ["--method", "gptq", "--wbits", "3"],
    # trained methods: the float chain (ABQ-LLM) and the optimizer's random order must resume too
    "abq": ["--method", "abq", "--scheme", "W4A8", "--epochs", "1"],
    "potptq": ["--method", "potptq", "--wbits", "3", "--epochs", "1"],
    "gptqt": ["--method", "gptqt", "--wbits", "3"],
    "smoothquant": ["--method", "smoothquant", "--scheme", "W8A8"],
}
# calibrated methods with nothing to resume: FlexQ's calibration is one ranking pass over
# the float model before any block is quantized (its blocks are then data-free)
NO_BLOCK_PROGRESS = {"flexq"}


def test_every_calibrated_method_has_a_resume_case():
    from anybit.methods import METHODS as REGISTRY

    calibrated = {n for n, m in REGISTRY.items() if m.needs_calibration}
    assert calibrated - NO_BLOCK_PROGRESS == set(METHODS)


def _quantize(out, extra_env=None, method="gptq"):
    cmd = [sys.executable, "-m", "anybit.cli", "quantize", "stories260k", *METHODS[method],
           "--group-size", "32", "--calib", str(STORIES_TRAIN), "--nsamples", "16", "--seqlen", "128",
           "--out", str(out), "--quiet"]
    env = {**os.environ, **(extra_env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


@needs_stories
@pytest.mark.parametrize("method", list(METHODS))
def test_killed_run_resumes_to_the_same_result(tmp_path, method):
    out = tmp_path / "q"
    partial = tmp_path / ".q.partial"
    killed = _quantize(out, {"ANYBIT_TEST_KILL_AFTER_BLOCK": "2"}, method)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()  # nothing half-written
    assert json.loads((partial / "progress.json").read_text())["done"] == 3

    resumed = _quantize(out, method=method)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert not partial.exists()

    straight = _quantize(tmp_path / "ref", method=method)
    assert straight.returncode == 0, straight.stderr
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_stories
def test_calibration_text_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Once upon a time there was a cat. " * 5)
    for path, needle in [(tmp_path / "empty.txt", "empty"), (tmp_path / "short.txt", "fewer than"),
                         (tmp_path / "missing.txt", "does not exist")]:
        p = subprocess.run([sys.executable, "-m", "anybit.cli", "quantize", "stories260k", "--method", "gptq",
                            "--calib", str(path), "--nsamples", "4", "--seqlen", "64", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("anybit: error:") and needle in p.stderr, p.stderr
        assert not (tmp_path / "o").exists()


@needs_stories
def test_a_crash_at_any_write_point_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """Fault injection at every write of the run folder (before each temporary file, before
    each rename, after it, after the old activations are deleted): the resumed run saves a
    model.safetensors byte for byte equal to an uninterrupted run's."""
    import anybit
    from anybit.data import calibration_windows, load_text
    from anybit.io.checkpoint import WEIGHTS
    from anybit.methods import sequential

    def run(run_dir, out, crash_at=None):
        lm = anybit.load_model("stories260k")
        calib = calibration_windows(lm.tokenizer, load_text(str(STORIES_TRAIN), "train"), 8, 64, seed=0)
        cfg = anybit.QuantConfig(method="gptq", wbits=3, group_size=32)
        sequential._write_points["n"] = 0
        if crash_at is None:
            monkeypatch.delenv("ANYBIT_TEST_CRASH_AT_WRITE", raising=False)
        else:
            monkeypatch.setenv("ANYBIT_TEST_CRASH_AT_WRITE", str(crash_at))
        try:
            anybit.quantize(lm.model, cfg, calib, progress=False, run_dir=run_dir)
        except sequential.InjectedCrash:
            return None
        monkeypatch.delenv("ANYBIT_TEST_CRASH_AT_WRITE", raising=False)
        anybit.save(lm.model, lm.tokenizer, out)
        return (out / WEIGHTS).read_bytes()

    want = run(tmp_path / "ref-run", tmp_path / "ref")
    points = sequential._write_points["n"]
    assert points == 5 * 10  # 5 blocks x (3 files x 3 points + the deletion)
    for n in range(points):
        run_dir = tmp_path / f"run{n}"
        assert run(run_dir, None, crash_at=n) is None
        assert run(run_dir, tmp_path / f"out{n}") == want, f"crash at write point {n}"
