"""The sequential calibration pipeline shared by every calibrated method (GPTQ, GPTQT,
PoTPTQ, ABQ-LLM, ...).

1. Capture the inputs of decoder block 0 for the calibration windows (and the keyword
   arguments the model passes to its blocks: rotary embeddings, masks).
2. Block by block: the method transforms block ``i`` given its inputs (the outputs of the
   already-quantized blocks before it); the quantized block's outputs become the inputs
   of block ``i+1``.
3. After each block, the block's state and the next inputs are saved to a run folder, so
   that an interrupted run (Ctrl-C, kill, crash) resumes at the next block with the same
   result as an uninterrupted one.

Activations stay on the CPU. When they would exceed ``ANYBIT_ACT_BUDGET_GIB`` (default
4 GiB) they are kept in memory-mapped files inside the run folder instead of RAM. On a
streaming model (models/lazy.py) each block is read from disk when reached and, once its
step is saved, handed to the model's sink and dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..formats import ActSpec, FormatSpec
from ..models import Adapter
from ..nn import QuantLinear
from ..progress import bar, cpu_seconds
from .base import LayerReport, MethodResult

DEFAULT_BATCH = 4


class _Captured(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering a block, ``[n, seqlen, hidden]``, and the block kwargs.

    With ``fp_chain`` (ABQ-LLM's loss), also the inputs the block would get in the float
    model (``fp_hidden``) and the float block's outputs on them (``fp_out``, the next
    block's ``fp_hidden``).
    """

    hidden: torch.Tensor
    kwargs: dict
    fp_hidden: torch.Tensor | None = None
    fp_out: torch.Tensor | None = None


def _act_budget_bytes() -> int:
    return int(float(os.environ.get("ANYBIT_ACT_BUDGET_GIB", "4")) * 2**30)


def alloc_acts(shape: tuple[int, ...], run_dir: Path | None, name: str) -> torch.Tensor:
    """A float32 activation buffer: in RAM within the budget, else memory-mapped in ``run_dir``."""
    nbytes = 4 * int(torch.Size(shape).numel())
    if run_dir is None or nbytes <= _act_budget_bytes():
        return torch.empty(shape, dtype=torch.float32)
    path = run_dir / f"{name}.mmap"
    return torch.from_file(str(path), shared=True, size=int(torch.Size(shape).numel()),
                           dtype=torch.float32).view(shape)


def block_forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict, out: torch.Tensor | None = None,
                  batch: int = DEFAULT_BATCH) -> torch.Tensor:
    """Run ``block`` over all windows in batches; writes into ``out`` if given."""
    n = hidden.shape[0]
    if out is None:
        out = torch.empty_like(hidden)
    with torch.no_grad():
        for s in range(0, n, batch):
            y = block(hidden[s: s + batch], **kwargs)
            out[s: s + batch] = y[0] if isinstance(y, tuple) else y
    return out


