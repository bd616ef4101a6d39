"""The collectives the parallel model math calls, and the device groups of one replica.

A replica is ``cfg x mp`` processes, rank ``cfg_rank * mp + mp_rank``. Tensor-parallel partial
sums travel inside one *mp group* (the ranks of one CFG half); the two CFG halves meet in the
global group, where the CFG exchange is one all-gather (every rank of an mp group holds the same
half, so rank ``c * mp`` stands for half ``c``).

Paddle 3.3.1's gloo backend fails to create overlapping sub-groups, and on our machines it also
failed for disjoint ones as soon as they had 4 ranks (gloo address-size mismatch, then timeouts;
reproduced with bare ``paddle.distributed``). So on gloo the mp groups are *slots* of the global
group: with cfg=2 both halves' mp collectives run as one world collective in which each half
owns a slot (the other half contributes zeros to it). That is still one collective per call,
carrying ``cfg`` times the payload; NCCL and custom-device backends use real disjoint sub-groups.

Every collective is counted (calls and payload bytes per kind) so tests and benchmarks report
what the math really sent, not what the code was meant to send. Nothing here imports Ray.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import paddle

__all__ = [
    "CollectiveCounter",
    "Collectives",
    "DeviceGroups",
    "PaddleCollectives",
    "SingleRank",
    "SlotOfWorld",
    "backend_for_device",
    "init_device_groups",
    "init_world",
    "leave_world",
    "replica_groups",
    "single_process_groups",
]


@dataclass
class CollectiveCounter:
    """Collective calls and payload bytes (what this rank contributes) per kind."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)

    def record(self, kind: str, nbytes: int) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += nbytes

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


def _nbytes(t: paddle.Tensor) -> int:
    return int(t.numel()) * t.element_size()


