"""The grid runner on the real tiny model: two methods x two schemes, one cell crashing on
purpose, and a resumed run that only runs what is missing."""

import json
import os

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
