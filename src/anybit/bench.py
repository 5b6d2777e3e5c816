"""Speed benchmarks behind ``anybit bench``: kernels against ``F.linear`` in the same run,
and end-to-end prefill/decode of a model against its unquantized source.

Times are medians of repeated calls after a warm-up; ratios compare two numbers measured
in the same process, minutes apart, never a stored number.
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels
from .formats import ActSpec, FormatSpec
from .nn import QuantLinear

SMOLLM2_SHAPES = ((576, 576), (576, 1536), (1536, 576))
LLAMA7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
# (format, weight bits, activation bits, weight sym, activation group ("w": the weight group), activation sym)
CASES = (
    [("int", b, 16, False, None, False) for b in (2, 3, 4, 6, 8)]
    + [("pot", b, 16, False, None, False) for b in (2, 3, 4)]
    + [("potz", b, 16, False, None, False) for b in (2, 3)]
    + [("bcq", b, 16, False, None, False) for b in (2, 3)]
    # ABQ-LLM style: asymmetric weights, per-token asymmetric activations
    + [("bitplane", w, a, False, -1, False) for w, a in ((2, 8), (4, 4), (4, 8), (8, 8))]
    # FlexQ style: symmetric weights and activations, activation groups = weight groups
    + [("bitplane", w, a, True, "w", True) for w, a in ((6, 6), (6, 8))]
)


def machine() -> dict:
    import os

    from .kernels import native

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "isa": native.isa() if native.available() else None, "date": datetime.date.today().isoformat()}


def median_time(fn, min_reps: int = 5, min_seconds: float = 0.3, max_reps: int = 200) -> float:
    """Median wall time of ``fn()`` after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(nbytes: int = 1 << 28) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second): the roofline."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), min_reps=5)
    return 2 * nbytes / t / 1e9


def random_module(fmt: str, bits: int, shape: tuple[int, int], group: int, sym: bool, act: ActSpec,
                  gen: torch.Generator) -> QuantLinear:
    """A QuantLinear with random packed tensors of the right layout (timing only)."""
    n, k = shape
    spec = FormatSpec(fmt, bits, group, sym)
    q = QuantLinear(k, n, spec, act=act)
    for name, buf in q.packed().items():
        if buf.dtype == torch.uint8:
            buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, generator=gen))
        else:  # scales, α, offsets: positive, normal float16 values
            buf.copy_((torch.rand(buf.shape, generator=gen) * 0.01 + 1e-3).to(buf.dtype))
    if fmt == "int" and not sym:  # zero points must be valid codes
        codes = torch.randint(0, 1 << bits, (n, q.scales.shape[1]), generator=gen, dtype=torch.uint8)
        from .formats import bitpack

        q.qzeros.copy_(bitpack.pack(codes, bits))
    return q


def packed_bytes(q: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in q.packed().values())


@dataclass
class KernelCase:
    format: str
    bits: int
    abits: int
    shape: tuple[int, int]
    batch: int
    median_s: float
    weight_bytes: int
    fp32_s: float
    bf16_s: float
    op: str = "gemm"

    def to_dict(self) -> dict:
        return {"format": self.format, "op": self.op, "bits": self.bits, "abits": self.abits,
                "shape": list(self.shape), "batch": self.batch, "median_s": self.median_s,
                "weight_bytes": self.weight_bytes, "gb_per_s": self.weight_bytes / self.median_s / 1e9,
                "fp32_median_s": self.fp32_s, "bf16_median_s": self.bf16_s,
                "ratio_vs_fp32": self.fp32_s / self.median_s, "ratio_vs_bf16": self.bf16_s / self.median_s}


def bench_kernels(shapes=SMOLLM2_SHAPES + LLAMA7B_SHAPES, batches=(1, 16), group: int = 128, cases=CASES,
                  dequant: bool = True, progress=None) -> list[dict]:
    """Every case on every shape and batch, with ``F.linear`` fp32/bf16 of the same shape and
    batch measured right before it; plus the dequantize-only kernels (INT vs PoT)."""
    from .kernels import native

    gen = torch.Generator().manual_seed(0)
    out: list[dict] = []
    backend = "native" if native.available() else "reference"
    # time the kernels themselves at every batch, not the dispatch's hand-over to BLAS
    limits = (native.MAX_ROWS, native.MAX_ROWS_BITPLANE)
    native.MAX_ROWS = native.MAX_ROWS_BITPLANE = max(batches)
    for shape in shapes:
        n, k = shape
        w32 = torch.randn(n, k, generator=gen) * 0.02
        w16 = w32.to(torch.bfloat16)
        for batch in batches:
            x32 = torch.randn(batch, k, generator=gen)
            x16 = x32.to(torch.bfloat16)
            fp32_s = median_time(lambda: F.linear(x32, w32))
            bf16_s = median_time(lambda: F.linear(x16, w16))
            for fmt, bits, abits, sym, agroup, asym in cases:
                act = ActSpec(abits, group if agroup == "w" else -1, asym) if abits < 16 else ActSpec()
                q = random_module(fmt, bits, shape, group, sym, act, gen)
                with kernels.use(backend):
                    t = median_time(lambda: q(x32))
                case = KernelCase(fmt, bits, abits, shape, batch, t, packed_bytes(q), fp32_s, bf16_s)
                out.append(case.to_dict())
                if progress:
                    progress(out[-1])
        if dequant and native.available():
            fp32_copy = median_time(lambda: w32.clone())
            # INT: (q − z)·s per weight. PoT: the exponent add per weight ("-add"), or once per
            # group into a register table ("-table", what the GEMV uses). "in-cache": rows
            # dequantized into an L1-resident scratch row (the arithmetic); else into memory.
            for fmt, table in (("int", None), ("pot", False), ("pot", True)):
                for bits in (2, 3, 4):
                    q = random_module(fmt, bits, shape, group, False, ActSpec(), gen)
                    for scratch in (False, True):
                        t = median_time(lambda: native.dequantize(q, scratch_only=scratch, pot_table=table))
                        op = "dequantize" + ("" if table is None else "-table" if table else "-add")
                        case = KernelCase(fmt, bits, 16, shape, 0, t, packed_bytes(q), fp32_copy, fp32_copy,
                                          op=op + ("-in-cache" if scratch else ""))
                        out.append(case.to_dict())
                        if progress:
                            progress(out[-1])
        del w32, w16
        gc.collect()
    native.MAX_ROWS, native.MAX_ROWS_BITPLANE = limits
    return out


@torch.inference_mode()
def bench_decode(model, tokenizer, prompt_tokens: int = 128, new_tokens: int = 64, reps: int = 3) -> dict:
    """Prefill tokens/s (one forward of ``prompt_tokens`` that fills the KV cache) and greedy
    decode tokens/s (``new_tokens`` single-token steps on that cache), medians of ``reps``."""
    from .progress import measure

    vocab = getattr(model.config, "vocab_size", 1000)
    ids = (torch.arange(prompt_tokens)[None] * 7919) % (vocab - 1) + 1

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return t1 - t0, time.perf_counter() - t1

    with measure() as m:
        run()  # warm-up: kernel layouts, allocator
        times = [run() for _ in range(reps)]
    t_prefill = statistics.median(t[0] for t in times)
    t_decode = statistics.median(t[1] for t in times)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"prefill_tokens_per_s": prompt_tokens / t_prefill, "decode_tokens_per_s": new_tokens / t_decode,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "peak_rss_mib": m.peak_rss_mib,
            "weights_mib": weights / 2**20}
