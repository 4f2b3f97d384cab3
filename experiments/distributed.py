"""torch.distributed helpers: process info, device choice, barriers, rank-0 decisions, the sharding and
gathering of evaluation, and ``FailureWatch`` (one rank's failure ends every rank of a torchrun job).

Python objects (decisions, detections) travel through a gloo process group: the default group when the
backend is gloo, else one gloo group made next to it at setup (detectron2's ``comm`` does the same), so
no object collective has to stage its pickles in GPU memory or know which GPU is this process's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

_object_group: Any = None  # the gloo group of object collectives when the default backend is not gloo


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """``rank 1 of 2``: how failure records and messages name this process."""
        return f"rank {self.rank} of {self.world_size}"


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # NCCL's own collectives (barrier) use the current device
        dist.init_process_group(backend)
        _objects_group()  # every rank makes its groups in the same order: here, right after init
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _objects_group():
    """The gloo group that object collectives use (None: the default group, itself gloo)."""
    global _object_group
    if _object_group is None and dist.get_backend() != "gloo":
        _object_group = dist.new_group(backend="gloo")  # initialised by someone else: made here, by every rank
    return _object_group


def select_device(name: str, dist_info: DistInfo) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` is this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for, but CUDA is not available")
        return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


def barrier(dist_info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if dist_info.world_size > 1:
        dist.barrier()


def as_on_rank_zero(value: Any, dist_info: DistInfo) -> Any:
    """``value`` (any picklable object) as rank 0 of this torchrun job has it (``value`` itself in a single
    process). Every rank must call it."""
    if dist_info.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_objects_group())
    return box[0]


def shard_batches(num_items: int, batch_size: int, dist_info: DistInfo) -> list[int]:
    """The positions (0-based, increasing) of the items this process handles when ``num_items`` items, cut
    in order into batches of ``batch_size``, are dealt out batch by batch: rank r takes batches r, r + W,
    r + 2W, ... of W processes (all of them in one process).

    Whole batches, not images, are dealt so that every batch holds the images it holds in one process:
    the same padded size and batch size, hence the same detections. No item is repeated (unlike
    ``DistributedSampler``'s padding); a rank may get fewer batches than another, or none.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = range(dist_info.rank, -(-num_items // batch_size), dist_info.world_size)
    return [p for b in batches for p in range(b * batch_size, min((b + 1) * batch_size, num_items))]


def gather_in_order(positions: list[int], items: list, dist_info: DistInfo) -> list | None:
    """Every rank's ``items`` (item i at position ``positions[i]``, as ``shard_batches`` deals them) on rank
    0, as one list in position order; None on the other ranks; ``items`` itself in one process. Every rank
    must call it."""
    if len(positions) != len(items):
        raise ValueError(f"{len(items)} items for {len(positions)} positions")
    if dist_info.world_size == 1:
        return list(items)
    gathered = [None] * dist_info.world_size if dist_info.is_main else None
    dist.gather_object(list(zip(positions, items)), gathered, dst=0, group=_objects_group())
    if not dist_info.is_main:
        return None
    pairs = sorted(itertools.chain.from_iterable(gathered), key=lambda pair: pair[0])
    return [item for _, item in pairs]


class FailureWatch:
    """Ends every rank of a torchrun job within about ``poll_seconds`` of one rank's failure.

    A rank that fails cannot leave the collective the other ranks wait in (a DDP gradient all-reduce,
    an evaluation gather): they would wait for the communication timeout (30 min by default; gloo
    sometimes notices a dead peer sooner, NCCL and other nodes do not). So the failure travels
    through the job's c10d store (torchrun's agent hosts it; it outlives any worker):

    - the failing rank calls ``claim()``: True for the first rank of the job to fail in this
      ``scope`` (store key ``<scope>/claims``, an atomic add), which records the failure (it names
      the rank: ``DistInfo.describe``) and then calls ``announce(error)``; a later claimant's error
      is a consequence of the first (a peer's closed connection), so it records nothing;
    - every rank's watch thread polls the store for an announced error of another rank and, when it
      finds one, prints it and ends its process with ``os._exit(1)``: its main thread may be blocked
      in a collective that no Python code can interrupt.

    torchrun then sees non-zero exits and ends the job. ``scope`` names the keys (a run directory);
    the restart count of an elastic job (``TORCHELASTIC_RESTART_COUNT``) is part of them, so a
    restarted job is not stopped by the failure that restarted it. In one process (and when the store
    cannot be reached) the watch does nothing and ``claim()`` is True.
    """

    def __init__(self, dist_info: DistInfo, scope: str, poll_seconds: float = 1.0):
        self.dist_info, self.scope, self.poll_seconds = dist_info, str(scope), float(poll_seconds)
        prefix = f"assignbench/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{self.scope}"
        self.claims_key, self.error_key = f"{prefix}/claims", f"{prefix}/error"
        self.store = dist.distributed_c10d._get_default_store() if dist_info.world_size > 1 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FailureWatch:
        if self.store is not None and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="assignbench-failure-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FailureWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def claim(self) -> bool:
        """Whether this rank is the first of the job to fail in this scope (and so records the failure)."""
        if self.store is None:
            return True
        try:
            return self.store.add(self.claims_key, 1) == 1
        except Exception:  # noqa: BLE001  the store is gone (its host died): record, rather than lose the cause
            return True

    def announce(self, error: str) -> None:
        """Tell every other rank that this one failed with ``error`` (after the failure is recorded)."""
        if self.store is None:
            return
        try:
            self.store.set(self.error_key, f"{self.dist_info.rank}\n{error}")
        except Exception:  # noqa: BLE001  torchrun still ends the others when this process exits
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                if not self.store.check([self.error_key]):
                    continue
                rank, error = self.store.get(self.error_key).decode().split("\n", 1)
            except Exception:  # noqa: BLE001  the store closed: the job is ending; nothing left to watch
                return
            if int(rank) == self.dist_info.rank:
                return  # this rank's own failure: its main thread is already ending the process
            print(f"[assignbench] {self.scope}: {self.dist_info.describe()} stops: {error}", file=sys.stderr,
                  flush=True)
            sys.stdout.flush()
            os._exit(1)


__all__ = [
    "DistInfo",
    "FailureWatch",
    "as_on_rank_zero",
    "barrier",
    "gather_in_order",
    "select_device",
    "setup_distributed",
    "shard_batches",
]
