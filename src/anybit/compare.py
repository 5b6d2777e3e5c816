"""``anybit compare``: a grid of (method, scheme) cells on one model, each run in its own
process (a crash or out-of-memory in one cell is recorded and the grid goes on), results
appended to ``results.jsonl`` as each cell ends, finished cells skipped on a re-run;
``anybit report`` turns ``results.jsonl`` alone into ``report.md`` and ``pareto.png``.

A method may carry options: ``potptq:steps=init`` or ``abq:let=false:epochs=5``
(``sym=true`` sets symmetric weights).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import QuantConfig, parse_scheme
from .errors import AnybitError

RESULTS = "results.jsonl"


@dataclass
class GridSettings:
    model: str
    calib: str = "c4"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    evals: tuple[str, ...] = ("wikitext2",)
    eval_seqlen: int = 2048
    max_windows: int | None = None
    kl_windows: int = 4  # windows of the first dataset on which KL to the float model is measured
    data_dir: str | None = None


@dataclass
class Cell:
    method: str  # with options, e.g. "potptq:steps=init"
    scheme: str  # "FP" for the float model

    @property
    def key(self) -> str:
        return f"{self.method}|{self.scheme}"

    def config(self) -> QuantConfig | None:
        if self.method == "fp":
            return None
        name, *opts = self.method.split(":")
        options = {}
        for o in opts:
            if "=" not in o:
                raise AnybitError(f"method option {o!r} in {self.method!r} must look like key=value")
            k, v = o.split("=", 1)
            try:
                options[k] = json.loads(v)
            except json.JSONDecodeError:
                options[k] = v
        sch = parse_scheme(self.scheme)
        sym = options.pop("sym", False)  # a QuantConfig field, written like an option: gptq:sym=true
        if not isinstance(sym, bool):
            raise AnybitError(f"sym must be true or false in {self.method!r}")
        return QuantConfig(method=name, wbits=sch.wbits, abits=sch.abits,
                           group_size=sch.group_size if sch.group_size is not None else 128,
                           bit_balance=sch.bit_balance, sym=sym, options=options)


def grid(methods: list[str], schemes: list[str]) -> list[Cell]:
    cells = [Cell("fp", "FP")]
    cells += [Cell(m, s) for m in methods for s in schemes if m != "fp"]
    return cells


def check_cell(cell: Cell) -> str | None:
    """Why ``cell`` cannot run (None if it can)."""
    from .methods import get_method

    cfg = cell.config()
    if cfg is None:
        return None
    try:
        method = get_method(cfg.method)
        cfg = method.prepare(cfg)
        cfg.validate()
        method.validate(cfg)
    except AnybitError as e:
        return str(e)
    return None


def read_results(out: Path) -> list[dict]:
    path = out / RESULTS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash of the runner itself
    return rows


def _append(out: Path, row: dict) -> None:
    with open(out / RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_grid(settings: GridSettings, cells: list[Cell], out: Path, retry_failed: bool = False,
             timeout: float | None = None, log=print, ray_address: str | None = None,
             ray_cpus: int = 1) -> list[dict]:
    """Run every cell not already in ``out/results.jsonl``; returns all rows. With
    ``ray_address`` (``"local"`` starts a Ray instance on this machine) each cell is a Ray
    task (see :func:`_run_on_ray`); the rows, the resume and the failure handling are the same."""
    out.mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in read_results(out)}
    todo = [c for c in cells if c.key not in done or (retry_failed and done[c.key]["status"] == "failed")]
    where = f" on Ray ({ray_address})" if ray_address else ""
    log(f"anybit compare: {len(cells)} cells, {len(cells) - len(todo)} already in {out / RESULTS}, "
        f"{len(todo)} to run{where}")
    runnable = []
    for cell in todo:
        reason = check_cell(cell)
        if reason is not None:
            _append(out, {**_row_base(settings, cell), "status": "skipped", "reason": reason})
            log(f"{cell.key}: skipped ({reason})")
        else:
            runnable.append(cell)
    if ray_address:
        _run_on_ray(settings, runnable, out, timeout, log, ray_address, ray_cpus)
        return read_results(out)
    spent: list[float] = []
    for i, cell in enumerate(runnable):
        eta = ""
        if spent:
            eta = f", ETA {sum(spent) / len(spent) * (len(runnable) - i) / 60:.0f} min for the rest"
        log(f"[{i + 1}/{len(runnable)}] {cell.key}: running{eta}")
        t0 = time.perf_counter()
        row = _run_cell_subprocess(settings, cell, timeout, out)
        spent.append(time.perf_counter() - t0)
        _record(settings, cell, row, out, log, f"[{i + 1}/{len(runnable)}] ", spent[-1])
    return read_results(out)


def _row_base(settings: GridSettings, cell: Cell) -> dict:
    return {"key": cell.key, "method": cell.method, "scheme": cell.scheme, "model": settings.model}


def _record(settings: GridSettings, cell: Cell, row: dict, out: Path, log, prefix: str, seconds: float) -> None:
    _append(out, {**_row_base(settings, cell), **row})
    msg = (f"ppl {', '.join(f'{k} {v:.3f}' for k, v in row['ppl'].items())}" if row["status"] == "ok"
           else row.get("reason", ""))
    log(f"{prefix}{cell.key}: {row['status']} in {seconds:.0f} s; {msg}")


def _forwarded_env() -> dict[str, str]:
    """What a cell run elsewhere needs of this process's environment (the data folder,
    anybit's switches), since a Ray worker does not inherit it."""
    return {k: v for k, v in os.environ.items() if k.startswith("ANYBIT_")}


