"""OmegaConf resolvers used by the configs (registered on import of ``experiments``)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _mul(a, b) -> float:
    return float(a) * float(b)


def _csv(values) -> str:
    """A list as Hydra's sweep syntax: [0, 1, 2] -> "0,1,2" (grids sweep ``seeds`` this way)."""
    if isinstance(values, str | int | float):
        return str(values)
    return ",".join(str(v) for v in values)


def _run_name(variant_id, seed) -> str:
    """A run's directory name, as the results contract spells it (``runfiles.run_name``)."""
    from .runfiles import run_name

    return run_name(str(variant_id), int(seed))


def register() -> None:
    for name, fn in (("ab.mul", _mul), ("ab.csv", _csv), ("ab.run_name", _run_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
