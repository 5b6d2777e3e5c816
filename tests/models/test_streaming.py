"""Streaming quantization (models/lazy.py + io.checkpoint.ShardedSave): every method that
declares ``streams`` gives, with one block in memory at a time, exactly the tensors of the
in-memory run; the output is sharded per block and loads (memory-mapped) like any other."""

import json
import os
import subprocess
import sys

import pytest
import torch

import anybit
from anybit.errors import AnybitError
from anybit.io.checkpoint import INDEX, _read_weights, read_safetensors_mmap
from anybit.methods import METHODS

from conftest import METHOD_SCHEMES, ROOT, STORIES_TRAIN, needs_stories

# one small scheme per method (short training), the registry contract's
SCHEMES = {n: kw for n, kw in METHOD_SCHEMES.items() if METHODS[n].streams}


def test_every_streaming_method_is_covered():
    assert set(SCHEMES) == {"rtn", "gptq", "gptqt", "bcq", "potptq", "smoothquant", "abq"}
    assert not METHODS["flexq"].streams  # its sensitivity passes run the whole model


def _job(name: str, out, stream: bool) -> dict:
    cfg = anybit.QuantConfig(method=name, seed=0, lm_head_bits=8, **SCHEMES[name])
    return anybit.Job("stories260k", cfg, calib=str(STORIES_TRAIN), nsamples=4, seqlen=64, out=str(out),
                      stream=stream, progress=False, log=lambda _: None).run()


def _same_tensors(a, b) -> None:
    sa, sb = _read_weights(a), _read_weights(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


@needs_stories
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_streamed_run_saves_the_in_memory_tensors(tmp_path, name):
    _job(name, tmp_path / "mem", stream=False)
    rep = _job(name, tmp_path / "str", stream=True)
    files = json.loads((tmp_path / "str" / INDEX).read_text())["weight_map"]
    assert len(set(files.values())) == 6  # 5 blocks + embeddings, norm, head
    assert all(v.startswith("model-") and v.endswith("-of-00006.safetensors") for v in files.values())
    sha = json.loads((tmp_path / "str" / "config.json").read_text())["quantization_config"]["sha256"]
    assert set(sha) == set(files.values())
    assert rep["size"]["quantized_layers"] == 5 * 7 + 1
    _same_tensors(tmp_path / "mem", tmp_path / "str")
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    a, _ = anybit.load(tmp_path / "mem")
    b, _ = anybit.load(tmp_path / "str")
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


@needs_stories
def test_a_streamed_run_killed_midway_resumes_to_the_same_tensors(tmp_path):
    def quantize(out, env=None):
        cmd = [sys.executable, "-m", "anybit.cli", "quantize", "stories260k", "--method", "gptq", "--wbits", "3",
               "--group-size", "32", "--calib", str(STORIES_TRAIN), "--nsamples", "4", "--seqlen", "64",
               "--stream", "--out", str(out), "--quiet"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})

    killed = quantize(tmp_path / "q", {"ANYBIT_TEST_KILL_AFTER_BLOCK": "2"})
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "q").exists()
    resumed = quantize(tmp_path / "q")
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    assert quantize(tmp_path / "ref").returncode == 0
    _same_tensors(tmp_path / "q", tmp_path / "ref")
    # the killed run's temporary output folder was cleared by the next run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "ref"]


@needs_stories
def test_streaming_refusals_and_a_corrupt_shard(tmp_path):
    with pytest.raises(AnybitError, match="flexq needs the whole model"):
        anybit.Job("stories260k", anybit.QuantConfig(method="flexq", wbits=6, abits=6), stream=True,
                   out=str(tmp_path / "f"), log=lambda _: None).run()
    assert not (tmp_path / "f").exists()
    _job("rtn", tmp_path / "q", stream=True)
    shard = sorted((tmp_path / "q").glob("model-00003-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10:] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(AnybitError, match="does not match the sha256"):
        anybit.load(tmp_path / "q")


def test_mmap_reader_matches_safetensors_and_refuses_malformed_files(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 5, generator=g), "b": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
             "c": torch.randn(2, 3, generator=g).to(torch.bfloat16), "d": torch.tensor([True, False]),
             "e": torch.randint(-5, 5, (4, 1), dtype=torch.int32, generator=g), "empty": torch.zeros(0, 4)}
    f = tmp_path / "t.safetensors"
    save_file(state, str(f))
    got, ref = read_safetensors_mmap(f), load_file(str(f))
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    raw = f.read_bytes()
    for bad in (raw[:5], (10**9).to_bytes(8, "little") + raw[8:], raw[:-4]):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(ValueError):
            read_safetensors_mmap(tmp_path / "bad.safetensors")


@needs_stories
def test_a_model_larger_than_the_available_memory_streams_or_is_refused(tmp_path, monkeypatch):
    # the check reads the safetensors headers only: stories260K is ~1 MB as float32
    from anybit.models.loader import float_model_bytes, resolve_builtin

    need = float_model_bytes(resolve_builtin("stories260k"))
    assert 0.5e6 < need < 2e6
    monkeypatch.setenv("ANYBIT_MEM_AVAILABLE_GIB", str(need / 2 / 2**30))
    logs = []
    cfg = anybit.QuantConfig(method="rtn", seed=0, lm_head_bits=8, **SCHEMES["rtn"])
    anybit.Job("stories260k", cfg, out=str(tmp_path / "auto"), progress=False, log=logs.append).run()
    assert any("as --stream" in m for m in logs), logs
    assert (tmp_path / "auto" / INDEX).is_file()  # written block by block
    monkeypatch.delenv("ANYBIT_MEM_AVAILABLE_GIB")
    _job("rtn", tmp_path / "ref", stream=True)
    _same_tensors(tmp_path / "auto", tmp_path / "ref")
    # what cannot stream (an evaluation of the float model) is refused in one line
    r = subprocess.run([sys.executable, "-m", "anybit.cli", "eval", "stories260k", "--max-windows", "1"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "ANYBIT_MEM_AVAILABLE_GIB": str(need / 2 / 2**30)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--stream" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
