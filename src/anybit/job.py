"""The pipeline as one object, read top to bottom:

    load model -> calibration data -> quantize (the method transforms each decoder block)
    -> evaluate -> save

``anybit quantize``, ``anybit compare`` (one :class:`Job` per cell) and Python code run the
same steps through :meth:`Job.run`::

    import anybit
    report = anybit.Job("stories260k", anybit.QuantConfig(method="gptq", wbits=4, group_size=32),
                        nsamples=16, seqlen=256, evals=("wikitext2",), out="out/stories-gptq").run()
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import QuantConfig
from .errors import AnybitError


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Job:
    """One run: ``config`` None is the float model (evaluated only, as compare's FP row)."""

    model: str | None = None  # folder, .gguf or built-in name (default smollm2-135m)
    config: QuantConfig | None = None
    # calibration (methods that need data)
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    # evaluation: perplexity on each dataset; KL to the float model on the first one's first windows
    evals: tuple[str, ...] = ()
    eval_seqlen: int | None = None  # default: seqlen
    max_windows: int | None = None
    kl_windows: int = 0
    eval_before: bool = False  # also the float model's perplexity before quantizing
    eval_fallback: bool = False  # a missing default dataset falls back to the bundled text
    # output
    out: str | None = None
    overwrite: bool = False
    measure_size: bool = False  # save to a temporary folder for size and bits per weight (when no out)
    # resume state of calibrated methods: run_dir, or (resume_auto) beside out / in the cache
    run_dir: str | Path | None = None
    resume_auto: bool = False
    fresh: bool = False  # discard a matching saved run
    stream: bool = False  # read one block at a time from the shards, write one shard per block
    progress: bool = True
    log: Callable[[str], None] = _stderr

    # ------------------------------------------------------------------ the steps
    def check(self):
        """Refuse what cannot run, before anything is loaded; returns the method (or None)."""
        if self.config is None:
            return None
        from .methods import get_method, streaming_methods

        method = get_method(self.config.method)
        self.config = method.prepare(self.config)
        self.config.validate()
        method.validate(self.config)
        if self.out and os.path.exists(self.out) and not self.overwrite:
            raise AnybitError(f"output folder {self.out} already exists; choose another --out or pass --overwrite")
        if not self.stream and self._too_big_for_memory():
            if method.streams and self.out is not None:
                self.stream = True
                self.log("anybit: the float model does not fit in the memory available now: streaming it "
                         "block by block (as --stream)" + ("; the float model's perplexity is skipped"
                                                           if self.eval_before else ""))
                self.eval_before = False
            # otherwise the loader refuses it with a one-line error that says what to do
        if self.stream:
            if not method.streams:
                raise AnybitError(f"--stream: {self.config.method} needs the whole model at once; drop --stream "
                                  "(streaming methods: " + ", ".join(streaming_methods()) + ")")
            if self.out is None:
                raise AnybitError("--stream writes a quantized folder; give --out DIR")
            if self.eval_before:
                raise AnybitError("--stream never holds the float model whole: no perplexity before quantizing")
        return method

    def _too_big_for_memory(self) -> bool:
        """Whether the float model (a local safetensors folder) is larger than the memory
        available now."""
        from .models.loader import BUILTIN, memory_shortfall, resolve_builtin

        if self.model is None:
            return False
        try:
            folder = resolve_builtin(self.model.lower()) if self.model.lower() in BUILTIN else Path(self.model)
        except AnybitError:
            return False  # the loader says what is missing
        if not folder.is_dir():
            return False
        cfg = folder / "config.json"
        if cfg.is_file() and "quantization_config" in cfg.read_text(errors="replace"):
            return False  # a quantized folder loads memory-mapped
        return memory_shortfall(folder) is not None

    def load(self):
        """The model and tokenizer (a :class:`anybit.models.LoadedModel`)."""
        from .models import DEFAULT_MODEL, load_model
        from .pipeline import check_finite

        name = self.model or DEFAULT_MODEL
        if not self.stream:
            lm = load_model(name)
            check_finite(lm.model)
            return lm
        from .models.lazy import load_lazy
        from .models.loader import BUILTIN, LoadedModel, _gguf_cache_folder, resolve_builtin

        src = Path(resolve_builtin(name.lower()) if name.lower() in BUILTIN else name)
        if src.suffix == ".gguf":  # GGUF sources stream from their converted float folder
            src = _gguf_cache_folder(src)
            if not (src / "config.json").is_file():
                raise AnybitError(f"{name} has no converted float folder yet; run `anybit eval {name}` "
                                  "(or any command without --stream) once, then --stream")
        lm = load_lazy(src)  # streaming checks each block as it is read
        return LoadedModel(lm.model, lm.tokenizer, name if name.lower() in BUILTIN else str(src))

    def eval_sets(self, tokenizer) -> list[tuple]:
        """(text, windows) of every evaluation dataset."""
        from .data import eval_windows, load_text

        sets = []
        for name in self.evals:
            text = load_text(name, "test", fallback=self.eval_fallback)
            sets.append((text, eval_windows(tokenizer, text, self.eval_seqlen or self.seqlen, self.max_windows)))
        return sets

    def calibration(self, tokenizer, eval_texts) -> tuple:
        """(windows, description) of the calibration data."""
        from .data import calibration_windows, load_text

        text = load_text(self.calib, "train", fallback=self.calib == "c4")
        if any(text.identity == t.identity for t in eval_texts):
            raise AnybitError(f"calibration text {text.description} is the evaluation text; calibrate on another source")
        seed = self.config.seed
        return calibration_windows(tokenizer, text, self.nsamples, self.seqlen, seed), {
            "source": text.description, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": seed}

    def resume_dir(self, model, calib) -> Path | None:
        """Where the calibrated method keeps its progress (see ``--resume-dir``)."""
        from .models.loader import cache_dir
        from .pipeline import run_key

        if self.run_dir is not None:
            path = Path(self.run_dir)
        elif not self.resume_auto:
            return None
        elif self.out:
            out = Path(self.out)
            path = out.with_name(f".{out.name}.partial")
        else:
            path = cache_dir() / "runs" / run_key(model, self.config, calib)
        if self.fresh:
            shutil.rmtree(path, ignore_errors=True)
        elif (path / "progress.json").is_file():
            self.log(f"anybit: resuming from {path} (--no-resume to start over)")
        return path

    def evaluate(self, model, sets, report: dict, key: str, kl_reference: Callable | None = None) -> None:
        """Perplexity on every set into ``report[key]`` (and KL on the first set's first windows)."""
        from .eval import perplexity

        if not sets:
            return
        results = {}
        for i, (text, windows) in enumerate(sets):
            if i == 0 and kl_reference is not None and self.kl_windows > 0:
                ref = kl_reference()
                kl = perplexity(model, windows[: self.kl_windows], dataset=text.name, reference=ref, progress=False)
                report["kl"], report["kl_tokens"] = kl.kl, kl.tokens
                del ref
            res = perplexity(model, windows, dataset=text.name, progress=self.progress)
            results[text.name] = res.to_dict()
            self.log(f"anybit: {key}: {res.summary()}")
        report[key] = results

    # ------------------------------------------------------------------ top to bottom
    def run(self) -> dict:
        """Run every step; returns the report (what each step measured)."""
        from . import quantize, save
        from .io import inspect
        from .models import load_model
        from .progress import measure

        from .models import get_adapter

        method = self.check()
        with measure() as m_load:
            lm = self.load()
        self.log(f"anybit: loaded {lm.source} in {m_load.seconds:.1f} s")
        report: dict = {"model": lm.source, "load_seconds": m_load.seconds}
        sets = self.eval_sets(lm.tokenizer)
        if self.config is None:  # the float model
            self.evaluate(lm.model, sets, report, "after")
            return report
        report.update(method=self.config.method, scheme=self.config.scheme)
        calib = None
        if method.uses_calibration(self.config):
            calib, report["calibration"] = self.calibration(lm.tokenizer, [t for t, _ in sets])
            c = report["calibration"]
            self.log(f"anybit: calibration {c['source']}: {c['nsamples']} x {c['seqlen']} tokens, seed {c['seed']}")
        run_dir = self.resume_dir(lm.model, calib) if calib is not None else None
        if self.eval_before:
            self.evaluate(lm.model, sets, report, "before")
        sharded = None
        if self.stream:  # each finished block goes to its shard and leaves memory
            from .io.checkpoint import ShardedSave

            sharded = ShardedSave(self.out, len(get_adapter(lm.model).get_blocks(lm.model)), overwrite=self.overwrite)
            lm.model.anybit_lazy.sink = sharded.write_block
        try:
            with measure() as m_q:
                quantize(lm.model, self.config, calib, progress=self.progress, run_dir=run_dir)
        except BaseException:
            if sharded is not None:
                sharded.abort()
            raise
        info = lm.model.anybit_info
        report.update(quantize_seconds=m_q.seconds, quantize_cpu_seconds=m_q.cpu_seconds,
                      quantize_peak_rss_mib=m_q.peak_rss_mib)
        if info.get("resumed_after_s") is not None:  # a resumed run: its earlier time counts too
            report.update(quantize_seconds=m_q.seconds + info["resumed_after_s"],
                          quantize_cpu_seconds=m_q.cpu_seconds + info.get("resumed_after_cpu_s", 0.0), resumed=True)
        for key in ("blocks", "sensitivity"):  # what the method found (per-block training, FlexQ's A8 layers)
            if info.get(key):
                report[key] = info[key]
        self.log(f"anybit: quantized ({self.config.method} {self.config.scheme}) in {m_q.seconds:.1f} s, "
                 f"peak RSS {m_q.peak_rss_mib:.0f} MiB")
        info["source"] = lm.source
        if sharded is not None:  # streamed: the blocks are on disk only; evaluate the saved model
            out = sharded.finish(lm.model, lm.tokenizer)
            report["out"] = str(out)
            report["size"] = inspect(out)
            self.log(f"anybit: saved {out}")
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            if sets:
                del lm
                self.evaluate(load_model(str(out)).model, sets, report, "after")
            return report
        self.evaluate(lm.model, sets, report, "after", kl_reference=lambda: load_model(self.model).model)
        if self.out:
            out = save(lm.model, lm.tokenizer, self.out, overwrite=self.overwrite)
            report["out"] = str(out)
            report["size"] = inspect(out)
            self.log(f"anybit: saved {out}")
        elif self.measure_size:
            tmp = Path(tempfile.mkdtemp(prefix="anybit-job-"))
            try:
                report["size"] = inspect(save(lm.model, lm.tokenizer, tmp / "q"))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        return report
