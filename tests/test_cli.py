"""The command line: the contract of the foundation issue, and one-line errors for bad input."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from anybit.cli import main

from conftest import ROOT, STORIES, STORIES_TEST, needs_stories


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    # progress notes may precede it; the error is one line, the last, and there is no traceback
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("anybit: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]


@needs_stories
def test_quantize_save_inspect_eval_generate(tmp_path, capsys):
    out = tmp_path / "w3"
    code, stdout, _ = run(capsys, "quantize", "stories260k", "--scheme", "W3A16G32", "--out", str(out), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["scheme"] == "W3A16G32" and report["out"] == str(out)
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["method"] == "rtn" and info["quantized_layers"] == 35
    assert all(layer["bits"] == 3 and layer["group_size"] == 32 for layer in info["layers"].values())
    code, stdout, _ = run(capsys, "inspect", str(out))
    assert code == 0 and "bits/weight" in stdout and "mlp.down_proj" in stdout
    code, stdout, _ = run(capsys, "eval", str(out), "--dataset", str(STORIES_TEST), "--seqlen", "128",
                          "--max-windows", "4", "--kl-against", "stories260k", "--json")
    res = json.loads(stdout)
    assert code == 0 and {"ppl", "tokens", "windows", "seqlen", "dataset", "kl"} <= set(res)
    assert res["windows"] == 4 and res["tokens"] == 512 and res["kl"] > 0
    code, stdout, _ = run(capsys, "generate", str(out), "Once upon a time", "--max-new-tokens", "8")
    assert code == 0 and stdout.startswith("Once upon a time")


@needs_stories
def test_quantize_prints_before_and_after(tmp_path, capsys):
    code, stdout, _ = run(capsys, "quantize", "stories260k", "--wbits", "4", "--group-size", "32",
                          "--eval", str(STORIES_TEST), "--seqlen", "256", "--max-windows", "8")
    assert code == 0 and "ppl before" in stdout and "after" in stdout


@needs_stories
def test_bad_input_one_line_errors(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))[::2],
                          "not found")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert_one_line_error(*run(capsys, "eval", str(tmp_path / "bert"))[::2], "unsupported architecture", "llama")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--wbits", "9", "--out", str(tmp_path / "o"))[::2],
                          "--wbits")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--wbits", "1", "--out", str(tmp_path / "o"))[::2],
                          "--wbits")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--group-size", "0", "--out", str(tmp_path / "o"))[::2],
                          "group")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--scheme", "W4X", "--out", str(tmp_path / "o"))[::2],
                          "scheme")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--method", "magic", "--out", str(tmp_path / "o"))[::2],
                          "unknown method")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--bogus-flag")[::2], "unrecognized")
    assert not (tmp_path / "o").exists()
    # empty and too-short evaluation text
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(*run(capsys, "eval", "stories260k", "--dataset", str(tmp_path / "empty.txt"))[::2], "empty")
    (tmp_path / "short.txt").write_text("Once upon a time.")
    assert_one_line_error(*run(capsys, "eval", "stories260k", "--dataset", str(tmp_path / "short.txt"),
                               "--seqlen", "256")[::2], "fewer than one window")
    assert_one_line_error(*run(capsys, "inspect", str(tmp_path / "bert"))[::2], "not an anybit quantized model")


@needs_stories
def test_nan_weights_and_corrupt_checkpoint(tmp_path, capsys):
    nan_model = tmp_path / "nan"
    nan_model.mkdir()
    for f in STORIES.iterdir():
        (nan_model / f.name).write_bytes(f.read_bytes())
    state = load_file(str(STORIES / "model.safetensors"))
    key = next(k for k in state if "down_proj" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(*run(capsys, "quantize", str(nan_model), "--out", str(tmp_path / "o"))[::2], "NaN")
    assert not (tmp_path / "o").exists()

    out = tmp_path / "q"
    assert run(capsys, "quantize", "stories260k", "--out", str(out), "--group-size", "32")[0] == 0
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--out", str(out))[::2], "already exists")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:1000])
    assert_one_line_error(*run(capsys, "eval", str(out), "--dataset", str(STORIES_TEST))[::2], "corrupt")
    assert_one_line_error(*run(capsys, "inspect", str(out))[::2], "corrupt")


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    """The installed command, as a user runs it: non-zero exit, one line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "anybit.cli", "eval", str(tmp_path / "nope")], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("anybit: error:") and len(p.stderr.strip().splitlines()) == 1


@needs_stories
def test_weight_activation_bad_input(tmp_path, capsys):
    o = str(tmp_path / "o")
    cases = [
        (("--method", "gptqt", "--scheme", "W3A8"), "weights only"),
        (("--method", "potptq", "--wbits", "3", "--abits", "8"), "weights only"),
        (("--scheme", "W4A8G32", "--act-group-size", "7"), "--act-group-size"),
        (("--scheme", "W4A1"), "--abits"),
        (("--method", "flexq", "--scheme", "W6A6", "--a8", "down_(proj"), "regex of layer names"),
        (("--method", "abq", "--scheme", "W4*A8"), "bit balance"),
        (("--method", "smoothquant", "--scheme", "W8A8", "--alpha", "2"), "--alpha"),
    ]
    for argv, needle in cases:
        assert_one_line_error(*run(capsys, "quantize", "stories260k", *argv, "--out", o)[::2], needle)
    assert not (tmp_path / "o").exists()


