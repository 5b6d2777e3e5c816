"""The grid runner on the real tiny model: two methods x two schemes, one cell crashing on
purpose, and a resumed run that only runs what is missing."""

import json
import os

import pytest

from anybit.cli import main

from conftest import STORIES_TEST, STORIES_TRAIN, needs_stories


def _compare(out, capsys, *extra):
    code = main(["compare", "stories260k", "--methods", "rtn,gptq", "--schemes", "W4A16G32,W3A8G32",
                 "--calib", str(STORIES_TRAIN), "--nsamples", "4", "--seqlen", "64", "--eval", str(STORIES_TEST),
                 "--eval-seqlen", "128", "--max-windows", "2", "--kl-windows", "1", "--out", str(out), *extra])
    _, err = capsys.readouterr()
    return code, err


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@needs_stories
def test_grid_records_a_crash_goes_on_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid"
    monkeypatch.setenv("ANYBIT_TEST_FAIL_CELL", "gptq|W4A16G32")
    code, err = _compare(out, capsys)
    assert code == 0, err
    rows = {r["key"]: r for r in _rows(out)}
    assert set(rows) == {"fp|FP", "rtn|W4A16G32", "rtn|W3A8G32", "gptq|W4A16G32", "gptq|W3A8G32"}
    assert rows["gptq|W4A16G32"]["status"] == "failed" and "killed" in rows["gptq|W4A16G32"]["reason"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["ppl"] and r["bits_per_weight"] > 0 for r in ok)
    assert all(r["kl"] > 0 for r in ok if r["method"] != "fp")
    assert rows["rtn|W3A8G32"]["bits_per_weight"] > rows["rtn|W4A16G32"]["bits_per_weight"]  # word-padded planes at g32
    report = (out / "report.md").read_text()
    assert "| gptq | W4A16G32 | failed: killed" in report and "ppl stories260k-generated.test.txt" in report
    assert (out / "pareto.png").stat().st_size > 1000

    # resume: finished cells are skipped; the failed one runs again only when asked
    monkeypatch.delenv("ANYBIT_TEST_FAIL_CELL")
    code, err = _compare(out, capsys)
    assert code == 0 and "0 to run" in err
    code, err = _compare(out, capsys, "--retry-failed")
    assert code == 0 and "1 to run" in err
    latest = {}
    for r in _rows(out):
        latest[r["key"]] = r
    assert latest["gptq|W4A16G32"]["status"] == "ok"
    assert len(_rows(out)) == 6
    assert "| gptq | W4A16G32 | 4.643 |" in (out / "report.md").read_text()


@needs_stories
def test_unsupported_cells_are_skipped_with_the_reason(tmp_path, capsys):
    out = tmp_path / "g"
    code = main(["compare", "stories260k", "--methods", "gptqt", "--schemes", "W4A8", "--out", str(out),
                 "--eval", str(STORIES_TEST), "--eval-seqlen", "128", "--max-windows", "1"])
    assert code == 0
    rows = {r["key"]: r for r in _rows(out)}
    assert rows["gptqt|W4A8"]["status"] == "skipped" and "weights only" in rows["gptqt|W4A8"]["reason"]
    os.remove(out / "results.jsonl")
    assert main(["report", str(out)]) == 2


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_stories
def test_grid_on_a_ray_cluster_gives_the_local_rows_records_a_crash_and_resumes(tmp_path, capsys, monkeypatch):
    """`compare --ray ADDRESS` against a Ray head started here: the same rows (same
    perplexities and sizes) as the local runner, a crashed cell recorded as failed while
    the others finish, and a re-run that runs only what is missing."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    import subprocess
    import sys
    from pathlib import Path

    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(ray_bin), "start", "--head", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    try:
        grid = ["--methods", "rtn,gptq", "--schemes", "W4A16G32"]
        local, remote = tmp_path / "local", tmp_path / "ray"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the threads a Ray cell gets with --ray-cpus 2: same sums
        code, err = _compare(local, capsys, *grid)
        assert code == 0, err
        monkeypatch.setenv("ANYBIT_TEST_FAIL_CELL", "gptq|W4A16G32")
        code, err = _compare(remote, capsys, *grid, "--ray", f"127.0.0.1:{port}", "--ray-cpus", "2")
        assert code == 0 and "on Ray" in err, err
        rows = {r["key"]: r for r in _rows(remote)}
        assert rows["gptq|W4A16G32"]["status"] == "failed" and "killed" in rows["gptq|W4A16G32"]["reason"]
        monkeypatch.delenv("ANYBIT_TEST_FAIL_CELL")
        code, err = _compare(remote, capsys, *grid, "--ray", f"127.0.0.1:{port}", "--ray-cpus", "2", "--retry-failed")
        assert code == 0 and "1 to run" in err, err
        code, err = _compare(remote, capsys, *grid, "--ray", f"127.0.0.1:{port}", "--ray-cpus", "2")
        assert code == 0 and "0 to run" in err
        want = {r["key"]: r for r in _rows(local)}
        got = {}
        for r in _rows(remote):
            got[r["key"]] = r
        assert set(got) == set(want) == {"fp|FP", "rtn|W4A16G32", "gptq|W4A16G32"}
        for k, r in want.items():
            assert got[k]["status"] == "ok"
            assert got[k]["ppl"] == r["ppl"] and got[k]["bits_per_weight"] == r["bits_per_weight"], k
            assert got[k].get("kl") == r.get("kl"), k
    finally:
        import ray

        ray.shutdown()
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)


def test_ray_address_that_does_not_answer_is_one_line(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    code = main(["compare", "stories260k", "--methods", "rtn", "--schemes", "W4A16G32", "--out", str(tmp_path / "g"),
                 "--ray", f"127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err
    assert code == 2 and "could not reach the Ray cluster" in err and "Traceback" not in err
