"""anybit: post-training quantization of LLMs to any bit width.

Python API::

    import anybit
    lm = anybit.load_model("stories260k")
    anybit.quantize(lm.model, anybit.QuantConfig(method="rtn", wbits=4, group_size=32))
    print(anybit.evaluate(lm.model, lm.tokenizer, "wikitext2", seqlen=256).ppl)
    anybit.save(lm.model, lm.tokenizer, "out/stories-w4")
    model, tokenizer = anybit.load("out/stories-w4")
    # or, in code that uses transformers:
    model = transformers.AutoModelForCausalLM.from_pretrained("out/stories-w4")
"""

from __future__ import annotations

from .config import QuantConfig, Scheme, parse_scheme
from .errors import AnybitError
from .eval import EvalResult, generate
from .io import inspect, load, save
from .job import Job
from .models import load_model
from .pipeline import quantize

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    # after `import anybit`, transformers' from_pretrained loads anybit folders
    from .io.hf_quantizer import register

    register()


_register_with_transformers()


def evaluate(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
             reference=None, progress: bool = True, fallback: bool = False) -> EvalResult:
    """Perplexity (GPTQ protocol) on ``dataset`` (a name or a .txt/.jsonl path), and KL
    against ``reference`` (an unquantized model) if given."""
    from .data import eval_windows, load_text
    from .eval import perplexity

    text = load_text(dataset, "test", fallback=fallback)
    windows = eval_windows(tokenizer, text, seqlen, max_windows)
    return perplexity(model, windows, dataset=text.name, reference=reference, progress=progress)


__all__ = ["AnybitError", "EvalResult", "Job", "QuantConfig", "Scheme", "evaluate", "generate", "inspect", "load",
           "load_model", "parse_scheme", "quantize", "save", "__version__"]
