"""llama.cpp measured in the same run as anybit (the optional ``[bench]`` extra:
llama-cpp-python built from its source by pip, which brings libggml and libllama).

Kernels: ggml's own matrix-vector/matrix product (``ggml_mul_mat`` on the CPU backend,
``ggml_graph_compute_with_ctx``) on weights quantized by ggml itself
(``ggml_quantize_chunk``), cold like anybit's benchmark: distinct weight tensors cycled
until they exceed 4x the last-level cache. The activations are float32 as in anybit; ggml
quantizes them itself (to Q8_0 / Q8_K) inside the product, as it does in llama.cpp.

Reached through ctypes on the libraries that llama-cpp-python installs; nothing here
imports llama_cpp at module import, so anybit works without the extra.
"""

from __future__ import annotations

import ctypes
import importlib.util
from ctypes import c_bool, c_int, c_int64, c_size_t, c_void_p
from pathlib import Path

import torch

# ggml_type values (ggml.h; stable)
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
              "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# block length of each type (a row must be a multiple of it)
BLOCK = {"F32": 1, "F16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q2_K": 256, "Q3_K": 256,
         "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# the ggml types nearest each anybit weight format (for `bench kernels --against llama.cpp`;
# Q6_K: INT6 and the 6-bit bit-plane formats, W6A6 / W6A8)
NEAREST = ("F32", "Q8_0", "Q6_K", "Q4_0", "Q4_K", "Q3_K", "Q2_K")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


class _CPlan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [("work_size", c_size_t), ("work_data", c_void_p), ("n_threads", c_int), ("threadpool", c_void_p),
                ("abort_callback", c_void_p), ("abort_callback_data", c_void_p), ("use_ref", c_bool)]


_libs = None
_why: str | None = None


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def unavailable() -> str | None:
    """Why llama.cpp cannot be measured here (None if it can)."""
    _load()
    return _why


def _load():
    global _libs, _why
    if _libs is not None or _why is not None:
        return _libs
    d = _lib_dir()
    if d is None:
        _why = ("llama.cpp is not installed: pip install -e '.[bench]' (builds llama-cpp-python from source; "
                "see README)")
        return None
    try:
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        base = ctypes.CDLL(str(d / "libggml-base.so"), mode=mode)
        cpu = ctypes.CDLL(str(d / "libggml-cpu.so"), mode=mode)
    except OSError as e:
        _why = f"llama.cpp's libraries do not load ({e}); reinstall the [bench] extra"
        return None
    p, i64 = c_void_p, c_int64
    base.ggml_init.restype = p
    base.ggml_init.argtypes = [_InitParams]
    base.ggml_free.argtypes = [p]
    base.ggml_new_tensor_2d.restype = p
    base.ggml_new_tensor_2d.argtypes = [p, c_int, i64, i64]
    base.ggml_get_data.restype = p
    base.ggml_get_data.argtypes = [p]
    base.ggml_mul_mat.restype = p
    base.ggml_mul_mat.argtypes = [p, p, p]
    base.ggml_new_graph.restype = p
    base.ggml_new_graph.argtypes = [p]
    base.ggml_build_forward_expand.argtypes = [p, p]
    base.ggml_graph_overhead.restype = c_size_t
    base.ggml_tensor_overhead.restype = c_size_t
    base.ggml_row_size.restype = c_size_t
    base.ggml_row_size.argtypes = [c_int, i64]
    base.ggml_quantize_chunk.restype = c_size_t
    base.ggml_quantize_chunk.argtypes = [c_int, p, p, i64, i64, i64, p]
    cpu.ggml_graph_plan.restype = _CPlan
    cpu.ggml_graph_plan.argtypes = [p, c_int, p]
    cpu.ggml_graph_compute.restype = c_int
    cpu.ggml_graph_compute.argtypes = [p, ctypes.POINTER(_CPlan)]
    if hasattr(cpu, "ggml_cpu_init"):
        cpu.ggml_cpu_init()
    _libs = (base, cpu)
    return _libs


class MulMat:
    """``copies`` distinct ggml weight tensors ``[N, K]`` of ``type_name`` (quantized by ggml
    from random float weights) and one float32 activation ``[M, K]``; ``__call__`` computes
    the next copy's product (a cold rotation)."""

    def __init__(self, type_name: str, n: int, k: int, m: int, copies: int, threads: int, seed: int = 0):
        base, cpu = _load()
        self.base, self.cpu, self.threads = base, cpu, threads
        t = GGML_TYPES[type_name]
        self.weight_bytes = base.ggml_row_size(t, k) * n
        per_copy = self.weight_bytes + 4 * n * m + 4 * base.ggml_tensor_overhead() + base.ggml_graph_overhead() + 8192
        size = copies * per_copy + 4 * m * k + base.ggml_tensor_overhead() + (16 << 20)
        self.ctx = base.ggml_init(_InitParams(size, None, False))
        if not self.ctx:
            raise MemoryError(f"ggml_init({size} bytes) failed")
        gen = torch.Generator().manual_seed(seed)
        x = base.ggml_new_tensor_2d(self.ctx, GGML_TYPES["F32"], k, m)
        xs = torch.randn(m, k, generator=gen).contiguous()
        ctypes.memmove(base.ggml_get_data(x), xs.data_ptr(), 4 * m * k)
        self.x, self.n, self.m = xs, n, m
        self.weights: list[torch.Tensor] = []  # the float weights before ggml quantized them
        self.outs = []
        self.graphs = []
        for _ in range(copies):
            w = base.ggml_new_tensor_2d(self.ctx, t, k, n)
            wf = (torch.randn(n, k, generator=gen) * 0.02).contiguous()
            if type_name == "F32":
                ctypes.memmove(base.ggml_get_data(w), wf.data_ptr(), 4 * n * k)
            else:
                base.ggml_quantize_chunk(t, wf.data_ptr(), base.ggml_get_data(w), 0, n, k, None)
            self.weights.append(wf)
            out = base.ggml_mul_mat(self.ctx, w, x)
            self.outs.append(out)
            gf = base.ggml_new_graph(self.ctx)
            base.ggml_build_forward_expand(gf, out)
            self.graphs.append(gf)
        # one plan per graph, all sharing one work buffer (the quantized activations)
        self.plans = [cpu.ggml_graph_plan(gf, threads, None) for gf in self.graphs]
        self.work = torch.empty(max(1, max(pl.work_size for pl in self.plans)), dtype=torch.uint8)
        for pl in self.plans:
            pl.work_data = self.work.data_ptr()
        self.i = 0
        for _ in range(len(self.graphs)):  # first calls (thread start-up) untimed
            self()

    def __call__(self) -> None:
        i = self.i
        self.i = (i + 1) % len(self.graphs)
        if self.cpu.ggml_graph_compute(self.graphs[i], ctypes.byref(self.plans[i])) != 0:
            raise RuntimeError("ggml_graph_compute failed")

    def output(self, i: int) -> torch.Tensor:
        """``[M, N]`` result of copy ``i``'s last product."""
        y = torch.empty(self.m, self.n)
        ctypes.memmove(y.data_ptr(), self.base.ggml_get_data(self.outs[i]), 4 * self.m * self.n)
        return y

    def close(self) -> None:
        if self.ctx:
            self.base.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self):
        self.close()


