"""Delta-parameter pruning methods (registered under the "prune" family).

Importing this package registers every method: ``dare`` (dare.py), ``drop-only`` and ``darex-q``
(darex.py, with the DAREx q rules), ``magnitude`` and ``importance`` (importance.py), ``structural``
(structural.py). ``methods.prune.apply.prune_state_dict`` prunes a whole model;
``methods.prune.calibration`` collects activation statistics; ``methods.prune.diagnostics`` measures
deltas and recommends a method.
"""

from methods.prune import (  # noqa: F401  (imported to register the methods)
    dare,
    darex,
    importance,
    structural,
)

__all__ = ["dare", "darex", "importance", "structural"]