@needs_stories
def test_weight_activation_scheme_round_trip(tmp_path, capsys):
    out = tmp_path / "w4a8"
    code, _, _ = run(capsys, "quantize", "stories260k", "--scheme", "W4A8G32", "--act-sym", "--out", str(out))
    assert code == 0
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    assert {(x["format"], x["abits"], x["act"]["sym"]) for x in info["layers"].values()} == {("bitplane", 8, True)}
    assert all(x["bits_per_activation"] > 8 for x in info["layers"].values())


def _copy_stories(dst):
    dst.mkdir()
    for f in STORIES.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@needs_stories
def test_more_bad_input_at_the_door(tmp_path, capsys):
    """Issue 15's list: each ends in one line, exit 2, nothing written."""
    o = str(tmp_path / "o")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--threads", "-1", "--out", o)[::2], "--threads")
    trunc = _copy_stories(tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    for argv in (("quantize", str(trunc), "--out", o), ("eval", str(trunc), "--dataset", str(STORIES_TEST)),
                 ("generate", str(trunc), "Once")):
        assert_one_line_error(*run(capsys, *argv)[::2], "corrupt")
    shapes = _copy_stories(tmp_path / "shapes")
    cfg = json.loads((shapes / "config.json").read_text())
    cfg["intermediate_size"] = 200  # the weights are 172 wide
    (shapes / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run(capsys, "quantize", str(shapes), "--out", o)[::2], str(shapes))
    binary = _copy_stories(tmp_path / "binary")
    (binary / "config.json").write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(*run(capsys, "eval", str(binary))[::2], "corrupt")
    listed = _copy_stories(tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2, 3]")
    assert_one_line_error(*run(capsys, "quantize", str(listed), "--out", o)[::2], "not an object")
    assert not (tmp_path / "o").exists()

    q = tmp_path / "q"
    assert run(capsys, "quantize", "stories260k", "--group-size", "32", "--out", str(q), "--quiet")[0] == 0
    cfg = json.loads((q / "config.json").read_text())
    layer = next(iter(cfg["quantization_config"]["layers"]))
    del cfg["quantization_config"]["layers"][layer]["bits"]
    (q / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run(capsys, "eval", str(q), "--dataset", str(STORIES_TEST))[::2], layer, "invalid")


@needs_stories
def test_overwritten_packed_bytes_fail_the_sha256(tmp_path, capsys):
    q = tmp_path / "q"
    assert run(capsys, "quantize", "stories260k", "--group-size", "32", "--out", str(q), "--quiet")[0] == 0
    assert "sha256" in json.loads((q / "config.json").read_text())["quantization_config"]
    state = load_file(str(q / "model.safetensors"))
    key = next(k for k in state if k.endswith("qweight"))
    state[key] = torch.randint(0, 255, state[key].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_file(state, str(q / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(*run(capsys, "generate", str(q), "Once upon a time")[::2], "sha256", "--no-verify")
    code, out, _ = run(capsys, "generate", str(q), "Once upon a time", "--no-verify", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("Once upon a time")
    # --no-verify held for that command only (main() restores the environment)
    assert_one_line_error(*run(capsys, "generate", str(q), "Once upon a time")[::2], "sha256")


@needs_stories
def test_generate_past_the_context_is_refused(capsys):
    assert_one_line_error(*run(capsys, "generate", "stories260k", "Once", "--max-new-tokens", "2000")[::2],
                          "context of 512")


@needs_stories
def test_streaming_quantization_writes_the_same_bytes(tmp_path, capsys):
    """--stream (one block read at a time from the shards) saves exactly the in-memory result."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "quantize", "stories260k", "--wbits", "3", "--group-size", "32", "--lm-head-bits", "8",
               "--skip", "down_proj", "--out", str(a), "--quiet")[0] == 0
    assert run(capsys, "quantize", "stories260k", "--wbits", "3", "--group-size", "32", "--lm-head-bits", "8",
               "--skip", "down_proj", "--stream", "--out", str(b), "--quiet")[0] == 0
    from anybit.io.checkpoint import _read_weights

    sa, sb = _read_weights(a), _read_weights(b)  # b is sharded per block (tests/models/test_streaming.py)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--method", "flexq", "--scheme", "W6A6",
                               "--stream", "--out", str(tmp_path / "c"))[::2], "--stream", "whole model")
    assert_one_line_error(*run(capsys, "quantize", "stories260k", "--stream")[::2], "--out")
    nan = _copy_stories(tmp_path / "nan")
    state = load_file(str(nan / "model.safetensors"))
    key = next(k for k in state if "layers.3" in k and "up_proj" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(*run(capsys, "quantize", str(nan), "--stream", "--out", str(tmp_path / "d"))[::2], "NaN")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
