"""Checkpoint I/O (atomic) and the finite-weights check that guards every save and evaluation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .errors import NonFiniteWeightsError
from .runfiles import atomic_write_bytes


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save(state)`` written by temp file + fsync + rename: a kill never leaves a torn file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (tensors on CPU), or None when there is none."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def check_finite_state(model: torch.nn.Module, it: int) -> None:
    """Raise NonFiniteWeightsError unless every float weight and buffer of ``model`` is finite."""
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()  # one device sync
    bad = [name for name, ok in zip(tensors, finite) if not ok]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteWeightsError(f"non-finite weights after iteration {it}: {', '.join(bad[:5])}{more}")


__all__ = ["check_finite_state", "load_checkpoint", "save_checkpoint"]