def supports(type_name: str, k: int) -> bool:
    return k % BLOCK[type_name] == 0


def bits_per_weight(type_name: str, k: int) -> float:
    base, _ = _load()
    return base.ggml_row_size(GGML_TYPES[type_name], k) * 8 / k


def kernel_rows(shape: tuple[int, int], batch: int, copies_for, median_time, threads: int,
                types=NEAREST, read_gb_per_s: float | None = None, fp32_s: float | None = None) -> list[dict]:
    """Rows of ``bench kernels`` for ggml's product at one shape and batch."""
    n, k = shape
    rows = []
    for name in types:
        if not supports(name, k):
            continue
        base, _ = _load()
        nbytes = base.ggml_row_size(GGML_TYPES[name], k) * n
        mm = MulMat(name, n, k, batch, copies_for(nbytes), threads)
        try:
            t = median_time(mm, min_reps=max(5, 2 * len(mm.graphs)))
        finally:
            mm.close()
        gbs = nbytes / t / 1e9
        rows.append({"format": f"llama.cpp {name}", "op": "gemm", "bits": round(bits_per_weight(name, k), 3),
                     "abits": 16, "shape": [n, k], "batch": batch, "median_s": t, "weight_bytes": nbytes,
                     "gb_per_s": gbs, "copies": len(mm.graphs),
                     "fraction_of_read_bandwidth": gbs / read_gb_per_s if read_gb_per_s else None,
                     "fp32_median_s": fp32_s, "bf16_median_s": None,
                     "ratio_vs_fp32": fp32_s / t if fp32_s else None, "ratio_vs_bf16": None})
    return rows



# ----------------------------------------------------------------------------- end to end
# llama.cpp file types of `llama_model_quantize` (llama.h) for the rows of `bench e2e`
FTYPES = {"F32": 0, "Q8_0": 7, "Q6_K": 18, "Q5_0": 8, "Q4_0": 2, "Q4_K_M": 15, "Q3_K_S": 11, "Q2_K": 10}


