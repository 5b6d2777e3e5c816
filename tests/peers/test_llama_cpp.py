"""The llama.cpp peer (the [bench] extra): ggml's product through our bindings computes the
product it is timed for. Skipped where llama-cpp-python is not installed."""

import pytest
import torch

from anybit.peers import llama_cpp

pytestmark = pytest.mark.skipif(llama_cpp.unavailable() is not None, reason=str(llama_cpp.unavailable()))


@pytest.mark.parametrize("name,tol", [("F32", 1e-5), ("Q8_0", 2e-2), ("Q4_0", 0.15), ("Q4_K", 0.15)])
def test_ggml_product_matches_torch(name, tol):
    mm = llama_cpp.MulMat(name, 40, 512, 3, copies=2, threads=2)
    try:
        for i in range(2):  # MulMat computed every copy once on construction
            ref = mm.x @ mm.weights[i].t()
            err = (mm.output(i) - ref).norm() / ref.norm()
            assert err < tol, (name, i, float(err))
    finally:
        mm.close()
    assert llama_cpp.bits_per_weight("Q4_0", 512) == 4.5


def test_kernel_rows_fields():
    from anybit import bench

    rows = llama_cpp.kernel_rows((64, 256), 1, lambda b: 2, bench.median_time, 1, types=("F32", "Q4_0", "Q4_K"),
                                 read_gb_per_s=10.0, fp32_s=1e-3)
    assert [r["format"] for r in rows] == ["llama.cpp F32", "llama.cpp Q4_0", "llama.cpp Q4_K"]
    for r in rows:
        assert r["median_s"] > 0 and r["copies"] == 2 and r["ratio_vs_fp32"] == pytest.approx(1e-3 / r["median_s"])
