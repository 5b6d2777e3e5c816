"""Evaluation and calibration text, by name or path.

Names (``wikitext2``, ``ptb``, ``c4``) resolve, in order, to: the shared corpora folder
(:func:`anybit.settings.corpora_dir`); Hugging Face ``datasets`` for online users who
have it; and, only where the caller allows it (the default run), the standard library's
``pydoc_data`` topics, which every Python installation carries. Any ``.txt`` or
``.jsonl`` path works as well (``.jsonl``: the ``text`` field of each line).

Each name has two splits: ``test`` for evaluation and ``train`` for calibration, built
from different files, so calibration never samples the split being evaluated.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from ..errors import AnybitError

DATASETS = ("wikitext2", "ptb", "c4")
PYDOC = "pydoc"

# name -> split -> (file under the corpora folder, how to join it)
_FILES = {
    "wikitext2": {"test": ("wikitext-2-raw/wiki.test.raw", "wikitext"),
                  # raw train is not available offline; the tokenized valid split is the nearest
                  "train": ("wikitext-2-tokens/wiki.valid.tokens", "wikitext")},
    "ptb": {"test": ("ptb/ptb.test.txt", "ptb"), "train": ("ptb/ptb.valid.txt", "ptb")},
    "c4": {"test": ("c4/c4-validation.sample2000.jsonl", "c4-eval"),
           "train": ("c4/c4-train.00000-of-01024.first1000.jsonl", "jsonl")},
}
# GPTQ's c4 evaluation uses the first 1100 validation documents
C4_EVAL_DOCS = 1100


@dataclass(frozen=True)
class Text:
    """A text ready to tokenize. ``identity`` names the file/split it came from."""

    name: str
    text: str
    identity: str
    description: str
    # evaluation only: keep at most this many windows' worth of tokens (GPTQ's c4: 256)
    max_windows: int | None = None


def _join_wikitext(raw: str) -> str:
    # Hugging Face rows are the file's lines, each with its "\n"; blank lines become "".
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def _join_ptb(raw: str) -> str:
    # Hugging Face ptb_text_only rows are stripped lines; "ptb-new" joins them with " ".
    return " ".join(line.strip() for line in raw.splitlines())


def _read_jsonl(path: Path, limit: int | None = None) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise AnybitError(f"{path}:{i + 1} is not valid JSON; a .jsonl needs one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise AnybitError(f"{path}:{i + 1} has no string field \"text\"; a .jsonl needs {{\"text\": ...}} per line")
            docs.append(obj["text"])
    return docs


def _from_corpora(name: str, split: str) -> Text | None:
    rel, how = _FILES[name][split]
    path = settings.corpora_dir() / rel
    if not path.is_file():
        return None
    if how == "c4-eval":
        text = " ".join(_read_jsonl(path, C4_EVAL_DOCS))
        return Text(name, text, str(path.resolve()), f"{name} {split} ({path})", max_windows=256)
    if how == "jsonl":
        text = "\n\n".join(_read_jsonl(path))
    else:
        raw = path.read_text(encoding="utf-8")
        text = _join_wikitext(raw) if how == "wikitext" else _join_ptb(raw)
    return Text(name, text, str(path.resolve()), f"{name} {split} ({path})")


def _from_hf_datasets(name: str, split: str) -> Text | None:
    """Online users with ``datasets``: the same sources GPTQ uses."""
    if importlib.util.find_spec("datasets") is None or os.environ.get("HF_DATASETS_OFFLINE") == "1" \
            or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        import datasets

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "test" else "train")
            text = "\n\n".join(ds["text"])
        elif name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split="test" if split == "test" else "train")
            text = " ".join(ds["sentence"])
        else:
            files = ({"validation": "en/c4-validation.00000-of-00008.json.gz"} if split == "test"
                     else {"train": "en/c4-train.00000-of-01024.json.gz"})
            key = "validation" if split == "test" else "train"
            ds = datasets.load_dataset("allenai/c4", data_files=files, split=key)
            docs = ds["text"][:C4_EVAL_DOCS] if split == "test" else ds["text"][:5000]
            text = (" " if split == "test" else "\n\n").join(docs)
    except Exception as e:  # network or hub trouble: fall through to the next source
        print(f"anybit: could not fetch {name} from the Hugging Face hub ({e.__class__.__name__})", file=sys.stderr)
        return None
    return Text(name, text, f"hf:{name}:{split}", f"{name} {split} (Hugging Face datasets)",
                max_windows=256 if name == "c4" and split == "test" else None)


def _pydoc(split: str) -> Text:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    # every 10th topic is the test split; the rest calibrate
    chosen = [k for i, k in enumerate(keys) if (i % 10 == 9) == (split == "test")]
    text = "\n\n".join(topics[k] for k in chosen)
    return Text(PYDOC, text, f"pydoc:{split}", f"pydoc_data topics {split} split (Python standard library)")


def _from_path(path: Path) -> Text:
    if not path.exists():
        raise AnybitError(f"text file {path} does not exist; give one of {', '.join(DATASETS)} or a .txt/.jsonl path")
    if path.is_dir():
        raise AnybitError(f"{path} is a folder; give one of {', '.join(DATASETS)} or a .txt/.jsonl file")
    try:
        if path.suffix.lower() == ".jsonl":
            text = "\n\n".join(_read_jsonl(path))
        else:
            text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AnybitError(f"{path} is not UTF-8 text; give a .txt or .jsonl file") from None
    if not text.strip():
        raise AnybitError(f"{path} is empty; give a text with enough tokens")
    return Text(path.name, text, str(path.resolve()), str(path))


def load_text(name_or_path: str, split: str, fallback: bool = False) -> Text:
    """The ``split`` (``test`` or ``train``) of a named dataset, or the text of a path.

    With ``fallback``, a name that no source has resolves to the pydoc topics (and says
    so on stderr); without it, that is an error.
    """
    if split not in ("test", "train"):
        raise ValueError(split)
    key = name_or_path.lower()
    if key == PYDOC:
        return _pydoc(split)
    if key in DATASETS:
        found = _from_corpora(key, split) or _from_hf_datasets(key, split)
        if found is not None:
            return found
        if fallback:
            text = _pydoc(split)
            print(f"anybit: {key} is not in {settings.corpora_dir()} and not reachable online; "
                  f"using {text.description} instead", file=sys.stderr)
            return text
        raise AnybitError(
            f"dataset {key} not found in {settings.corpora_dir()} and Hugging Face datasets is not reachable; "
            f"set ANYBIT_DATA or --data-dir, or give a .txt/.jsonl path"
        )
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in (".txt", ".jsonl", ".raw", ".tokens") or path.exists():
        return _from_path(path)
    raise AnybitError(f"unknown dataset {name_or_path!r}; give one of {', '.join(DATASETS)} or a .txt/.jsonl path")
