"""The ``anybit`` command: quantize, eval, generate, inspect.

Bad input ends with one line ``anybit: error: ...`` on stderr and exit code 2; an
interrupted run exits 130. Progress goes to stderr; ``--json`` output to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from .errors import AnybitError

DEFAULT_QUICK_WINDOWS = 16


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise AnybitError(f"{message} (see `{self.prog} --help`)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="shared data folder (models/ and corpora/); default ../shared/data or $ANYBIT_DATA")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--kernel", default=None, help="kernel backend: auto (default) or reference")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-verify", action="store_true",
                   help="load anybit folders without checking their recorded sha256")


def _method_flags() -> dict[str, str]:
    """argparse dest -> option key of every method flag (methods/options.py ``flag``)."""
    from .methods import METHODS

    return {f"opt_{info.key}": info.key for m in METHODS.values() for info in m.options_cls.describe() if info.flag}


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per method option that declares one; a flag several methods share (--epochs)
    is one argument whose help names them all."""
    import typing

    from .methods import METHODS

    flags: dict[str, tuple] = {}
    for name, m in METHODS.items():
        for info in m.options_cls.describe():
            if info.flag:
                prev = flags.setdefault(info.flag, (info, [], []))
                if prev[0].key != info.key:  # a programming error in a method's options
                    raise RuntimeError(f"{info.flag} means {prev[0].key} and {info.key}")
                prev[1].append(name)
                if info.help not in prev[2]:
                    prev[2].append(info.help)
    for flag, (info, names, helps) in flags.items():
        text = f"{'/'.join(names)}: " + " / ".join(helps)
        if info.type is bool:
            p.add_argument(flag, dest=f"opt_{info.key}", action="store_const", const=not info.default, default=None,
                           help=text)
            continue
        default = info.default if not isinstance(info.default, tuple) else "/".join(map(str, info.default))
        if default is not None:
            text += f" (default {default})"
        args = [a for a in typing.get_args(info.type) if a is not type(None)]
        base = args[0] if args and typing.get_origin(info.type) is not tuple else info.type
        p.add_argument(flag, dest=f"opt_{info.key}", default=None, help=text, metavar=info.key.upper(),
                       type=base if base in (int, float) else str,
                       choices=list(info.choices) if info.choices else None)


