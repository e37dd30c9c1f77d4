"""Registry of methods by family and name, each with a typed parameter spec.

The workflow enumerates this registry: the config names methods and their parameters, start-up
validation checks them here (naming the config key that is wrong), and each job calls
``get(family, name).fn``. A new method is a function decorated with ``@register``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

FAMILIES = ("finetune", "prune", "merge", "quantize")


class MethodConfigError(ValueError):
    """A method or parameter in the config is unknown or out of range; the message names the key."""


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    doc: str = ""

    def check(self, value: Any, where: str) -> Any:
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is list:
            ok = isinstance(value, list)
        else:
            ok = isinstance(value, self.type) and not (self.type is not bool and isinstance(value, bool))
        if not ok:
            raise MethodConfigError(f"{where}: expected {self.type.__name__}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise MethodConfigError(f"{where}: {value!r} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise MethodConfigError(f"{where}: {value!r} is above the maximum {self.maximum}")
        if self.choices is not None and value not in self.choices:
            raise MethodConfigError(f"{where}: {value!r} is not one of {list(self.choices)}")
        return value


@dataclass(frozen=True)
class MethodSpec:
    family: str
    name: str
    fn: Callable
    params: tuple[Param, ...] = field(default_factory=tuple)
    doc: str = ""
    n_models: tuple[int, int | None] = (1, None)  # merges: how many fine-tuned models it takes
    # fine-tuning methods that change the model itself (LoRA): prepare_model(model, spec, params)
    # before training and finalize_model(model) before saving
    hooks: dict = field(default_factory=dict)

    def resolve(self, given: dict | None, where: str) -> dict:
        """Fill defaults and check every given parameter; ``where`` is the config key prefix."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise MethodConfigError(
                f"{where}.{unknown[0]}: unknown parameter of {self.family} method {self.name!r}; "
                f"known: {', '.join(known) or 'none'}")
        return {name: p.check(given[name], f"{where}.{name}") if name in given else p.default
                for name, p in known.items()}


_REGISTRY: dict[str, dict[str, MethodSpec]] = {family: {} for family in FAMILIES}


def register(family: str, name: str, params: tuple[Param, ...] = (), doc: str = "",
             n_models: tuple[int, int | None] = (1, None), hooks: dict | None = None):
    if family not in _REGISTRY:
        raise ValueError(f"unknown method family {family!r}; families: {FAMILIES}")

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY[family]:
            raise ValueError(f"{family} method {name!r} is registered twice")
        _REGISTRY[family][name] = MethodSpec(family, name, fn, tuple(params), doc or (fn.__doc__ or ""),
                                             n_models, dict(hooks or {}))
        return fn

    return decorate


def _load_builtin_methods() -> None:
    # Importing the family packages registers their methods.
    import methods.finetune.adamr  # noqa: F401
    import methods.finetune.lora  # noqa: F401
    import methods.finetune.train  # noqa: F401
    import methods.prune  # noqa: F401
    import methods.merge  # noqa: F401
    import methods.quantize  # noqa: F401


def get(family: str, name: str, where: str | None = None) -> MethodSpec:
    _load_builtin_methods()
    try:
        return _REGISTRY[family][name]
    except KeyError:
        raise MethodConfigError(
            f"{where or family}: unknown {family} method {name!r}; known: {', '.join(names(family))}"
        ) from None


def names(family: str) -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY[family])
