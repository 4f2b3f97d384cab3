"""Where a result came from: library versions, device, threads and a hash of the data's annotations.

The same seed gives a different AP on a different CPU (float reductions differ), so every run
records this in ``metrics.json`` (``environment``) and comparisons name both sides.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("torch", "torchvision", "numpy", "pycocotools")


def file_digest(paths: list[Path]) -> str:
    """sha256 over the bytes of ``paths`` in the given order (first 16 hex digits)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_signature() -> dict[str, str | None]:
    """What tells two CPUs apart when virtual machines name them alike ("AMD EPYC"): the SIMD level torch
    dispatches its kernels for (``torch.backends.cpu.get_cpu_capability``, e.g. AVX2 or AVX512), the
    family/model/stepping numbers and a hash of the feature flags from /proc/cpuinfo (None off Linux).

    Two machines with one name but different kernels round floating point differently, so the same
    seed trains to another AP: this is the record that says so.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model", "stepping", "flags") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    flags = fields.get("flags")
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "family_model_stepping": "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
        if fields else None,
        "flags_hash": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12] if flags else None,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_environment(device: torch.device, annotation_files: list[Path], world_size: int = 1) -> dict[str, Any]:
    """The ``environment`` record of ``metrics.json``.

    annotation_files: the train and val annotation files the run read (their hash is ``data_hash``).
    """
    return {
        "versions": {"python": platform.python_version(), **library_versions()},
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_signature(),
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "platform": platform.platform(),
        "data_hash": file_digest(annotation_files),
        "annotations": [str(p) for p in annotation_files],
    }


__all__ = ["LIBRARIES", "cpu_name", "cpu_signature", "describe_environment", "device_name", "file_digest", "library_versions"]