def _method_options_epilog() -> str:
    """Every method's options (``--option KEY=VALUE``; in compare ``method:KEY=VALUE``)."""
    from .methods import METHODS

    lines = ["method options (--option KEY=VALUE; compare: METHOD:KEY=VALUE; an unknown key is an error):"]
    for name, m in METHODS.items():
        infos = m.options_cls.describe()
        if not infos:
            lines.append(f"  {name}: none")
            continue
        parts = []
        for i in infos:
            d = i.default
            d = ("/".join(map(str, d)) if isinstance(d, tuple) else "auto" if d is None
                 else str(d).lower() if isinstance(d, bool) else d)
            parts.append(f"{i.key}={d}" + (f" ({'|'.join(map(str, i.choices))})" if i.choices else ""))
        lines += textwrap.wrap(", ".join(parts), 100, initial_indent=f"  {name}: ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="anybit", description="Post-training quantization of LLMs to any bit width.")
    parser.add_argument("--version", action="version", version=f"anybit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model (and save it, or print ppl before/after)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_method_options_epilog())
    q.add_argument("model", nargs="?", default=None, help="model folder, .gguf, or smollm2-135m (default) / stories260k")
    q.add_argument("--method", default="rtn")
    q.add_argument("--scheme", help="e.g. W4A16G128, W3A16, W6A6 (sets --wbits/--abits/--group-size)")
    q.add_argument("--wbits", type=int, default=None)
    q.add_argument("--abits", type=int, default=None)
    q.add_argument("--group-size", type=int, default=None, help="-1 = per output channel (default 128)")
    q.add_argument("--sym", action="store_true", help="symmetric weights (default asymmetric)")
    q.add_argument("--skip", action="append", default=[], help="regex of layers to keep in float (repeatable)")
    q.add_argument("--stream", action="store_true",
                   help="models larger than memory: read one decoder block at a time from the safetensors shards "
                        "and write each finished block to its own output shard (every method but flexq); peak "
                        "memory about one float block plus embeddings, head and calibration activations")
    q.add_argument("--lm-head-bits", type=int, default=0,
                   help="also quantize the output head with RTN at this many bits (default 0: keep it float)")
    q.add_argument("--act-group-size", type=int, default=None,
                   help="activations: -1 per token (default) or the weight group size (per token group)")
    q.add_argument("--act-sym", action="store_true", help="symmetric activations (default asymmetric)")
    q.add_argument("--bit-balance", action="store_true", help="ABQ-LLM bit balance at 1-2 bits (same as W2* in --scheme)")
    _add_method_flags(q)
    q.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any method option (value parsed as JSON, else a string), e.g. --option kl=none; repeatable")
    q.add_argument("--resume-dir", default=None,
                   help="where calibrated methods save progress after each block (default: beside --out, "
                        "else in ~/.cache/anybit/runs); re-running the same command resumes from it")
    q.add_argument("--no-resume", action="store_true", help="start over even if a saved run matches")
    q.add_argument("--calib", default="c4", help="calibration text: c4 (default), wikitext2, ptb or a .txt/.jsonl path")
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    q.add_argument("--eval", nargs="?", const="wikitext2", default=None,
                   help="print perplexity before and after on this text (default without --out: wikitext2)")
    q.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: --seqlen)")
    q.add_argument("--max-windows", type=int, default=None,
                   help=f"evaluation windows (default without --out: {DEFAULT_QUICK_WINDOWS}; with --eval: all)")
    q.add_argument("--json", action="store_true", help="print one JSON object with the results")
    _add_common(q)

    e = sub.add_parser("eval", help="perplexity (and KL against a reference model)")
    e.add_argument("model", nargs="?", default=None, help="quantized folder, model folder, .gguf or built-in name")
    e.add_argument("--dataset", default=None, help="wikitext2 (default), ptb, c4 or a .txt/.jsonl path")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--kl-against", default=None, help="reference (unquantized) model for KL divergence")
    e.add_argument("--json", action="store_true")
    _add_common(e)

    g = sub.add_parser("generate", help="greedy generation")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--decoder", default="lean", choices=["lean", "transformers"],
                   help="lean: anybit's static-cache decoder (default); transformers: model.generate")
    _add_common(g)

    x = sub.add_parser(
        "export", help="write a quantized folder in another tool's layout (gptq, gguf)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="targets:\n"
                    "  gptq  GPTQ checkpoint layout (GPTQModel, transformers/optimum, vLLM): INT weight-only,\n"
                    "        2/3/4/8 bits, any group size; a folder\n"
                    "  gguf  llama.cpp: llama/mistral, INT weight-only at group 32 written exactly as\n"
                    "        Q4_0 (4-bit sym), Q4_1 (4-bit), Q5_0 (5-bit sym), Q5_1 (5-bit), Q8_0 (8-bit sym);\n"
                    "        norms and embeddings F32; one file\n"
                    "  compressed-tensors  llm-compressor / vLLM (pack-quantized): INT weight-only, 2-8 bits, per\n"
                    "        channel or groups dividing K; a folder\n"
                    "other grids and formats are refused with the nearest exact scheme")
    x.add_argument("path")
    x.add_argument("--format", default="gptq", choices=["gptq", "gguf", "compressed-tensors"])
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--checkpoint-format", default="auto", choices=["auto", "gptq", "gptq_v2"],
                   help="gptq target only: v1 (`gptq`: every GPTQ reader) or GPTQModel's `gptq_v2` (zero points "
                        "stored as they are; the only asymmetric layout GPTQModel loads from other tools); "
                        "auto: v1 if symmetric, else v2")

    b = sub.add_parser("bench", help="speed: kernels against F.linear, or a model end to end")
    bsub = b.add_subparsers(dest="what", required=True, parser_class=_Parser)
    bk = bsub.add_parser("kernels", help="every format and bit width on SmolLM2-135M and Llama-2-7B linear shapes")
    bk.add_argument("--shapes", default="all", choices=["smollm2", "llama7b", "all"])
    bk.add_argument("--batches", default="1,16", help="comma-separated activation rows (default 1,16)")
    bk.add_argument("--group-size", type=int, default=128)
    bk.add_argument("--json", action="store_true", help="print one JSON list, one object per case")
    bk.add_argument("--against", default=None, choices=["llama.cpp"],
                    help="also time the peer's kernels in the same run (llama.cpp: ggml's products on the nearest "
                         "ggml types; needs pip install -e '.[bench]')")
    bk.add_argument("--formats", default=None,
                    help="comma-separated subset of the cases, e.g. int3,pot3,bcq3,bitplane6a6 (default: all)")
    bk.add_argument("--hot", action="store_true",
                    help="time one matrix per case (it may stay in cache); default: cycle distinct matrices "
                         "totalling 4x the last-level cache, so that every call reads its weights from memory")
    _add_common(bk)
    be = bsub.add_parser("e2e", help="prefill and decode tokens/s and memory against the unquantized model")
    be.add_argument("model", help="quantized folder (or any model) to measure")
    be.add_argument("--baseline", default=None,
                    help="unquantized model to compare with (default: the source recorded in the quantized folder)")
    be.add_argument("--prompt-tokens", type=int, default=128)
    be.add_argument("--new-tokens", type=int, default=64)
    be.add_argument("--reps", type=int, default=3)
    be.add_argument("--rounds", type=int, default=3,
                    help="measure every model this many times, alternating, and report medians (default 3)")
    be.add_argument("--json", action="store_true")
    be.add_argument("--decoder", default="lean", choices=["lean", "transformers"],
                    help="lean: anybit's static-cache decoder (one native call per token where every linear has "
                         "an int8 kernel; default); transformers: the model's own forward")
    be.add_argument("--against", default=None, choices=["llama.cpp"],
                    help="also run llama.cpp on the source GGUF re-quantized to the nearest llama.cpp types "
                         "(same threads, prompt and generation lengths; needs the [bench] extra)")
    be.add_argument("--llama-source", default=None,
                    help="GGUF of the baseline for --against llama.cpp when the baseline is not one "
                         "(e.g. benchmarks/synthetic_llama.py --gguf)")
    be.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: measure MODEL only
    be.add_argument("--llama-gguf", default=None, help=argparse.SUPPRESS)  # child process: measure this GGUF
    _add_common(be)

    c = sub.add_parser("compare", help="run a grid of methods x schemes, one process per cell; write the report")
    c.add_argument("model", nargs="?", default=None, help="model (default smollm2-135m)")
    c.add_argument("--methods", default="rtn,gptq,gptqt,potptq,smoothquant,abq,flexq",
                   help="comma-separated; options with ':' (potptq:steps=init)")
    c.add_argument("--schemes", default="W4A16G128,W3A16G128,W2A16G64,W6A6,W4A8,W2A8")
    c.add_argument("--calib", default="c4")
    c.add_argument("--nsamples", type=int, default=32)
    c.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--eval", default="wikitext2", help="comma-separated names or paths")
    c.add_argument("--eval-seqlen", type=int, default=2048)
    c.add_argument("--max-windows", type=int, default=None)
    c.add_argument("--kl-windows", type=int, default=4, help="windows of the first dataset for KL vs FP (0: none)")
    c.add_argument("--out", default=None, help="results folder (default compare-MODEL)")
    c.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    c.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    c.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each cell as a Ray task: on the cluster at ADDRESS (host:port, or 'auto'), or "
                        "without ADDRESS on a Ray instance started here; needs the [ray] extra, and the "
                        "--out folder and data on a filesystem every node sees")
    c.add_argument("--ray-cpus", type=int, default=1, help="CPUs each cell reserves on Ray (its torch threads)")
    c.add_argument("--title", default=None)
    c.add_argument("--paper", default=None, help="JSON file: {\"method|scheme\": paper ppl} for a column")
    _add_common(c)
    r = sub.add_parser("report", help="remake report.md and pareto.png of a compare folder from results.jsonl")
    r.add_argument("path")
    r.add_argument("--title", default=None)
    r.add_argument("--paper", default=None)

    i = sub.add_parser("inspect", help="method, scheme, bits per weight per layer, size on disk")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    return parser