def nearest_ftypes(info: dict | None) -> tuple[str, ...]:
    """The llama.cpp file types to compare with an anybit model (its quantization_config),
    or with a float model (None)."""
    if not info:
        return ("F32",)
    bits = int(info.get("bits", 4))
    return {8: ("Q8_0",), 6: ("Q6_K",), 5: ("Q5_0",), 4: ("Q4_0", "Q4_K_M"), 3: ("Q3_K_S",),
            2: ("Q2_K",)}.get(bits, ("Q4_0",))


def quantize_gguf(src: Path, dst: Path, ftype: str, threads: int) -> Path:
    """``src`` (any GGUF) re-quantized by llama.cpp to ``ftype``, cached at ``dst``."""
    if dst.is_file():
        return dst
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + ".tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed")
    tmp.replace(dst)
    return dst


def bench_e2e(gguf: Path, prompt_tokens: int, new_tokens: int, reps: int, threads: int) -> dict:
    """Prefill and greedy decode tokens/s of llama.cpp on ``gguf`` (prompt, then one token at a
    time on the KV cache), medians of ``reps``, as anybit's ``bench_decode`` measures them."""
    import time

    import numpy as np
    from llama_cpp import Llama

    from ..progress import measure

    with measure() as m:
        llm = Llama(model_path=str(gguf), n_ctx=prompt_tokens + new_tokens + 8, n_batch=max(32, prompt_tokens),
                    n_threads=threads, n_threads_batch=threads, verbose=False)
        n_vocab = llm.n_vocab()
        ids = [int(t) for t in (np.arange(prompt_tokens) * 7919) % (n_vocab - 1) + 1]

        def run():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
                llm.eval([int(logits.argmax())])
            return t1 - t0, time.perf_counter() - t1

        run()
        times = [run() for _ in range(reps)]
    tp = sorted(t[0] for t in times)[len(times) // 2]
    td = sorted(t[1] for t in times)[len(times) // 2]
    return {"model": f"llama.cpp {gguf.name}", "prefill_tokens_per_s": prompt_tokens / tp,
            "decode_tokens_per_s": new_tokens / td, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "peak_rss_mib": m.peak_rss_mib, "weights_mib": gguf.stat().st_size / 2**20}


# ------------------------------------------------------------------------- GGUF checks

def gguf_logits(gguf: Path, windows, threads: int = 1):
    """llama.cpp's logits ``float32 [n, T, V]`` for token ``windows [n, T]`` (each from an
    empty cache), as numpy."""
    import numpy as np
    from llama_cpp import Llama

    n, t = windows.shape
    llm = Llama(model_path=str(gguf), n_ctx=max(t, 64), n_batch=min(t, 512), n_ubatch=min(t, 512), logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    out = []
    for row in windows.tolist():
        llm.reset()
        llm.eval([int(x) for x in row])
        out.append(np.array(llm.scores[:t], dtype=np.float32))
    del llm
    return np.stack(out)


def agreement(model, gguf: Path, windows, threads: int = 1) -> dict:
    """anybit's ``model`` and llama.cpp on ``gguf`` over the same token windows: mean KL
    (anybit ‖ llama.cpp) per token, top-1 agreement, and both perplexities (GPTQ's
    definition: mean next-token NLL over every position but the last of each window)."""
    import math

    import torch
    import torch.nn.functional as F

    ll = torch.from_numpy(gguf_logits(gguf, windows, threads))
    kl = nll_a = nll_l = 0.0
    top1 = count = 0
    with torch.inference_mode():
        for i in range(windows.shape[0]):
            ids = windows[i:i + 1]
            a = model(ids, use_cache=False).logits[0].float()
            b = ll[i]
            la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
            kl += float((la.exp() * (la - lb)).sum())
            top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += a.shape[0]
            nll_a += float(F.cross_entropy(a[:-1], ids[0, 1:], reduction="sum"))
            nll_l += float(F.cross_entropy(b[:-1], ids[0, 1:], reduction="sum"))
    pred = windows.shape[0] * (windows.shape[1] - 1)
    return {"tokens": count, "kl": kl / count, "top1_agreement": top1 / count, "ppl_anybit": math.exp(nll_a / pred),
            "ppl_llama_cpp": math.exp(nll_l / pred)}


def gguf_perplexity(gguf: Path, windows, threads: int = 1) -> float:
    """llama.cpp's perplexity of ``gguf`` on token ``windows`` (definition of :func:`agreement`)."""
    import math

    import torch
    import torch.nn.functional as F

    ll = torch.from_numpy(gguf_logits(gguf, windows, threads))
    nll = sum(float(F.cross_entropy(ll[i, :-1], windows[i, 1:], reduction="sum")) for i in range(windows.shape[0]))
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))
