"""The benchmark commands produce what the docs quote (fields, ratios measured in the same run)."""

import json

import pytest

from anybit import bench
from anybit.cli import main
from anybit.kernels import native

from conftest import needs_stories


@pytest.mark.skipif(not native.available(), reason="native kernels not built")
def test_kernel_bench_fields():
    limits = (native.MAX_ROWS, native.MAX_ROWS_BITPLANE)
    cases = bench.bench_kernels(shapes=((64, 96),), batches=(1, 3), cases=bench.CASES[:1] + bench.CASES[-1:], hot=True,
                                read_gb_per_s=10.0)
    gemm = [c for c in cases if c["op"] == "gemm"]
    assert {(c["format"], c["batch"]) for c in gemm} == {("int", 1), ("int", 3), ("bitplane", 1), ("bitplane", 3)}
    for c in gemm:
        assert c["shape"] == [64, 96] and c["median_s"] > 0
        assert c["ratio_vs_fp32"] == pytest.approx(c["fp32_median_s"] / c["median_s"])
        assert c["abits"] == (16 if c["format"] == "int" else 8)
        assert c["copies"] == 1 and c["fraction_of_read_bandwidth"] == pytest.approx(c["gb_per_s"] / 10.0)
    ops = {c["op"] for c in cases}
    assert {"dequantize", "dequantize-in-cache", "dequantize-table-in-cache", "dequantize-add-in-cache"} <= ops
    assert (native.MAX_ROWS, native.MAX_ROWS_BITPLANE) == limits  # the dispatch limits are restored


@needs_stories
def test_e2e_bench_against_the_recorded_source(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "stories260k", "--wbits", "4", "--group-size", "32", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["bench", "e2e", str(out), "--prompt-tokens", "16", "--new-tokens", "4", "--reps", "1", "--rounds", "2",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["baseline"]["model"] == "stories260k" and rep["model"]["source"] == "stories260k"
    assert rep["decode_speedup"] > 0 and rep["weights_ratio"] < 1
    assert rep["rounds"] == 2 and len(rep["model"]["decode_rounds"]) == 2
    assert rep["model"]["decoder"].startswith("lean")
    # the float baseline decodes on the same native step as the quantized model (float32 GEMVs)
    from anybit.kernels import native
    assert rep["baseline"]["decoder"] == ("lean-native" if native.available() else "lean")


def test_cold_mode_cycles_enough_distinct_matrices():
    llc = bench.last_level_cache_bytes()
    assert llc >= 1 << 20
    n = bench.copies_for_cold(8 << 20)
    assert n * (8 << 20) >= bench.COLD_FACTOR * llc and (n - 1) * (8 << 20) < bench.COLD_FACTOR * llc
    assert bench.copies_for_cold(1 << 40) == 1 and bench.copies_for_cold(8 << 20, hot=True) == 1
    assert bench.copies_for_cold(16) == bench.MAX_COPIES
    seen = []
    cyc = bench.Cycle([1, 2, 3], seen.append)
    assert seen == [1, 2, 3]  # each item warmed once
    for _ in range(7):
        cyc()
    assert seen == [1, 2, 3] + [1, 2, 3, 1, 2, 3, 1]
    assert bench.read_bandwidth(1 << 22) > 0


@pytest.mark.skipif(not native.available(), reason="native kernels not built")
def test_cold_kernel_bench_uses_distinct_matrices():
    cases = bench.bench_kernels(shapes=((256, 512),), batches=(1,), cases=bench.CASES[2:3], dequant=False)
    (c,) = cases
    assert c["copies"] == bench.copies_for_cold(c["weight_bytes"]) > 1


def test_kernel_bench_case_names_and_bad_formats(capsys, monkeypatch):
    names = [bench.case_name(c) for c in bench.CASES]
    assert len(set(names)) == len(names) and {"int3", "pot3", "bcq3", "bitplane6a6", "bitplane2a8"} <= set(names)
    seen = {}

    def fake(shapes, batches, group, **kw):  # what the command hands the benchmark, not a timing
        seen.update(kw)
        return []

    monkeypatch.setattr(bench, "bench_kernels", fake)
    assert main(["bench", "kernels", "--formats", "int3,bitplane6a6", "--shapes", "smollm2", "--json"]) == 0
    assert [bench.case_name(c) for c in seen["cases"]] == ["int3", "bitplane6a6"] and seen["dequant"] is False
    assert main(["bench", "kernels", "--formats", "int9"]) == 2
    err = capsys.readouterr().err
    assert "int9" in err and "int3" in err and len(err.strip().splitlines()) == 1