def _setup(args) -> None:
    if getattr(args, "data_dir", None):
        os.environ["ANYBIT_DATA"] = args.data_dir
    if getattr(args, "quiet", False):
        os.environ["ANYBIT_QUIET"] = "1"
    if getattr(args, "no_verify", False):
        os.environ["ANYBIT_NO_VERIFY"] = "1"
    import torch

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise AnybitError(f"--threads must be at least 1, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    if getattr(args, "kernel", None):
        from . import kernels

        kernels.set_backend(args.kernel)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _config_from_args(args):
    from .config import QuantConfig, parse_scheme

    wbits, abits, group, balance = 4, 16, 128, args.bit_balance
    if args.scheme:
        sch = parse_scheme(args.scheme)
        wbits, abits = sch.wbits, sch.abits
        group = sch.group_size if sch.group_size is not None else group
        balance = balance or sch.bit_balance
    wbits = args.wbits if args.wbits is not None else wbits
    abits = args.abits if args.abits is not None else abits
    group = args.group_size if args.group_size is not None else group
    options: dict = {}
    for dest, key in _method_flags().items():  # the generated method flags that were given
        value = getattr(args, dest, None)
        if value is not None:
            options[key] = value
    for item in args.option:
        if "=" not in item:
            raise AnybitError(f"--option {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    cfg = QuantConfig(method=args.method, wbits=wbits, abits=abits, group_size=group, sym=args.sym, seed=args.seed,
                      skip=tuple(args.skip), options=options, bit_balance=balance, act_sym=args.act_sym,
                      lm_head_bits=args.lm_head_bits,
                      act_group_size=args.act_group_size if args.act_group_size is not None else -1)
    cfg.validate()
    from .methods import get_method

    get_method(cfg.method).options(cfg)  # unknown or malformed method options fail here, before any loading
    return cfg


def cmd_quantize(args) -> int:
    from .job import Job

    config = _config_from_args(args)
    quick = args.out is None and args.eval is None
    eval_name = args.eval or ("wikitext2" if args.out is None else None)
    job = Job(model=args.model, config=config, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
              evals=(eval_name,) if eval_name else (), eval_seqlen=args.eval_seqlen,
              max_windows=args.max_windows if args.max_windows is not None else (DEFAULT_QUICK_WINDOWS if quick else None),
              eval_before=eval_name is not None and not args.stream, eval_fallback=args.eval is None,
              out=args.out, overwrite=args.overwrite, run_dir=args.resume_dir, resume_auto=True,
              fresh=args.no_resume, stream=args.stream, progress=os.environ.get("ANYBIT_QUIET") != "1", log=_log)
    report = job.run()
    for key in ("before", "after"):  # one dataset here: its result, not a dict of them
        if key in report:
            report[key] = next(iter(report[key].values()))
    report.pop("size", None)
    if args.json:
        print(json.dumps(report))
    elif "before" in report:
        b, a = report["before"], report["after"]
        print(f"{a['dataset']} seqlen {a['seqlen']}, {a['windows']} windows, {a['tokens']} tokens: "
              f"ppl before {b['ppl']:.4f}, after {a['ppl']:.4f} ({config.method} {config.scheme})")
    return 0


def cmd_eval(args) -> int:
    from . import evaluate
    from .models import DEFAULT_MODEL, load_model

    lm = load_model(args.model or DEFAULT_MODEL)
    ref = load_model(args.kl_against).model if args.kl_against else None
    progress = os.environ.get("ANYBIT_QUIET") != "1"
    res = evaluate(lm.model, lm.tokenizer, args.dataset or "wikitext2", args.seqlen, args.max_windows, reference=ref,
                   progress=progress, fallback=args.dataset is None)
    if args.json:
        print(json.dumps({"model": lm.source, **res.to_dict()}))
    else:
        print(res.summary())
    return 0


def cmd_generate(args) -> int:
    from .eval import generate
    from .models import load_model

    if args.max_new_tokens < 1:
        raise AnybitError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    lm = load_model(args.model)
    print(generate(lm.model, lm.tokenizer, args.prompt, args.max_new_tokens, decoder=args.decoder))
    return 0


def cmd_inspect(args) -> int:
    from .io import inspect

    info = inspect(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['path']}: method {info['method']}, scheme {info['scheme']}, format {info['format']}")
    print(f"quantized layers {info['quantized_layers']}, {info['quantized_weights']} weights, "
          f"{info['bits_per_weight']} bits/weight; size on disk {info['size_on_disk_bytes'] / 2**20:.2f} MiB")
    for name, layer in info["layers"].items():
        print(f"  {name:40s} {layer['shape'][0]:>6d}x{layer['shape'][1]:<6d} {layer['format']}{layer['bits']} "
              f"g{layer['group_size']} {'sym' if layer['sym'] else 'asym'}"
              + (f" levels {layer['levels']}" if layer.get("levels") else "")
              + (f" A{layer['abits']} g{layer['act']['group_size']} {'sym' if layer['act']['sym'] else 'asym'} "
                 f"{layer['bits_per_activation']:.3f} b/act" if layer["bits_per_activation"] else " A16")
              + f" {layer['bits_per_weight']:.3f} b/w")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    if args.what == "kernels":
        shapes = {"smollm2": bench.SMOLLM2_SHAPES, "llama7b": bench.LLAMA7B_SHAPES,
                  "all": bench.SMOLLM2_SHAPES + bench.LLAMA7B_SHAPES}[args.shapes]
        try:
            batches = tuple(int(v) for v in args.batches.split(","))
        except ValueError:
            raise AnybitError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
        if not batches or min(batches) < 1:
            raise AnybitError("--batches must be positive")
        named = {bench.case_name(c): c for c in bench.CASES}
        chosen = bench.CASES
        if args.formats is not None:
            want = [v.strip().lower() for v in args.formats.split(",") if v.strip()]
            bad = [v for v in want if v not in named]
            if bad or not want:
                raise AnybitError(f"--formats: unknown case {', '.join(bad) or '(none given)'}; "
                                  f"choose from {', '.join(named)}")
            chosen = tuple(named[v] for v in want)

        def show(case):
            if not args.json:
                shape = "x".join(map(str, case["shape"]))
                frac = case.get("fraction_of_read_bandwidth")
                bf16 = "" if case["ratio_vs_bf16"] is None else f"  x{case['ratio_vs_bf16']:6.2f} bf16"
                print(f"{case['format']:9s} {case['op']:20s} W{case['bits']}A{case['abits']:<3d} {shape:>11s} "
                      f"b{case['batch']:<3d} {case['median_s'] * 1e3:9.3f} ms {case['gb_per_s']:7.2f} GB/s "
                      f"{'' if frac is None else f'{100 * frac:4.0f}% bw '}"
                      f"x{case['ratio_vs_fp32']:6.2f} fp32{bf16}", flush=True)

        against = ()
        if args.against == "llama.cpp":
            from .peers import llama_cpp

            why = llama_cpp.unavailable()
            if why:
                raise AnybitError(why)
            against = ("llama.cpp",)
        info = bench.machine()
        bw = bench.memory_bandwidth()
        rbw = bench.read_bandwidth()
        mode = "hot (one matrix per case)" if args.hot else \
            f"cold (distinct matrices >= {bench.COLD_FACTOR} x LLC {bench.last_level_cache_bytes() >> 20} MiB)"
        if not args.json:
            print(f"# {info['cpu']}, {info['threads']} threads, ISA {info['isa']}, torch {info['torch']}, {info['date']}; "
                  f"copy {bw:.1f} GB/s, read {rbw:.1f} GB/s; {mode}", flush=True)
        cases = bench.bench_kernels(shapes, batches, args.group_size, progress=show, hot=args.hot, read_gb_per_s=rbw,
                                    against=against, cases=chosen, dequant=args.formats is None)
        if args.json:
            print(json.dumps([{**c, "machine": info, "copy_gb_per_s": bw, "read_gb_per_s": rbw, "cold": not args.hot}
                              for c in cases]))
        return 0
    return _bench_e2e(args)


def _bench_e2e(args) -> int:
    import subprocess

    from . import bench
    from .models import load_model

    if args.prompt_tokens < 1 or args.new_tokens < 1 or args.reps < 1 or args.rounds < 1:
        raise AnybitError("--prompt-tokens, --new-tokens, --reps and --rounds must be positive")
    if args.llama_gguf:  # child process: llama.cpp on one GGUF
        import torch

        from .peers import llama_cpp

        res = llama_cpp.bench_e2e(Path(args.llama_gguf), args.prompt_tokens, args.new_tokens, args.reps,
                                  args.threads or torch.get_num_threads())
        print(json.dumps(res))
        return 0
    if args.one:  # measure one model in this process
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values rename
        lm = load_model(args.model)
        res = bench.bench_decode(lm.model, lm.tokenizer, args.prompt_tokens, args.new_tokens, args.reps,
                                 decoder=args.decoder)
        print(json.dumps({"model": lm.source, "source": getattr(lm.model, "anybit_info", {}).get("source"), **res}))
        return 0
    baseline = args.baseline
    if baseline is None:
        qc_path = Path(args.model) / "config.json"
        if qc_path.is_file():
            baseline = (json.loads(qc_path.read_text()).get("quantization_config") or {}).get("source")
        if baseline is None:
            raise AnybitError(f"{args.model} records no source model; give --baseline MODEL")
    # every entry in its own process (so that memory is its own), all entries once per round
    # and the medians over rounds: on a shared VM the speed drifts by tens of percent within
    # minutes, and alternating puts the same drift on every entry
    entries = [("baseline", _e2e_child_cmd(args, baseline)), ("model", _e2e_child_cmd(args, args.model))]
    if args.against == "llama.cpp":
        entries += _llama_entries(args, baseline)
    runs: dict[str, list[dict]] = {name: [] for name, _ in entries}
    for _ in range(args.rounds):
        for name, cmd in entries:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["failed"])[-1]
                raise AnybitError(f"benchmarking {name} failed: {last}")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = {name: _median_run(rs) for name, rs in runs.items()}
    base, quant = med["baseline"], med["model"]
    report = {"machine": bench.machine(), "rounds": args.rounds, "baseline": base, "model": quant,
              "prefill_speedup": quant["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
              "decode_speedup": quant["decode_tokens_per_s"] / base["decode_tokens_per_s"],
              "weights_ratio": quant["weights_mib"] / base["weights_mib"]}
    if args.against == "llama.cpp":
        report["llama.cpp"] = [med[name] for name, _ in entries[2:]]
        for r in report["llama.cpp"]:
            r["anybit_decode_ratio"] = quant["decode_tokens_per_s"] / r["decode_tokens_per_s"]
            r["anybit_prefill_ratio"] = quant["prefill_tokens_per_s"] / r["prefill_tokens_per_s"]
    if args.json:
        print(json.dumps(report))
    else:
        for name, r in (("baseline", base), ("model", quant)):
            print(f"{name:8s} {r['model']}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode "
                  f"{r['decode_tokens_per_s']:.1f} tok/s, weights {r['weights_mib']:.1f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB ({r.get('decoder')} decoder)")
        print(f"speed-up: prefill x{report['prefill_speedup']:.2f}, decode x{report['decode_speedup']:.2f}; "
              f"weights x{report['weights_ratio']:.3f} (medians of {args.rounds} alternating rounds)")
        for r in report.get("llama.cpp", []):
            print(f"{r['model']}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode {r['decode_tokens_per_s']:.1f} "
                  f"tok/s, file {r['weights_mib']:.1f} MiB, peak RSS {r['peak_rss_mib']:.0f} MiB; anybit / this: "
                  f"decode x{r['anybit_decode_ratio']:.2f}, prefill x{r['anybit_prefill_ratio']:.2f}")
    return 0


def _e2e_child_cmd(args, model) -> list[str]:
    cmd = [sys.executable, "-m", "anybit.cli", "bench", "e2e", str(model), "--one", "--json", "--decoder", args.decoder,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)]
    for flag in ("data_dir", "kernel", "threads"):
        if getattr(args, flag, None):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd


def _median_run(runs: list[dict]) -> dict:
    """One entry's rounds: median speeds, the largest peak RSS, each round's speeds kept."""
    import statistics

    out = dict(runs[-1])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        out[key] = statistics.median(r[key] for r in runs)
        out[key.replace("_tokens_per_s", "_rounds")] = [round(r[key], 2) for r in runs]
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return out


def _llama_entries(args, baseline: str) -> list[tuple[str, list[str]]]:
    """llama.cpp on the baseline's GGUF, re-quantized to the types nearest the anybit model:
    the child commands that measure each."""
    import torch

    from .models.loader import cache_dir, resolve_builtin
    from .peers import llama_cpp

    why = llama_cpp.unavailable()
    if why:
        raise AnybitError(why)
    try:
        src = Path(resolve_builtin(baseline)) if not Path(baseline).exists() else Path(baseline)
    except (AnybitError, KeyError):
        src = Path(baseline)
    if args.llama_source:
        src = Path(args.llama_source)
        if not src.is_file():
            raise AnybitError(f"--llama-source {src} does not exist")
    if src.suffix != ".gguf":
        raise AnybitError(f"--against llama.cpp needs a GGUF of the baseline; {baseline} is not one (give "
                          "--llama-source FILE.gguf)")
    qc_path = Path(args.model) / "config.json"
    info = (json.loads(qc_path.read_text()).get("quantization_config") or None) if qc_path.is_file() else None
    threads = args.threads or torch.get_num_threads()
    entries = []
    for ftype in ("F32",) + tuple(t for t in llama_cpp.nearest_ftypes(info) if t != "F32"):
        gguf = llama_cpp.quantize_gguf(src, cache_dir() / "llama_cpp" / f"{src.stem}.{ftype}.gguf", ftype, threads)
        entries.append((f"llama.cpp {ftype}", [
            sys.executable, "-m", "anybit.cli", "bench", "e2e", str(args.model), "--llama-gguf", str(gguf),
            "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--reps", str(args.reps),
            "--threads", str(threads)]))
    return entries