def _ray_task(settings: GridSettings, cell: Cell, timeout: float | None, out: str, cwd: str, env: dict,
              threads: int) -> dict:
    """One cell on a Ray worker: the same child process as the local runner, in the
    driver's working folder (relative paths in the settings mean the same there: the
    folder must be shared, as for the resume state under ``out/runs``)."""
    env = {**env, "OMP_NUM_THREADS": str(threads)}  # as many torch threads as CPUs reserved
    return _run_cell_subprocess(settings, cell, timeout, Path(out), env=env, cwd=cwd)


def _check_reachable(address: str) -> None:
    """A host:port that nothing answers on is an error now: Ray itself retries for minutes."""
    import socket

    if address in ("local", "auto") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise AnybitError(f"could not reach the Ray cluster at {address!r} ({e}); start one "
                          "(ray start --head) or give --ray alone for a local instance") from None


def _run_on_ray(settings: GridSettings, cells: list[Cell], out: Path, timeout: float | None, log,
                address: str, cpus: int) -> None:
    """Every cell as one Ray task reserving ``cpus`` CPUs; rows appended as tasks end, in
    the order they end. A task that Ray itself loses (a dead worker or node) is a failed
    row like a crashed cell; re-running the grid resumes as locally."""
    try:
        import ray
    except ImportError:
        raise AnybitError("--ray needs Ray: pip install 'anybit[ray]' (or run without --ray)") from None
    if not cells:
        return
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise AnybitError(f"could not reach the Ray cluster at {address!r} ({str(e).splitlines()[0]}); "
                              "start one (ray start --head) or give --ray local") from None
    task = ray.remote(max_retries=0)(_ray_task).options(num_cpus=cpus)
    started = time.perf_counter()
    pending = {task.remote(settings, c, timeout, str(out.resolve()), os.getcwd(),
                           _forwarded_env(), cpus): c for c in cells}
    log(f"submitted {len(pending)} cells, {cpus} CPU(s) each")
    n = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        try:
            row = ray.get(ready[0])
        except ray.exceptions.RayError as e:
            row = {"status": "failed", "reason": f"Ray task failed: {str(e).strip().splitlines()[-1][-400:]}"}
        n += 1
        _record(settings, cell, row, out, log, f"[{n}/{len(cells)}] ", time.perf_counter() - started)