def capture_inputs(model: nn.Module, adapter: Adapter, windows: torch.Tensor, run_dir: Path | None,
                   batch: int = DEFAULT_BATCH) -> BlockInputs:
    """Inputs of block 0 for every calibration window (the model is run up to block 0)."""
    blocks = adapter.get_blocks(model)
    first = blocks[0]
    n, seqlen = windows.shape
    hidden = alloc_acts((n, seqlen, model.config.hidden_size), run_dir, "acts_a")
    store: dict = {}

    class Catcher(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, *args, **kwargs):
            store["x"] = x
            if "kwargs" not in store:
                store["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
                store["args"] = args
            raise _Captured

    blocks[0] = Catcher(first)
    try:
        with torch.no_grad():
            for s in range(0, n, batch):
                try:
                    model(windows[s: s + batch], use_cache=False)
                except _Captured:
                    pass
                hidden[s: s + batch] = store["x"]
    finally:
        blocks[0] = first
    if store.get("args"):
        raise RuntimeError("decoder blocks receive positional arguments beyond the hidden states; adapter needed")
    return BlockInputs(hidden, store["kwargs"])


def block_generator(seed: int, block: int, epoch: int = 0) -> torch.Generator:
    """A random stream that depends only on (seed, block, epoch), so that a run resumed at
    block i draws what an uninterrupted run draws there."""
    return torch.Generator().manual_seed((seed * 1_000_003 + block) * 1_009 + epoch)


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class InjectedCrash(BaseException):
    """Raised by the fault-injection hook (tests): a crash at one write point."""


# test hook: crash at the N-th write point of a run (counted from 0 over the process)
_write_points = {"n": 0}


def _write_point() -> None:
    n = _write_points["n"]
    _write_points["n"] = n + 1
    at = os.environ.get("ANYBIT_TEST_CRASH_AT_WRITE")
    if at is not None and n == int(at):
        raise InjectedCrash(f"injected crash at write point {n}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunFolder:
    """Progress of a sequential run: per-block states and the current activations.

    Layout: ``progress.json`` (fingerprint, blocks done, layer specs and reports, and the
    name of the activation file of that step), ``block_{i}.safetensors`` (state of quantized
    block i), ``acts_{i}.safetensors`` (inputs of block i). Crash consistency: every file is
    written under a temporary name, fsynced and renamed; a step's files are complete before
    ``progress.json`` names them, and a step never overwrites a file the previous
    ``progress.json`` names. A kill at any instruction therefore leaves the old step or the
    new one, never a mixture (tests/methods/test_resume.py kills at every write point).
    """

    def __init__(self, path: Path, key: str):
        self.path = path
        self.key = key

    def _progress_file(self) -> Path:
        return self.path / "progress.json"

    def load_progress(self) -> dict | None:
        try:
            prog = json.loads(self._progress_file().read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(prog, dict) or prog.get("key") != self.key:
            return None
        needed = [f"block_{i}.safetensors" for i in range(int(prog.get("done", 0)))] + [prog.get("acts", "")]
        if not all((self.path / f).is_file() for f in needed):
            return None  # a folder from another version, or damaged: start over
        return prog

    def reset(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def _atomic_write(self, name: str, write) -> None:
        tmp = self.path / f".{name}.tmp"
        _write_point()
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _write_point()
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)
        _write_point()

    def _atomic_save(self, tensors: dict, name: str) -> None:
        self._atomic_write(name, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))

    def save_block(self, i: int, block: nn.Module, hidden_next: torch.Tensor, progress: dict,
                   fp_next: torch.Tensor | None = None) -> None:
        """Step i: block i's state, the inputs of block i + 1, then the progress naming them."""
        self._atomic_save(block.state_dict(), f"block_{i}.safetensors")
        acts = {"hidden": hidden_next} if fp_next is None else {"hidden": hidden_next, "fp_hidden": fp_next}
        name = f"acts_{i + 1}.safetensors"
        self._atomic_save(acts, name)
        text = json.dumps({**progress, "acts": name})
        self._atomic_write("progress.json", lambda tmp: tmp.write_text(text))
        old = self.path / f"acts_{i}.safetensors"  # the previous step's inputs: no longer named
        if old.exists():
            old.unlink()
        _write_point()

    def load_block(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / f"block_{i}.safetensors"))

    def load_acts(self, prog: dict) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / prog["acts"]))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _restore_block(block: nn.Module, block_prefix: str, layers: dict, state: dict) -> None:
    for full, spec_d in layers.items():
        if not full.startswith(block_prefix + "."):
            continue
        lname = full[len(block_prefix) + 1:]
        lin = block.get_submodule(lname)
        spec = FormatSpec.from_dict(spec_d)
        if not isinstance(lin, QuantLinear):
            q = QuantLinear(lin.in_features, lin.out_features, spec, bias=lin.bias is not None, dtype=lin.weight.dtype,
                            act=ActSpec.from_layer(spec_d))
            block.set_submodule(lname, q)
    block.load_state_dict(state)


# returns the block's layer reports, or (reports, statistics of the block's training)
BlockFn = Callable[[int, nn.Module, BlockInputs, Callable[[nn.Module], BlockInputs]],
                   "list[LayerReport] | tuple[list[LayerReport], dict]"]


