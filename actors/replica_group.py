"""A replica group: ``cfg x mp`` shard-worker actors pinned together by one placement group.

Rank r takes bundle r, one device of the spec's kind (``ReplicaSpec.rank_bundles``), all packed
onto one node (STRICT_PACK: the ranks' collectives run every few milliseconds). Each group has
its own placement group and its own Paddle world (rank 0's address and a free port), so many
groups run side by side for throughput. Used alone (``ParallelStableDiffusion3Pipeline``), a
group makes its placement group and removes it in ``shutdown``; in the batch job it takes its
pool actor's (made and removed by the job's driver: ``actors/pool_placement.py``).

Shape errors (``num_attention_heads % mp``, cfg not in {1, 2}) are raised before anything is
created. A rank that fails while its peers wait in a collective would hang them forever, so a
call in which a rank's process dies, or some ranks fail and the others do not finish within
``grace_seconds``, tears the group down and raises :class:`ReplicaGroupBroken`; an error every
rank raises alike (a bad argument, found before any collective) reaches the caller as itself
and leaves the group usable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from actors.replica import ReplicaSpec
from actors.shard_worker import ShardWorker
from sd3_core.lora_registry import PinnedLoRA
from sd3_core.storage import join_url, read_bytes
from sd3_core.tensor_parallel import check_tensor_parallel

__all__ = ["ReplicaGroup", "ReplicaGroupBroken", "check_replica_shape"]

logger = logging.getLogger(__name__)


class ReplicaGroupBroken(RuntimeError):
    """Some ranks failed and the others are stuck in a collective: the group is gone."""


def check_replica_shape(spec: ReplicaSpec) -> dict[str, Any]:
    """Raise ValueError unless ``spec.model``'s transformer splits into ``spec.mp`` shards;
    returns the transformer config. Reads one small JSON file, starts nothing."""
    url = join_url(spec.model, "transformer", "config.json")
    try:
        config = json.loads(read_bytes(url, spec.storage))
    except FileNotFoundError:
        raise ValueError(f"model {spec.model}: no transformer config at {url}") from None
    try:
        check_tensor_parallel(config, spec.mp)
    except ValueError as e:
        raise ValueError(f"model {spec.model}: {e}") from None
    return config


class ReplicaGroup:
    """The ranks of one ``spec.cfg x spec.mp`` replica, ready to generate once constructed.

    ``compute_device`` overrides the kind of device the ranks compute on (default: the bundles'
    kind); tests use "cpu" with GPU-kind bundles of Ray's logical GPUs. ``placement_group``: one
    whose bundles ``0 .. world_size - 1`` are the ranks' (``ReplicaSpec.pool_bundles``), which the
    group leaves in place; by default the group makes its own and removes it in ``shutdown``.
    """

    def __init__(
        self,
        spec: ReplicaSpec,
        compute_device: str | None = None,
        ready_timeout: float | None = 600.0,
        grace_seconds: float = 30.0,
        placement_group: Any = None,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        check_replica_shape(spec)  # before any placement group or actor exists
        self.spec = spec
        self.grace_seconds = grace_seconds
        self.world_size = spec.world_size
        bundle = spec.device_bundle()
        self.owns_placement_group = placement_group is None
        if placement_group is None:
            placement_group = ray.util.placement_group(spec.rank_bundles(), strategy="STRICT_PACK")
        elif len(placement_group.bundle_specs) < self.world_size:
            raise ValueError(
                f"a placement group of {len(placement_group.bundle_specs)} bundles cannot hold the "
                f"{self.world_size} ranks of cfg={spec.cfg} x mp={spec.mp}"
            )
        self.placement_group = placement_group
        self.workers: list[Any] = []
        self.endpoints: list[str] = []
        self.last_stats: list[dict[str, Any]] = []
        try:
            try:
                ray.get(self.placement_group.ready(), timeout=ready_timeout)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(
                    f"no node could hold {self.world_size} bundles of {bundle} (cfg={spec.cfg} x "
                    f"mp={spec.mp}) within {ready_timeout}s; add devices or lower --mp/--replicas"
                ) from None
            remote = ray.remote(ShardWorker)
            resources = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
            for rank in range(self.world_size):
                self.workers.append(
                    remote.options(
                        num_cpus=bundle.get("CPU", 0),
                        num_gpus=bundle.get("GPU", 0),
                        resources=resources,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            self.placement_group, placement_group_bundle_index=rank
                        ),
                    ).remote(rank, spec.cfg, spec.mp, compute_device or spec.device, max(1, int(spec.cpus)))
                )
            # Rank 0 publishes the rendezvous address; every rank gets the whole list.
            self.endpoints = ray.get([w.endpoint.remote() for w in self.workers])
            self.pids = self._all("join", self.endpoints)
            self.load(spec.model)
            if spec.lora is not None:
                self.load_lora(spec.lora, spec.lora_scale)
        except BaseException:
            self.shutdown(leave=False)
            raise

    @property
    def name(self) -> str:
        where = self.endpoints[0] if self.endpoints else "not started"
        return f"cfg{self.spec.cfg}xmp{self.spec.mp}@{where}"

    def load(self, model: str) -> list[int]:
        """Load ``model`` (its heads must split by mp too) on every rank; per-rank transformer bytes."""
        if model != self.spec.model:
            check_replica_shape(replace(self.spec, model=model))
        loaded = self._all("load", model, self.spec)
        self.parameter_bytes: list[int] = [r["param_bytes"] for r in loaded]
        self.model: str = loaded[0]["model"]
        self.lora: str | None = None
        return self.parameter_bytes

    def load_lora(self, lora: PinnedLoRA, scale: float = 1.0) -> str:
        """Bake the pinned adapter into every rank's transformer shard (``actors.replica.apply_lora``,
        each rank fetching the file on its node); its identity."""
        self.lora = self._all("apply_lora", lora, scale, self.spec.storage)[0]
        return self.lora

    def submit(self, args: dict[str, Any]) -> list[Any]:
        """Start one pipeline call on every rank; the refs of their ``(images, stats)``."""
        import ray

        workers = self._live_workers()
        shared = ray.put(args)  # once, not once per rank (arguments may hold prompt embeddings)
        return [w.generate.remote(shared) for w in workers]

    def result(self, refs: list[Any]) -> np.ndarray:
        """Rank 0's images of a :meth:`submit`; every rank's stats go to ``last_stats``."""
        outputs = self._wait(refs)
        self.last_stats = [stats for _, stats in outputs]
        return outputs[0][0]

    def generate(self, args: dict[str, Any]) -> np.ndarray:
        """One pipeline call (``generate_on_rank``'s arguments); rank 0's images."""
        return self.result(self.submit(args))

    def call_pipeline(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``pipe.<name>(...)`` on every rank (the LoRA methods); rank 0's result."""
        return self._all("call_pipeline", name, args, kwargs)[0]

    def shutdown(self, leave: bool = True) -> None:
        """Leave the collective world together, then free the actors (and the placement group, if
        the group made it)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        left = False
        if leave and self.workers:
            try:
                ray.get([w.leave.remote() for w in self.workers], timeout=60)
                left = True
            except Exception as e:  # the actors are killed below instead
                logger.warning("replica group %s did not leave its world cleanly: %s", self.name, e)
        if left:  # a clean exit: a kill makes Paddle print a fatal-signal trace
            exits = [w.__ray_terminate__.remote() for w in self.workers]
            ray.wait(exits, num_returns=len(exits), timeout=30)
        for w in self.workers:
            ray.kill(w)  # no-op for an actor that has exited
        self.workers = []
        if self.owns_placement_group and self.placement_group is not None:
            remove_placement_group(self.placement_group)
        self.placement_group = None

    def _live_workers(self) -> list[Any]:
        if not self.workers:
            raise ReplicaGroupBroken("this replica group has been shut down")
        return self.workers

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._wait([getattr(w, method).remote(*args) for w in self._live_workers()])

    def _wait(self, refs: list[Any]) -> list[Any]:
        """Every rank's result, in rank order; see the module docstring for failures."""
        import ray

        pending, failed = list(refs), []
        while pending:
            timeout = self.grace_seconds if failed else None
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                break  # the others wait for a failed peer in a collective
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:
                    failed.append(e)
        if not failed:
            return ray.get(list(refs))
        if pending or any(isinstance(e, ray.exceptions.RayActorError) for e in failed):
            self.shutdown(leave=False)
            stuck = f", {len(pending)} stuck in a collective" if pending else ""
            raise ReplicaGroupBroken(
                f"{len(failed)} of {len(refs)} ranks failed{stuck}; the group was stopped. "
                f"First error: {failed[0]!r}"
            ) from failed[0]
        raise _cause(failed[0]) from failed[0]


def _cause(error: Exception) -> Exception:
    """The user's exception inside a RayTaskError (e.g. a ValueError naming a bad argument)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error