def _paper(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnybitError(f"cannot read --paper {path} ({e.__class__.__name__}); give a JSON object") from None


def cmd_compare(args) -> int:
    from .compare import GridSettings, grid, make_report, run_grid
    from .models import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not methods or not schemes:
        raise AnybitError("--methods and --schemes must each name at least one entry")
    for n, v in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen), ("--eval-seqlen", args.eval_seqlen)):
        if v < 1:
            raise AnybitError(f"{n} must be positive, got {v}")
    cells = grid(methods, schemes)
    for cell in cells:
        cell.config()  # malformed schemes and options fail here, before anything runs
    paper = _paper(args.paper)
    settings = GridSettings(model=model, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                            evals=tuple(e.strip() for e in args.eval.split(",") if e.strip()),
                            eval_seqlen=args.eval_seqlen, max_windows=args.max_windows, kl_windows=args.kl_windows,
                            data_dir=os.environ.get("ANYBIT_DATA"))
    if args.ray_cpus < 1:
        raise AnybitError(f"--ray-cpus must be at least 1, got {args.ray_cpus}")
    out = Path(args.out or f"compare-{Path(model).name}")
    run_grid(settings, cells, out, retry_failed=args.retry_failed, timeout=args.timeout, log=_log,
             ray_address=args.ray, ray_cpus=args.ray_cpus)
    report = make_report(out, args.title, paper)
    _log(f"anybit: wrote {report}")
    return 0