def run_sequential(model: nn.Module, adapter: Adapter, windows: torch.Tensor, process_block: BlockFn,
                   run_dir: Path | None, key: str, desc: str, progress: bool = True,
                   batch: int = DEFAULT_BATCH, fp_chain: bool = False) -> MethodResult:
    """Drive ``process_block(i, block, inputs, forward)`` over the decoder blocks in order.

    ``process_block`` quantizes ``block`` in place (replacing linears by QuantLinear) and
    returns its layer reports (and optionally a dict of statistics of the block, collected
    in ``result.extra["blocks"]``); ``forward(block)`` recomputes a block's outputs on the
    current inputs when the method needs them. With ``run_dir``, progress is saved after
    every block and a previous run with the same ``key`` resumes. With ``fp_chain`` the
    float model's activations are carried along too (:class:`BlockInputs`).
    """
    blocks = adapter.get_blocks(model)
    result = MethodResult()
    folder = RunFolder(run_dir, key) if run_dir is not None else None
    prog = folder.load_progress() if folder is not None else None
    if folder is not None and prog is None:
        folder.reset()
    inputs = capture_inputs(model, adapter, windows, run_dir if folder else None, batch)
    start = 0
    layers: dict = {}
    lazy = getattr(model, "anybit_lazy", None)  # streaming: blocks are read from disk when reached
    if prog is not None:
        start = prog["done"]
        layers = prog["layers"]
        for i in range(start):
            if lazy is not None:
                lazy.materialize(blocks[i], f"{adapter.blocks}.{i}")
            _restore_block(blocks[i], f"{adapter.blocks}.{i}", layers, folder.load_block(i))
            if lazy is not None:
                lazy.block_done(f"{adapter.blocks}.{i}", blocks[i])
        result.layers = [LayerReport(r["name"], FormatSpec.from_dict(r["spec"]), r["error"]) for r in prog["reports"]]
        if prog.get("blocks"):
            result.extra["blocks"] = prog["blocks"]
        # wall and CPU time the earlier process(es) spent on the blocks already done
        result.extra["resumed_after_s"] = float(prog.get("elapsed_s", 0.0))
        result.extra["resumed_after_cpu_s"] = float(prog.get("cpu_s", 0.0))
    where = run_dir if folder else None
    if fp_chain:
        inputs.fp_hidden = alloc_acts(tuple(inputs.hidden.shape), where, "acts_fp_a")
        inputs.fp_hidden.copy_(inputs.hidden)
        inputs.fp_out = alloc_acts(tuple(inputs.hidden.shape), where, "acts_fp_b")
    if prog is not None and start < len(blocks):
        acts = folder.load_acts(prog)
        inputs.hidden.copy_(acts["hidden"])
        if fp_chain:
            inputs.fp_hidden.copy_(acts["fp_hidden"])
    spare = alloc_acts(tuple(inputs.hidden.shape), where, "acts_b")
    it = bar(range(start, len(blocks)), desc=desc, total=len(blocks), enabled=progress, unit="block", initial=start)
    kill_after = int(os.environ.get("ANYBIT_TEST_KILL_AFTER_BLOCK", "-1"))  # test hook: simulate a crash
    t_start, before = time.perf_counter(), float(prog.get("elapsed_s", 0.0)) if prog else 0.0
    c_start, cpu_before = cpu_seconds(), float(prog.get("cpu_s", 0.0)) if prog else 0.0
    for i in it:
        block = blocks[i]
        if lazy is not None:
            lazy.materialize(block, f"{adapter.blocks}.{i}")
        if fp_chain:  # the float block's outputs, before the method changes it
            block_forward(block, inputs.fp_hidden, inputs.kwargs, out=inputs.fp_out, batch=batch)
        reports = process_block(i, block, inputs, lambda b: block_forward(b, inputs.hidden, inputs.kwargs, batch=batch))
        postfix = None
        if isinstance(reports, tuple):  # (reports, statistics of the block's training)
            reports, stats = reports
            postfix = stats.pop("postfix", None)
            result.extra.setdefault("blocks", []).append({"block": i, **stats})
        result.layers.extend(reports)
        if postfix:
            it.set_postfix_str(postfix, refresh=False)
        elif reports:
            worst = max(reports, key=lambda r: r.error)
            it.set_postfix(err=f"{sum(r.error for r in reports) / len(reports):.2e}",
                           worst=worst.name.split(".")[-1], refresh=False)
        block_forward(block, inputs.hidden, inputs.kwargs, out=spare, batch=batch)
        inputs.hidden, spare = spare, inputs.hidden
        if fp_chain:
            inputs.fp_hidden, inputs.fp_out = inputs.fp_out, inputs.fp_hidden
        if folder is not None:
            for lname, m in block.named_modules():
                if isinstance(m, QuantLinear):
                    layers[f"{adapter.blocks}.{i}.{lname}"] = {**m.spec.to_dict(), "act": m.act.to_dict()}
            folder.save_block(i, block, inputs.hidden, {
                "key": key, "done": i + 1, "layers": layers,
                "reports": [{"name": r.name, "spec": r.spec.to_dict(), "error": r.error} for r in result.layers],
                "blocks": result.extra.get("blocks", []),
                "elapsed_s": before + time.perf_counter() - t_start,
                "cpu_s": cpu_before + cpu_seconds() - c_start},
                fp_next=inputs.fp_hidden if fp_chain else None)
        if lazy is not None:
            lazy.block_done(f"{adapter.blocks}.{i}", block)
        if i == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return result
