"""Perplexity as GPTQ defines it (SPEC §1) and KL divergence against a reference model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import bar

# positions per chunk when comparing logit distributions (bounds memory at vocab 49k)
_KL_CHUNK = 512


@dataclass
class EvalResult:
    dataset: str
    seqlen: int
    windows: int
    tokens: int
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    kl: float | None = None  # mean KL(P_ref || P_model) per token (nats), if a reference was given
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{self.dataset}: seqlen {self.seqlen}, {self.windows} windows, {self.tokens} tokens: "
             f"ppl {self.ppl:.4f}")
        if self.kl is not None:
            s += f", KL {self.kl:.5f}"
        return s


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits.float()


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(P_ref || P) for ``[T, V]`` logits."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, logits.shape[0], _KL_CHUNK):
        lp_ref = F.log_softmax(ref_logits[i:i + _KL_CHUNK], -1)
        lp = F.log_softmax(logits[i:i + _KL_CHUNK], -1)
        total += (lp_ref.exp() * (lp_ref - lp)).sum().double()
    return total


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, dataset: str = "", reference: nn.Module | None = None,
               progress: bool = True) -> EvalResult:
    """GPTQ's perplexity over ``windows [n, seqlen]``; with ``reference``, also mean KL.

    As in GPTQ's ``llama_eval``: per window the mean next-token loss times ``seqlen`` is
    accumulated, and ``ppl = exp(Σ nll / (n·seqlen))``.
    """
    import time

    t0 = time.perf_counter()
    n, seqlen = windows.shape
    nll_sum = 0.0
    kl_sum = torch.zeros((), dtype=torch.float64)
    it = bar(range(n), desc=f"eval {dataset}", total=n, enabled=progress, unit="win")
    for i in it:
        ids = windows[i: i + 1]
        logits = _logits(model, ids)[0]
        loss = F.cross_entropy(logits[:-1], ids[0, 1:])
        nll_sum += loss.item() * seqlen
        if reference is not None:
            kl_sum += _kl(_logits(reference, ids)[0], logits)
        it.set_postfix(ppl=f"{math.exp(nll_sum / ((i + 1) * seqlen)):.3f}", refresh=False)
    nll = nll_sum / (n * seqlen)
    kl = float(kl_sum) / (n * seqlen) if reference is not None else None
    return EvalResult(dataset=dataset, seqlen=seqlen, windows=n, tokens=n * seqlen, ppl=math.exp(nll), nll=nll,
                      kl=kl, seconds=time.perf_counter() - t0)


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, decoder: str = "lean") -> str:
    """Greedy decoding; returns the prompt followed by the generated text.

    ``decoder``: ``lean`` (:class:`~anybit.nn.decoder.StaticDecoder`, where it supports the
    model; else transformers) or ``transformers`` (``model.generate``). A prompt plus
    ``max_new_tokens`` beyond the model's context is an error, not a silent overrun.
    """
    from ..errors import AnybitError
    from ..nn.decoder import StaticDecoder, unsupported

    enc = tokenizer(prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n + max_new_tokens > limit:
        raise AnybitError(f"the prompt ({n} tokens) plus --max-new-tokens {max_new_tokens} exceed the model's context of "
                          f"{limit} tokens; ask for at most {max(limit - n, 0)} new tokens")
    if decoder == "lean" and unsupported(model, n + max_new_tokens) is None:
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        out = StaticDecoder(model, n + max_new_tokens).generate(enc["input_ids"], max_new_tokens,
                                                                 eos if eos is not None else tokenizer.eos_token_id)
    else:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
