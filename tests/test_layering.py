"""The package layers import downwards only: formats/kernels/nn/models never import io (the
io layer registers its folder loader with models/loader.py instead)."""

import re

from conftest import ROOT

LOWER = ("formats", "kernels", "nn", "models")


def test_lower_layers_do_not_import_io():
    bad = []
    for layer in LOWER:
        for path in sorted((ROOT / "src" / "anybit" / layer).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"from \.\.io\b|from anybit\.io\b|import anybit\.io\b", line):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_anybit_folders_load_through_the_registered_loader():
    import anybit  # noqa: F401  (registers io's loader)
    from anybit.io import checkpoint
    from anybit.models import loader

    assert loader._FOLDER_LOADERS["anybit"] is checkpoint.load