class Collectives:
    """Rank, world size and the two collectives the model needs, counted in ``counter``.

    A group of one rank sends nothing and counts nothing.
    """

    #: How many payload-sized slots one call of this group puts on the wire.
    payload_copies = 1

    def __init__(self, rank: int, world_size: int, counter: CollectiveCounter | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.counter = counter if counter is not None else CollectiveCounter()

    def all_reduce_sum(self, tensors: list[paddle.Tensor]) -> list[paddle.Tensor]:
        """Element-wise sums over the group, in ONE collective for the whole list.

        The tensors are flattened into one buffer (cast to the first one's dtype), reduced,
        and split back to their shapes and dtypes.
        """
        if self.world_size == 1 or not tensors:
            return list(tensors)
        dtype = tensors[0].dtype
        flat = paddle.concat(
            [t.reshape([-1]) if t.dtype == dtype else t.astype(dtype).reshape([-1]) for t in tensors]
        )
        self.counter.record("all_reduce", _nbytes(flat) * self.payload_copies)
        self._all_reduce(flat)
        sizes = [int(t.numel()) for t in tensors]
        parts = paddle.split(flat, sizes) if len(tensors) > 1 else [flat]
        return [
            p.reshape(t.shape) if p.dtype == t.dtype else p.reshape(t.shape).astype(t.dtype)
            for p, t in zip(parts, tensors, strict=True)
        ]

    def all_gather(self, tensor: paddle.Tensor) -> list[paddle.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""
        if self.world_size == 1:
            return [tensor]
        self.counter.record("all_gather", _nbytes(tensor) * self.payload_copies)
        return self._all_gather(tensor)

    def _all_reduce(self, flat: paddle.Tensor) -> None:
        raise NotImplementedError

    def _all_gather(self, tensor: paddle.Tensor) -> list[paddle.Tensor]:
        raise NotImplementedError


class SingleRank(Collectives):
    """The group of one process: collectives are identities."""

    def __init__(self, counter: CollectiveCounter | None = None):
        super().__init__(0, 1, counter)


class PaddleCollectives(Collectives):
    """Collectives over a ``paddle.distributed`` group (``None``: the global group)."""

    def __init__(self, group=None, counter: CollectiveCounter | None = None):
        import paddle.distributed as dist

        rank = dist.get_rank(group) if group is not None else dist.get_rank()
        size = group.nranks if group is not None else dist.get_world_size()
        super().__init__(rank, size, counter)
        self.group = group

    def _all_reduce(self, flat: paddle.Tensor) -> None:
        import paddle.distributed as dist

        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)

    def _all_gather(self, tensor: paddle.Tensor) -> list[paddle.Tensor]:
        import paddle.distributed as dist

        out: list[paddle.Tensor] = []
        dist.all_gather(out, tensor, group=self.group)
        return out


class SlotOfWorld(Collectives):
    """The ranks ``[slot * size, (slot + 1) * size)`` of ``world`` as a group, without a sub-group.

    Every rank of ``world`` calls each collective at the same time (the CFG halves run the same
    model in lockstep); slot ``k``'s ranks fill slot ``k`` of one world-sized collective.
    ``world`` may itself be a slot of a larger world.
    """

    def __init__(self, world: Collectives, slot: int, size: int):
        if world.world_size % size or not 0 <= world.rank - slot * size < size:
            raise ValueError(
                f"rank {world.rank} of a world of {world.world_size} is not in slot {slot} of size {size}"
            )
        super().__init__(world.rank - slot * size, size, world.counter)
        self.world, self.slot = world, slot
        self.payload_copies = world.world_size // size * world.payload_copies

    def _all_reduce(self, flat: paddle.Tensor) -> None:
        n = int(flat.numel())
        slots = self.world.world_size // self.world_size
        buffer = paddle.zeros([n * slots], dtype=flat.dtype)
        buffer[self.slot * n : (self.slot + 1) * n] = flat
        self.world._all_reduce(buffer)
        paddle.assign(buffer[self.slot * n : (self.slot + 1) * n], output=flat)

    def _all_gather(self, tensor: paddle.Tensor) -> list[paddle.Tensor]:
        everyone = self.world._all_gather(tensor)
        return everyone[self.slot * self.world_size : (self.slot + 1) * self.world_size]


# ---- device groups ----------------------------------------------------------------------------


@dataclass
class DeviceGroups:
    """One rank's view of a ``cfg x mp`` replica: its mp group and the replica-wide (CFG) group."""

    cfg: int
    mp: int
    rank: int
    mp_group: Collectives
    replica: Collectives  # all cfg x mp ranks: the CFG exchange
    counter: CollectiveCounter

    @property
    def cfg_rank(self) -> int:
        """0: the negative (unconditional) half; 1: the positive half."""
        return self.rank // self.mp

    @property
    def mp_rank(self) -> int:
        return self.rank % self.mp

    def half_leader(self, cfg_rank: int) -> int:
        """The replica rank that stands for CFG half ``cfg_rank`` in a replica all-gather."""
        return cfg_rank * self.mp


def single_process_groups() -> DeviceGroups:
    counter = CollectiveCounter()
    return DeviceGroups(1, 1, 0, SingleRank(counter), SingleRank(counter), counter)


def backend_for_device(device: str) -> str:
    """Paddle's collective backend for a device kind: gloo (cpu), nccl (gpu), xccl (custom, e.g. npu)."""
    kind = device.split(":")[0].lower()
    if kind == "cpu":
        return "gloo"
    if kind == "gpu":
        return "nccl"
    return "xccl"


def _check_shape(cfg: int, mp: int) -> None:
    if cfg not in (1, 2):
        raise ValueError(f"cfg={cfg} must be 1 or 2 (the two CFG halves are the only split)")
    if mp < 1:
        raise ValueError(f"mp={mp} must be at least 1")


def replica_groups(world: Collectives, cfg: int, mp: int) -> DeviceGroups:
    """This rank's ``cfg x mp`` replica groups, carved out of ``world`` by slots (no sub-groups).

    ``world`` holds one replica, or several side by side that run in lockstep (tests use this to
    run many replica shapes in one set of processes).
    """
    _check_shape(cfg, mp)
    size = cfg * mp
    if world.world_size % size:
        raise ValueError(
            f"a world of {world.world_size} ranks does not split into replicas of cfg x mp = {size}"
        )
    replica = world if world.world_size == size else SlotOfWorld(world, world.rank // size, size)
    if mp == 1:
        mp_group: Collectives = SingleRank(world.counter)
    elif cfg == 1:
        mp_group = replica
    else:
        mp_group = SlotOfWorld(replica, replica.rank // mp, mp)
    return DeviceGroups(cfg, mp, replica.rank, mp_group, replica, world.counter)


def init_world(rank: int, endpoints: list[str], device: str = "cpu") -> Collectives:
    """Join the ``paddle.distributed`` world of ``len(endpoints)`` ranks (``host:port`` each; rank
    0's is the rendezvous store). Every rank calls this once, with the same endpoints."""
    import paddle.distributed as dist

    world_size = len(endpoints)
    if world_size == 1:
        return SingleRank()
    os.environ.update(
        {
            "PADDLE_TRAINER_ID": str(rank),
            "PADDLE_TRAINERS_NUM": str(world_size),
            "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
            "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
            "PADDLE_DISTRI_BACKEND": backend_for_device(device),
        }
    )
    paddle.set_device(device)
    dist.init_parallel_env()
    return PaddleCollectives(None)


def init_device_groups(
    cfg: int, mp: int, rank: int, endpoints: list[str], device: str = "cpu"
) -> DeviceGroups:
    """Join a replica's world (see :func:`init_world`) and build its groups.

    On gloo the mp groups are slots of the world (see the module docstring); on NCCL and
    custom devices they are real disjoint sub-groups, so each carries only its own payload.
    """
    import paddle.distributed as dist

    _check_shape(cfg, mp)
    if len(endpoints) != cfg * mp:
        raise ValueError(f"got {len(endpoints)} endpoints for cfg x mp = {cfg} x {mp} = {cfg * mp} ranks")
    world = init_world(rank, endpoints, device)
    if cfg == 1 or mp == 1 or backend_for_device(device) == "gloo":
        return replica_groups(world, cfg, mp)
    # Every rank creates every group, in the same order; the groups are disjoint.
    groups = [dist.new_group(list(range(c * mp, (c + 1) * mp))) for c in range(cfg)]
    mp_group = PaddleCollectives(groups[rank // mp], world.counter)
    return DeviceGroups(cfg, mp, rank, mp_group, world, world.counter)


def leave_world() -> None:
    """Leave the world together: a process that exits while a peer still talks to it (rank 0
    also hosts the rendezvous store) can make the peer abort."""
    import paddle.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
