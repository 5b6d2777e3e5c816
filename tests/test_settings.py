"""Where the shared data folder is found."""

from pathlib import Path

from anybit import settings

from conftest import ROOT


def test_data_dir_from_elsewhere_falls_back_to_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("ANYBIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    beside = ROOT / ".." / "shared" / "data"
    got = settings.data_dir()
    if beside.is_dir():
        assert got.resolve() == beside.resolve()
    else:
        assert got == Path("..") / "shared" / "data"
    monkeypatch.setenv("ANYBIT_DATA", str(tmp_path))
    assert settings.data_dir() == tmp_path
