"""torch.distributed plumbing: one process per rank, launched by ``torchrun`` (no launcher of our own).

torchrun's environment decides everything: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``. Without them (or with ``WORLD_SIZE=1``) :func:`from_env` returns a single-process
:class:`Dist` whose collectives are no-ops, so every stage runs the same code either way.

Backends: ``gloo`` for CPU tensors, ``nccl`` when the stage runs on CUDA (each rank then uses
``cuda:LOCAL_RANK``). Collectives time out after ``SAFESTEER_DIST_TIMEOUT`` seconds (default 1800):
a rank that died or hangs turns into one error line on the others instead of a hang. Config
agreement is checked by hashing (sha256 of canonical JSON) and ``all_gather`` of the digests: no
pickled objects travel between ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as tdist

from safesteer.errors import SafesteerError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800.0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): > 1 means 'launched by torchrun with several
    ranks'."""
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        world = int(raw)
    except ValueError:
        raise SafesteerError(
            f"WORLD_SIZE={raw!r} is not an integer; launch with torchrun --nproc-per-node N"
        ) from None
    if world < 1:
        raise SafesteerError(f"WORLD_SIZE={world} must be >= 1; launch with torchrun --nproc-per-node N")
    return world


def timeout_s() -> float:
    raw = os.environ.get("SAFESTEER_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise SafesteerError(f"SAFESTEER_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise SafesteerError(f"SAFESTEER_DIST_TIMEOUT={raw!r} must be > 0 seconds")
    return value


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def owns(self, shard_index: int) -> bool:
        """Shards are dealt round-robin: shard ``k`` belongs to rank ``k % world``."""
        return int(shard_index) % self.world == self.rank

    def _tensor(self, values: Any, dtype: torch.dtype) -> torch.Tensor:
        # NCCL reduces CUDA tensors only; gloo CPU tensors
        return torch.as_tensor(values, dtype=dtype, device=self.device if self.backend == "nccl" else "cpu")

    def barrier(self, what: str = "a barrier") -> None:
        if not self.enabled:
            return
        with collective(self, what):
            # an all_reduce instead of dist.barrier(): the same timeout semantics on gloo and NCCL
            torch.distributed.all_reduce(self._tensor([1], torch.int64))

    def all_gather_int(self, values: list[int], what: str) -> list[list[int]]:
        """Every rank's list of ints (same length on every rank)."""
        if not self.enabled:
            return [list(values)]
        t = self._tensor(values, torch.int64)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        with collective(self, what):
            torch.distributed.all_gather(out, t)
        return [[int(v) for v in o.cpu().tolist()] for o in out]

    def sum_int(self, values: list[int], what: str) -> list[int]:
        if not self.enabled:
            return list(values)
        t = self._tensor(values, torch.int64)
        with collective(self, what):
            torch.distributed.all_reduce(t)
        return [int(v) for v in t.cpu().tolist()]

    def agree(self, config: dict[str, Any], what: str) -> None:
        """Refuse (on every rank, one line) when the ranks were started with different settings."""
        if not self.enabled:
            return
        keys = sorted(config)
        digests = [_digest(keys)] + [_digest(config[k]) for k in keys]
        # first the number of keys, then the digests (same length on every rank only if the keys agree)
        counts = self.all_gather_int([len(digests)], f"the config check of {what}")
        if len({c[0] for c in counts}) != 1:
            raise SafesteerError(
                f"ranks disagree on the {what} settings (different option sets); start every rank with "
                "the same command"
            )
        table = self.all_gather_int(digests, f"the config check of {what}")
        for r, row in enumerate(table):
            if row == table[0]:
                continue
            if row[0] != table[0][0]:
                names = "the option names"
            else:
                names = ", ".join(k for k, a, b in zip(keys, row[1:], table[0][1:]) if a != b)
            raise SafesteerError(
                f"rank {r} and rank 0 disagree on the {what} settings ({names}); start every rank with "
                "the same command and files"
            )

    def close(self) -> None:
        """Destroy the process group (also done at exit). Do not call ``from_env`` again afterwards in this
        process: torchrun's rendezvous store still holds the old group's addresses."""
        _destroy()


def _destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _digest(obj: Any) -> int:
    raw = json.dumps(obj, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little", signed=True)


@contextlib.contextmanager
def collective(dist: Dist, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one error line naming the step."""
    try:
        yield
    except SafesteerError:
        raise
    except (RuntimeError, ValueError) as exc:  # DistBackendError / DistStoreError subclass RuntimeError
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise SafesteerError(
            f"rank {dist.rank}/{dist.world}: lost contact with the other ranks during {what} ({first}); "
            "a rank died or stalled longer than SAFESTEER_DIST_TIMEOUT; nothing of the unfinished step was "
            "written: re-run the same command (any number of ranks) to resume"
        ) from exc


def from_env(device: str = "cpu") -> Dist:
    """The :class:`Dist` torchrun's environment describes; initialises the process group when WORLD_SIZE > 1.

    ``device``: where the stage computes (``cpu`` → gloo; ``cuda``/``cuda:N`` → NCCL on ``cuda:LOCAL_RANK``).
    """
    world = env_world_size()
    if world == 1:
        return Dist(device=device)
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        raise SafesteerError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset; launch with torchrun (it sets RANK, "
            "LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
        )
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise SafesteerError("RANK and LOCAL_RANK must be integers; launch with torchrun") from None
    if not 0 <= rank < world:
        raise SafesteerError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); launch with torchrun")

    if not tdist.is_available():
        raise SafesteerError(
            "this torch build has no torch.distributed; install a build with distributed support"
        )
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SafesteerError(
                f"device {device!r} requested under torchrun but no CUDA device is visible; use "
                "--device cpu (gloo)"
            )
        if local_rank >= torch.cuda.device_count():
            raise SafesteerError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "use --nproc-per-node <= the number of GPUs per node"
            )
        torch.cuda.set_device(local_rank)
        backend, dev = "nccl", f"cuda:{local_rank}"
    else:
        backend, dev = "gloo", "cpu"
    if not tdist.is_initialized():
        try:
            kwargs: dict[str, Any] = {
                "backend": backend,
                "rank": rank,
                "world_size": world,
                "timeout": timedelta(seconds=timeout_s()),
            }
            if backend == "nccl":
                kwargs["device_id"] = torch.device(dev)
            tdist.init_process_group(**kwargs)
            atexit.register(_destroy)  # one group per process, reused by every stage that calls from_env
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise SafesteerError(
                f"rank {rank}/{world}: cannot join the process group at {addr} ({first}); check "
                "MASTER_ADDR/MASTER_PORT and that every rank started"
            ) from exc
    return Dist(rank=rank, world=world, local_rank=local_rank, backend=backend, device=dev)


__all__ = ["Dist", "collective", "env_world_size", "from_env", "timeout_s"]