def cell_slug(cell: Cell) -> str:
    """A file name for ``cell`` (its run folder and log)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", cell.key)


def _run_cell_subprocess(settings: GridSettings, cell: Cell, timeout: float | None, out: Path,
                         env: dict[str, str] | None = None, cwd: str | None = None) -> dict:
    """One cell in a child process. Its progress bars go to ``out/logs/CELL.log``; a
    calibrated method keeps its per-block progress in ``out/runs/CELL`` so that a cell
    killed with the grid (or the session) resumes at its next block when the grid is
    run again."""
    run_dir = out / "runs" / cell_slug(cell)
    payload = json.dumps({"settings": asdict(settings), "cell": asdict(cell), "run_dir": str(run_dir)})
    env = {**os.environ, **(env or {})}
    if settings.data_dir:
        env["ANYBIT_DATA"] = settings.data_dir
    env.pop("ANYBIT_QUIET", None)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_path = out / "logs" / f"{cell_slug(cell)}.log"
    try:
        with open(log_path, "a") as log:
            p = subprocess.run([sys.executable, "-m", "anybit.compare", payload], stdout=subprocess.PIPE,
                               stderr=log, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    if p.returncode == 0 and last.startswith("{"):
        return json.loads(last)
    if p.returncode < 0:
        sig = -p.returncode
        why = "killed (out of memory?)" if sig == 9 else f"killed by signal {sig}"
    else:
        text = log_path.read_text(errors="replace").replace("\r", "\n")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {p.returncode}"
    return {"status": "failed", "reason": why[-500:]}


def run_cell(settings: GridSettings, cell: Cell, run_dir: Path | None = None) -> dict:
    """One cell, in this process, as one :class:`anybit.Job`: quantize (timed, peak memory),
    size on disk, perplexity on every dataset, KL against the float model."""
    from .job import Job

    rep = Job(model=settings.model, config=cell.config(), calib=settings.calib, nsamples=settings.nsamples,
              seqlen=settings.seqlen, evals=tuple(settings.evals), eval_seqlen=settings.eval_seqlen,
              max_windows=settings.max_windows, kl_windows=settings.kl_windows, measure_size=True,
              run_dir=run_dir).run()
    row: dict = {"status": "ok"}
    if "method" in rep:
        if "calibration" in rep:
            c = rep["calibration"]
            row["calibration"] = f"{c['source']}, {c['nsamples']} x {c['seqlen']}, seed {c['seed']}"
        row.update(quantize_s=round(rep["quantize_seconds"], 2), quantize_cpu_s=round(rep["quantize_cpu_seconds"], 1),
                   peak_rss_mib=round(rep["quantize_peak_rss_mib"]))
        if rep.get("resumed"):
            row["resumed"] = True
        if rep.get("blocks"):  # per-block training statistics (PoTPTQ, ABQ-LLM)
            row["blocks"] = rep["blocks"]
        if rep.get("sensitivity"):  # what the method chose (FlexQ's A8 layers), for the report's readers
            row["a8_layers"] = rep["sensitivity"].get("a8_layers")
        row.update(bits_per_weight=rep["size"]["bits_per_weight"],
                   size_mib=round(rep["size"]["size_on_disk_bytes"] / 2**20, 2))
    else:
        row.update(bits_per_weight=32.0, quantize_s=0.0)
    after = rep.get("after", {})
    row["ppl"] = {name: r["ppl"] for name, r in after.items()}
    row["eval"] = {name: {k: r[k] for k in ("seqlen", "windows", "tokens")} for name, r in after.items()}
    if "kl" in rep:
        row["kl"], row["kl_tokens"] = rep["kl"], rep["kl_tokens"]
    return row


# ------------------------------------------------------------------------------- report

PAPER_NOTE = ("Paper numbers (SPEC §3) are LLaMA-7B class models; ours are the model named above: "
              "compare orderings, not values.")


def _fmt(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def make_report(out: Path, title: str | None = None, paper: dict | None = None) -> Path:
    """``report.md`` (and ``pareto.png`` when matplotlib is installed) from ``results.jsonl``."""
    rows = read_results(out)
    if not rows:
        raise AnybitError(f"{out / RESULTS} has no results; run anybit compare first")
    latest: dict[str, dict] = {}
    for r in rows:
        latest[r["key"]] = r  # a re-run cell replaces the earlier row
    rows = list(latest.values())
    datasets: list[str] = []
    for r in rows:
        for d in r.get("ppl", {}):
            if d not in datasets:
                datasets.append(d)
    model = rows[0].get("model", "")
    lines = [f"# {title or 'anybit compare: ' + model}", ""]
    evals = {d: next((r["eval"][d] for r in rows if d in r.get("eval", {})), {}) for d in datasets}
    calib = next((r["calibration"] for r in rows if r.get("calibration")), None)
    lines.append(f"Model: `{model}`. Calibration: {calib or '–'}. Evaluation: "
                 + "; ".join(f"{d} seqlen {e.get('seqlen')}, {e.get('windows')} windows, {e.get('tokens')} tokens"
                             for d, e in evals.items()) + ".")
    kl_tokens = next((r["kl_tokens"] for r in rows if r.get("kl_tokens")), None)
    if kl_tokens:
        lines.append(f"KL: mean per-token KL(FP ‖ quantized) on the first {kl_tokens} tokens of {datasets[0]}.")
    lines.append("")
    # quantize (s) is wall time, which includes any time the process was stopped (a grid paused
    # for timings); CPU (s) is the process's CPU time (both threads)
    head = ["method", "scheme", "bits/weight", *[f"ppl {d}" for d in datasets], "KL vs FP", "quantize (s)",
            "quantize CPU (s)", "peak RSS (MiB)", "size (MiB)"]
    if paper:
        head.append("paper (LLaMA-7B)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # rows grouped by scheme (schemes in order of first appearance), cells in run order within
    order = {k: i for i, k in enumerate(latest)}
    scheme_order: dict[str, int] = {}
    for r in latest.values():
        scheme_order.setdefault(r["scheme"], len(scheme_order))
    for r in sorted(rows, key=lambda r: (r["method"] != "fp", scheme_order[r["scheme"]], order[r["key"]])):
        if r["status"] == "ok":
            cells = [r["method"], r["scheme"], _fmt(r.get("bits_per_weight")),
                     *[_fmt(r["ppl"].get(d)) for d in datasets], _fmt(r.get("kl"), 4), _fmt(r.get("quantize_s"), 1),
                     _fmt(r.get("quantize_cpu_s"), 0), _fmt(r.get("peak_rss_mib"), 0), _fmt(r.get("size_mib"), 1)]
        else:
            cells = [r["method"], r["scheme"], f"{r['status']}: {r.get('reason', '')}".replace("|", "/")]
            cells += [""] * (len(head) - len(cells) - (1 if paper else 0))
        if paper:
            cells.append(_fmt(paper.get(r["key"])))
        lines.append("| " + " | ".join(cells) + " |")
    if paper:
        lines += ["", PAPER_NOTE]
    plot = _pareto(out, rows, datasets[0] if datasets else None)
    lines += ["", f"![perplexity against bits per weight]({plot.name})" if plot else
              "(pareto.png not drawn: install matplotlib, e.g. `pip install anybit[plot]`)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _pareto(out: Path, rows: list[dict], dataset: str | None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if dataset is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fp = next((r for r in rows if r["method"] == "fp" and r["status"] == "ok"), None)
    if fp is not None:
        ax.axhline(fp["ppl"][dataset], color="black", linestyle="--", linewidth=1, label=f"FP ({fp['ppl'][dataset]:.2f})")
    markers = "osD^v<>phX*P"
    methods = sorted({r["method"] for r in rows if r["method"] != "fp" and r["status"] == "ok"})
    for i, m in enumerate(methods):
        pts = sorted((r["bits_per_weight"], r["ppl"][dataset]) for r in rows
                     if r["method"] == m and r["status"] == "ok" and dataset in r["ppl"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], linestyle="", label=m)
    ax.set_xlabel("bits per weight (codes + scales + zeros)")
    ax.set_ylabel(f"perplexity ({dataset}, log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _main(argv: list[str]) -> int:
    """Child process entry: one cell, one JSON line on stdout."""
    payload = json.loads(argv[0])
    settings = GridSettings(**{**payload["settings"], "evals": tuple(payload["settings"]["evals"])})
    cell = Cell(**payload["cell"])
    if os.environ.get("ANYBIT_TEST_FAIL_CELL") == cell.key:  # test hook: a cell that crashes
        os.kill(os.getpid(), 9)
    try:
        row = run_cell(settings, cell, Path(payload["run_dir"]) if payload.get("run_dir") else None)
    except AnybitError as e:
        print(f"anybit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
