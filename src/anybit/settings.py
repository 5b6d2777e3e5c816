"""Where anybit looks for shared models and text.

The data folder defaults to ``../shared/data`` relative to the current directory (the
layout of the project's checkout), or, where that does not exist, relative to the checkout
this package runs from (an editable install used from another directory); it can be moved with ``ANYBIT_DATA`` (the folder
holding ``models/`` and ``corpora/``) or ``ANYBIT_CORPORA`` (the corpora folder alone),
or with the ``--data-dir`` CLI flag, which sets ``ANYBIT_DATA`` for the run.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


def data_dir() -> Path:
    """The shared data folder (may not exist)."""
    env = os.environ.get("ANYBIT_DATA")
    if env:
        return Path(env).expanduser()
    if DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR
    checkout = Path(__file__).resolve().parents[2]  # src/anybit/settings.py -> the checkout
    beside = checkout / DEFAULT_DATA_DIR
    if (checkout / "pyproject.toml").is_file() and beside.is_dir():
        return beside
    return DEFAULT_DATA_DIR


def corpora_dir() -> Path:
    """The folder of evaluation and calibration text (may not exist)."""
    env = os.environ.get("ANYBIT_CORPORA")
    return Path(env).expanduser() if env else data_dir() / "corpora"


def models_dir() -> Path:
    """The folder of small shared models (may not exist)."""
    return data_dir() / "models"
