"""Model soups (Wortsman et al., ICML 2022; spec dpp_merge.md §3.3): averages of full weights.

The base model is not used (its keys only fix which tensors are merged).
"""

from __future__ import annotations

from typing import Callable

import torch

from methods.merge.common import StateDict, ordered, record, stack_weights, uniform_mean
from methods.registry import register


def uniform_soup(models: list[StateDict], keys) -> StateDict:
    """(1/N) Σ_i θ_i per tensor, summed in the order given."""
    return {k: uniform_mean(stack_weights(models, k)) for k in keys}


@register("merge", "average", params=(),
          doc="uniform model soup: (1/N) Σ θ_i over the full weights (Wortsman et al. 2022)")
def average(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
            score_fn: Callable[[StateDict], float] | None, info: dict | None = None) -> StateDict:
    names, models = ordered(models, names)
    return uniform_soup(models, base.keys())


@register("merge", "soup-greedy", params=(),
          doc="greedy soup: add models in order of their own score while the soup's score strictly improves")
def soup_greedy(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
                score_fn: Callable[[StateDict], float] | None, info: dict | None = None) -> StateDict:
    """Greedy soup as in the official code (``main.py --greedy-soup``).

    Every model is scored alone with ``score_fn`` (higher is better; it receives a float32 state
    dict with the merged keys), models are sorted by that score, descending (ties: by name), the
    soup starts as the best one, and each next model joins iff the uniform average of the soup's
    ingredients plus this model scores *strictly* higher than the best score so far (the official
    code's ``>``; the paper's Algorithm 1 comparison is unverified, spec §10). One pass, no revisits.
    The soup is always recomputed as the exact uniform mean of its ingredients.

    Records in ``info``: ``ingredients`` (chosen names, in the order added), ``scores`` (each
    model alone), ``candidate_scores`` (the soup score when each later model was tried) and
    ``soup_score``."""
    if score_fn is None:
        raise ValueError("soup-greedy needs a score_fn (a validation score of a state dict; higher is better)")
    names, models = ordered(models, names)
    keys = list(base.keys())
    by_name = dict(zip(names, models))
    singles = {n: {k: m[k].to(torch.float32) for k in keys} for n, m in by_name.items()}
    scores = {n: float(score_fn(singles[n])) for n in names}
    ranking = sorted(names, key=lambda n: (-scores[n], n))
    ingredients = [ranking[0]]
    soup, best = singles[ranking[0]], scores[ranking[0]]
    candidate_scores = {}
    for name in ranking[1:]:
        candidate = uniform_soup([by_name[n] for n in ingredients + [name]], keys)
        score = float(score_fn(candidate))
        candidate_scores[name] = score
        if score > best:
            ingredients.append(name)
            soup, best = candidate, score
    record(info, ingredients=ingredients, scores=scores, candidate_scores=candidate_scores, soup_score=best)
    if len(ingredients) == 1:  # do not hand back the input's own tensors
        soup = {k: v.clone() for k, v in soup.items()}
    return soup
