"""Speed benchmarks behind ``anybit bench``: kernels against ``F.linear`` in the same run,
and end-to-end prefill/decode of a model against its unquantized source.

Times are medians of repeated calls after a warm-up; ratios compare two numbers measured
in the same process, minutes apart, never a stored number.

**Cold by default.** In decoding every layer's weights come from memory once per token;
a benchmark that calls one matrix over and over measures it from the last-level cache
whenever it fits there (an INT4 4096x4096 matrix is 8.7 MB, the L3 here 32 MB). Each
kernel case (and each ``F.linear`` baseline) therefore cycles through enough distinct
copies of its matrix that they exceed ``COLD_FACTOR`` x the last-level cache, so that
every call reads its weights from memory; ``hot=True`` (``--hot``) times one matrix.
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


def case_name(case: tuple) -> str:
    """``int3``, ``pot3``, ``bcq2``, ``bitplane6a6``: how ``bench kernels --formats`` names a case."""
    fmt, w, a = case[0], case[1], case[2]
    return f"{fmt}{w}" + (f"a{a}" if a < 16 else "")


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
    """Copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), min_reps=5)
    return 2 * nbytes / t / 1e9


def read_bandwidth(nbytes: int = 1 << 29) -> float:
    """Streaming read bandwidth in GB/s (a sum over ``nbytes`` of float32): the roofline of a
    weight-streaming GEMV, which reads and hardly writes."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    t = median_time(lambda: src.sum(), min_reps=5)
    return nbytes / t / 1e9


COLD_FACTOR = 4
MAX_COPIES = 4096  # bounds the set-up time for tiny matrices


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (from /sys; 32 MiB if it cannot be read)."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or 32 << 20


def copies_for_cold(nbytes: int, hot: bool = False) -> int:
    """How many distinct copies of an ``nbytes`` matrix make every call read from memory."""
    if hot:
        return 1
    return min(MAX_COPIES, max(1, -(-COLD_FACTOR * last_level_cache_bytes() // max(1, nbytes))))


class Cycle:
    """Calls ``fn(item)`` on the next of ``items`` each time (a cold benchmark's rotation).
    Every item is called once on construction: a module's first call prepares its kernel
    layout, which must not land among the timed calls."""

    def __init__(self, items, fn):
        self.items, self.fn, self.i = list(items), fn, 0
        for item in self.items:
            fn(item)

    def __call__(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return self.fn(item)


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
    copies: int = 1  # distinct matrices cycled (1: hot)
    read_gb_per_s: float | None = None

    def to_dict(self) -> dict:
        gbs = self.weight_bytes / self.median_s / 1e9
        return {"format": self.format, "op": self.op, "bits": self.bits, "abits": self.abits,
                "shape": list(self.shape), "batch": self.batch, "median_s": self.median_s,
                "weight_bytes": self.weight_bytes, "gb_per_s": gbs, "copies": self.copies,
                "fraction_of_read_bandwidth": gbs / self.read_gb_per_s if self.read_gb_per_s else None,
                "fp32_median_s": self.fp32_s, "bf16_median_s": self.bf16_s,
                "ratio_vs_fp32": self.fp32_s / self.median_s, "ratio_vs_bf16": self.bf16_s / self.median_s}


def bench_kernels(shapes=SMOLLM2_SHAPES + LLAMA7B_SHAPES, batches=(1, 16), group: int = 128, cases=CASES,
                  dequant: bool = True, progress=None, hot: bool = False, read_gb_per_s: float | None = None,
                  against: tuple[str, ...] = ()) -> list[dict]:
    """Every case on every shape and batch, with ``F.linear`` fp32/bf16 of the same shape and
    batch measured right before it; plus the dequantize-only kernels (INT vs PoT). Cold
    (distinct matrices cycled, see the module docstring) unless ``hot``. ``against``:
    ``("llama.cpp",)`` adds ggml's products on the nearest ggml types, same shapes, batches,
    threads and cold rotation (:mod:`anybit.peers.llama_cpp`)."""
    from .kernels import native

    gen = torch.Generator().manual_seed(0)
    out: list[dict] = []
    backend = "native" if native.available() else "reference"
    # time the kernels themselves at every batch, not the dispatch's hand-over to BLAS
    limits = (native.MAX_ROWS, native.MAX_ROWS_BITPLANE)
    native.MAX_ROWS = native.MAX_ROWS_BITPLANE = max(batches)
    for shape in shapes:
        n, k = shape
        w32 = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(copies_for_cold(4 * n * k, hot))]
        w16 = [w.to(torch.bfloat16) for w in w32[: copies_for_cold(2 * n * k, hot)]]
        for batch in batches:
            x32 = torch.randn(batch, k, generator=gen)
            x16 = x32.to(torch.bfloat16)
            fp32_s = median_time(Cycle(w32, lambda w: F.linear(x32, w)))
            bf16_s = median_time(Cycle(w16, lambda w: F.linear(x16, w)))
            for fmt, bits, abits, sym, agroup, asym in cases:
                act = ActSpec(abits, group if agroup == "w" else -1, asym) if abits < 16 else ActSpec()
                q = random_module(fmt, bits, shape, group, sym, act, gen)
                mods = [q] + [random_module(fmt, bits, shape, group, sym, act, gen)
                              for _ in range(copies_for_cold(packed_bytes(q), hot) - 1)]
                with kernels.use(backend):
                    t = median_time(Cycle(mods, lambda m: m(x32)), min_reps=max(5, 2 * len(mods)))
                case = KernelCase(fmt, bits, abits, shape, batch, t, packed_bytes(q), fp32_s, bf16_s,
                                  copies=len(mods), read_gb_per_s=read_gb_per_s)
                out.append(case.to_dict())
                if progress:
                    progress(out[-1])
                del mods, q
            if "llama.cpp" in against:
                from .peers import llama_cpp

                for row in llama_cpp.kernel_rows(shape, batch, lambda b: copies_for_cold(b, hot), median_time,
                                                 torch.get_num_threads(), read_gb_per_s=read_gb_per_s, fp32_s=fp32_s):
                    out.append(row)
                    if progress:
                        progress(row)
        if dequant and native.available():
            fp32_copy = median_time(Cycle(w32, lambda w: w.clone()))
            # INT: (q − z)·s per weight. PoT: the exponent add per weight ("-add"), or once per
            # group into a register table ("-table", what the GEMV uses). "in-cache": rows
            # dequantized into an L1-resident scratch row (the arithmetic); else into memory.
            for fmt, table in (("int", None), ("pot", False), ("pot", True)):
                for bits in (2, 3, 4):
                    q = random_module(fmt, bits, shape, group, False, ActSpec(), gen)
                    mods = [q] + [random_module(fmt, bits, shape, group, False, ActSpec(), gen)
                                  for _ in range(copies_for_cold(packed_bytes(q), hot) - 1)]
                    for scratch in (False, True):
                        t = median_time(Cycle(mods, lambda m: native.dequantize(m, scratch_only=scratch,
                                                                                  pot_table=table)),
                                        min_reps=max(5, 2 * len(mods)))
                        op = "dequantize" + ("" if table is None else "-table" if table else "-add")
                        case = KernelCase(fmt, bits, 16, shape, 0, t, packed_bytes(q), fp32_copy, fp32_copy,
                                          op=op + ("-in-cache" if scratch else ""), copies=len(mods),
                                          read_gb_per_s=read_gb_per_s)
                        out.append(case.to_dict())
                        if progress:
                            progress(out[-1])
        del w32, w16
        gc.collect()
    native.MAX_ROWS, native.MAX_ROWS_BITPLANE = limits
    return out


@torch.inference_mode()
def bench_decode(model, tokenizer, prompt_tokens: int = 128, new_tokens: int = 64, reps: int = 3,
                 decoder: str = "lean") -> dict:
    """Prefill tokens/s (one forward of ``prompt_tokens`` that fills the KV cache) and greedy
    decode tokens/s (``new_tokens`` single-token steps on that cache), medians of ``reps``.

    ``decoder``: ``lean`` (anybit's :class:`~anybit.nn.decoder.StaticDecoder`, where it
    supports the model) or ``transformers`` (the model's own forward and cache)."""
    from .nn.decoder import StaticDecoder, unsupported
    from .progress import measure

    vocab = getattr(model.config, "vocab_size", 1000)
    ids = (torch.arange(prompt_tokens)[None] * 7919) % (vocab - 1) + 1
    lean = None
    if decoder == "lean" and unsupported(model, prompt_tokens + new_tokens) is None:
        lean = StaticDecoder(model, prompt_tokens + new_tokens)

    def run_lean() -> tuple[float, float]:
        lean.reset()
        t0 = time.perf_counter()
        logits = lean(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            logits = lean(logits[:, -1:].argmax(-1))
        return t1 - t0, time.perf_counter() - t1

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return t1 - t0, time.perf_counter() - t1

    fn = run if lean is None else run_lean
    with measure() as m:
        fn()  # warm-up: kernel layouts, allocator
        times = [fn() for _ in range(reps)]
    t_prefill = statistics.median(t[0] for t in times)
    t_decode = statistics.median(t[1] for t in times)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"decoder": "transformers" if lean is None else "lean" + ("-native" if lean.fast is not None else ""),
            "prefill_tokens_per_s": prompt_tokens / t_prefill, "decode_tokens_per_s": new_tokens / t_decode,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "peak_rss_mib": m.peak_rss_mib,
            "weights_mib": weights / 2**20}
