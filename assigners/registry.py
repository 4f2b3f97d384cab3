"""The assigner registry: ``@register_assigner`` next to each class, ``build`` and ``available`` on top.

    @register_assigner("atss", uses_predictions=False)
    class ATSSAssigner(Assigner): ...

    assigners.build("atss", topk=9)  # -> ATSSAssigner(topk=9)

The decorator sets the class's ``name`` (its registry key, the ``name`` of its Hydra config)
and ``uses_predictions`` (whether it scores anchors by the detector's predictions), so both are
written once, where the class is defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import Assigner

AssignerClass = TypeVar("AssignerClass", bound=type[Assigner])

_REGISTRY: dict[str, type[Assigner]] = {}


def register_assigner(name: str, *, uses_predictions: bool) -> Callable[[AssignerClass], AssignerClass]:
    """Class decorator: register an ``Assigner`` subclass under ``name``.

    Sets ``cls.name = name`` and ``cls.uses_predictions = uses_predictions`` (a bool). A name
    can be registered once; a second class under the same name raises ValueError.
    """

    def register(cls: AssignerClass) -> AssignerClass:
        if not (isinstance(cls, type) and issubclass(cls, Assigner)):
            raise TypeError(f"register_assigner('{name}') decorates an Assigner subclass, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"assigner '{name}' is already registered ({_REGISTRY[name].__qualname__})")
        if not isinstance(uses_predictions, bool):
            raise TypeError(f"uses_predictions of assigner '{name}' must be a bool, got {uses_predictions!r}")
        cls.name = name
        cls.uses_predictions = uses_predictions
        _REGISTRY[name] = cls
        return cls

    return register


def available() -> list[str]:
    """Sorted names of the registered assigners."""
    return sorted(_REGISTRY)


def assigner_class(name: str) -> type[Assigner]:
    """The class registered under ``name``; ValueError naming the valid choices otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown assigner '{name}'; valid choices: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, **kwargs: Any) -> Assigner:
    """Build the assigner registered under ``name`` with its plain keyword parameters."""
    return assigner_class(name)(**kwargs)


__all__ = ["assigner_class", "available", "build", "register_assigner"]
