"""Choose a merge method's hyper-parameters on a validation split.

Every point of the grid is merged in memory and scored by ``score_fn`` (the workflow passes the mean
normalized validation score over the merged tasks); the best point wins, the first in grid order on
a tie. The reported split is never seen here.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from methods import registry


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Cartesian product of the grid, keys in sorted order, values in the order given."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def search(method: str, base: dict[str, torch.Tensor], models: dict[str, dict[str, torch.Tensor]],
           fixed: dict, grid: dict[str, list], score_fn: Callable[[dict[str, torch.Tensor]], float] | None,
           *, seed: int, exclude: list[str], where: str = "merge", device: str | torch.device | None = None,
           ) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge at every grid point (on ``device``, ``merge_state_dicts``) and keep the best; returns
    (merged tensors on the CPU, selection record)."""
    from methods.merge.apply import merge_state_dicts

    spec = registry.get("merge", method)
    points = grid_points(grid) or [{}]
    trials, best = [], None
    for point in points:
        params = spec.resolve({**fixed, **point}, where)
        merged, info = merge_state_dicts(method, base, models, params, seed=seed, exclude=exclude,
                                         score_fn=score_fn, device=device)
        # A single point needs no scoring to be chosen; score it anyway when a scorer is given so
        # the report can show its validation score.
        score = score_fn(merged) if score_fn is not None else None
        trials.append({"params": params, "validation_score": score, "info": info})
        if best is None or (score is not None and score > best[0]):
            best = (score if score is not None else float("-inf"), merged, params, info)
    _, merged, params, info = best
    return merged, {"method": method, "params": params, "grid": grid, "trials": trials, "info": info}
