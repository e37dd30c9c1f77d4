"""Split protocols for benchmarks whose test labels are not public.

GLUE's test labels are hidden, so the DARE/DAREx papers (MergeLM ``utils/glue_data_loader.py``)
select on a fixed 10% of GLUE train and report on GLUE dev: the train rows are permuted with
``numpy.random.RandomState(0)``, the first ``int(0.9 · n)`` become train and the rest validation.
``paper_holdout`` reproduces exactly that index arithmetic, so our validation rows are theirs.
"""

from __future__ import annotations

import numpy as np

from methods.seeding import derive_seed


def paper_holdout(rows: list[dict], fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, validation): ``fraction`` of ``rows`` held out as in MergeLM."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    order = np.random.RandomState(seed=seed).permutation(len(rows)).tolist()
    n_train = int((1 - fraction) * len(rows))
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train:]]


def subsample(rows: list[dict], limit: int | None, *keys) -> list[dict]:
    """At most ``limit`` rows, drawn without replacement by a seed derived from ``keys``, in their
    original order (so a cap is reproducible and does not reorder the data)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.random.RandomState(derive_seed("subsample", *keys) % 2**32).choice(len(rows), limit, replace=False)
    return [rows[i] for i in sorted(keep.tolist())]