def cmd_report(args) -> int:
    from .compare import make_report

    path = Path(args.path)
    if not path.is_dir():
        raise AnybitError(f"{path} is not a folder; give the --out folder of anybit compare")
    print(f"anybit: wrote {make_report(path, args.title, _paper(args.paper))}")
    return 0


def cmd_export(args) -> int:
    if args.format == "gguf":
        from .io.gguf_export import export_gguf

        if not Path(args.path, "config.json").is_file():
            raise AnybitError(f"{args.path} is not a folder written by `anybit quantize`")
        res = export_gguf(args.path, args.out, overwrite=args.overwrite)
        types = ", ".join(f"{n} {k}" for k, n in sorted(res["tensor_types"].items()))
        exact = ("bit-exact" if res["max_weight_change"] == 0 else
                 f"largest weight change {res['max_weight_change']:.2e} (float16 rounding of the group minimum)")
        print(f"anybit: wrote {res['out']} (GGUF {res['architecture']}, {res['bytes'] / 2**20:.1f} MiB; {types}; {exact})")
        return 0
    if args.format == "compressed-tensors":
        from .io.compressed_tensors import export_compressed_tensors

        res = export_compressed_tensors(args.path, args.out, overwrite=args.overwrite)
        print(f"anybit: wrote {res['out']} (compressed-tensors pack-quantized; {res['layers']} layers in "
              f"{res['groups']} config group(s))")
        return 0
    from .io.gptq_layout import export_gptq

    res = export_gptq(args.path, args.out, overwrite=args.overwrite, checkpoint_format=args.checkpoint_format)
    print(f"anybit: wrote {res['out']} (GPTQ layout, checkpoint_format {res['checkpoint_format']})")
    return 0


COMMANDS = {"bench": cmd_bench, "compare": cmd_compare, "report": cmd_report, "export": cmd_export, "quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect}


_SETTINGS_ENV = ("ANYBIT_DATA", "ANYBIT_QUIET", "ANYBIT_NO_VERIFY")  # what _setup writes


def main(argv: list[str] | None = None) -> int:
    # flags set environment variables for this command only: an in-process caller (tests,
    # notebooks) must not inherit e.g. --no-verify in its next call
    saved = {k: os.environ.get(k) for k in _SETTINGS_ENV}
    try:
        return _main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _setup(args)
        return COMMANDS[args.command](args)
    except AnybitError as e:
        print(f"anybit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anybit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
