"""Peer tools measured or checked next to anybit (optional extras), and what every peer
check (benchmarks/gguf_check.py, gptq_check.py) shares."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path

import torch
from torch import nn


def check_setup(model_dir: str, dataset: str, seqlen: int, windows: int, threads: int) -> tuple:
    """anybit's model from ``model_dir``, its evaluation windows, and the header of the
    result (machine, date, model, scheme, text and windows)."""
    from .. import bench
    from ..data import eval_windows, load_text
    from ..io import checkpoint

    torch.set_num_threads(threads)
    model, tok = checkpoint.load(model_dir)
    info = getattr(model, "anybit_info", {})
    win = eval_windows(tok, load_text(dataset, "test"), seqlen, windows)
    header = {"machine": bench.machine(), "date": datetime.date.today().isoformat(), "model_dir": model_dir,
              "scheme": info.get("scheme"), "method": info.get("method"), "dataset": dataset,
              "windows": int(win.shape[0]), "seqlen": seqlen}
    return model, win, header


def write_result(res: dict, out: str | None) -> None:
    """Print the result as JSON, and write it to ``out`` if given."""
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def first_line(e: BaseException, limit: int = 300) -> str:
    """A peer's refusal as one line (its message's first)."""
    return (str(e).strip().splitlines() or [repr(e)])[0][:limit]


def dequantized_float(model: nn.Module) -> nn.Module:
    """A copy of anybit's ``model`` with each quantized linear replaced by a float
    ``nn.Linear`` of its dequantized weight: the same function in any dtype, run by plain
    PyTorch (what a peer's result is compared with beside anybit's own)."""
    from ..nn import QuantLinear

    flt = copy.deepcopy(model)
    for name, q in model.named_modules():
        if isinstance(q, QuantLinear):
            parent, _, child = name.rpartition(".")
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(q.dequantize_weight())
                if q.bias is not None:
                    lin.bias.copy_(q.bias)
            setattr(flt.get_submodule(parent), child, lin)
    return flt
