import json

import pytest
import torch

from anybit.data import calibration_windows, eval_windows, load_text
from anybit.data import text as textmod
from anybit.errors import AnybitError

from conftest import needs_corpora


class CharTok:
    """A character tokenizer: enough to test windowing without a model."""

    def __call__(self, text, return_tensors=None):
        class R:
            pass

        r = R()
        r.input_ids = torch.tensor([[ord(c) % 256 for c in text]])
        return r


def test_wikitext_join_matches_hf_rows():
    raw = " \n = Title = \n \n Body line . \n"
    # HF rows: "", " = Title = \n", "", " Body line . \n" joined with "\n\n"
    assert textmod._join_wikitext(raw) == "\n\n = Title = \n\n\n\n\n Body line . \n"
    assert textmod._join_ptb(" a b \n c d \n") == "a b c d"


@needs_corpora
def test_named_splits_are_different_files():
    for name in ("wikitext2", "ptb", "c4"):
        test, train = load_text(name, "test"), load_text(name, "train")
        assert test.identity != train.identity and test.text and train.text
    c4 = load_text("c4", "test")
    assert c4.max_windows == 256


def test_pydoc_fallback_when_data_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ANYBIT_DATA", str(tmp_path / "none"))
    monkeypatch.setattr(textmod, "_from_hf_datasets", lambda *a: None)
    t = load_text("wikitext2", "test", fallback=True)
    assert t.name == "pydoc" and len(t.text) > 10000
    assert "pydoc_data" in capsys.readouterr().err
    assert load_text("wikitext2", "train", fallback=True).identity != t.identity
    with pytest.raises(AnybitError, match="not found"):
        load_text("wikitext2", "test", fallback=False)


def test_paths_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt"), "test").text == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl"), "train").text == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(AnybitError, match="no string field"):
        load_text(str(tmp_path / "bad.jsonl"), "train")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(AnybitError, match="empty"):
        load_text(str(tmp_path / "empty.txt"), "train")
    with pytest.raises(AnybitError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"), "test")
    with pytest.raises(AnybitError, match="unknown dataset"):
        load_text("nosuchset", "test")


def test_eval_windows_drop_tail_and_limit():
    t = textmod.Text("x", "a" * 1000, "x", "x")
    w = eval_windows(CharTok(), t, 64)
    assert w.shape == (15, 64)
    assert eval_windows(CharTok(), t, 64, max_windows=3).shape == (3, 64)
    with pytest.raises(AnybitError, match="fewer than one window"):
        eval_windows(CharTok(), t, 2048)


def test_calibration_is_seeded_and_refuses_short_text():
    t = textmod.Text("x", "".join(chr(97 + i % 26) for i in range(5000)), "x", "x")
    a = calibration_windows(CharTok(), t, 8, 128, seed=0)
    b = calibration_windows(CharTok(), t, 8, 128, seed=0)
    c = calibration_windows(CharTok(), t, 8, 128, seed=1)
    assert a.shape == (8, 128) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(AnybitError, match="fewer than"):
        calibration_windows(CharTok(), t, 128, 2048)
    with pytest.raises(AnybitError, match="empty"):
        calibration_windows(CharTok(), textmod.Text("x", "  ", "x", "x"), 1, 16)
