"""The placement groups of a pool of replica-group actors, made and removed by the job's driver.

A ``cfg x mp`` replica's pool actor (``jobs/generate_stage.py``, holding an
``actors.parallel_pipeline.GroupReplica``) gets its placement group from Ray Data, through
``map_batches(..., ray_remote_args_fn=...)``, as ``ray.data.llm`` places its tensor-parallel
engines: one STRICT_PACK group per pool actor (``ReplicaSpec.pool_bundles``). Bundle ``r`` holds
rank ``r``; the last bundle, a token CPU share, holds the pool actor itself, which creates its
ranks in the others (``ray.util.get_current_placement_group()``). A pool actor Ray restarts comes
back into the same group, its ranks having died with it.

The driver that made the groups removes them when the job ends (``remove``, or the end of a
``with`` block); ending a group also ends any actor still in it.
"""

from __future__ import annotations

from typing import Any

from actors.replica import ReplicaSpec

__all__ = ["PoolPlacementGroups"]


class PoolPlacementGroups:
    """``ray_remote_args_fn`` of a pool of ``size`` replica-group actors: each call's remote args
    place one pool actor in its own placement group.

    Ray Data calls the hook once per actor it starts, and once more to read the actors' memory
    request. The pool has a fixed size, and Ray restarts a crashed actor with the options it was
    created with, so ``size`` groups serve every call: calls after the first ``size`` get the same
    groups again, in turn, rather than reserving devices nothing will use."""

    def __init__(self, spec: ReplicaSpec, size: int) -> None:
        self.spec = spec
        self.size = size
        self.groups: list[Any] = []
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if len(self.groups) < self.size:
            self.groups.append(placement_group(self.spec.pool_bundles(), strategy="STRICT_PACK"))
        group = self.groups[self.calls % self.size]
        self.calls += 1
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group,
                placement_group_bundle_index=self.spec.world_size,  # the pool actor's own bundle
                placement_group_capture_child_tasks=True,
            )
        }

    def remove(self) -> None:
        """Remove every group made so far (and so end the actors in them)."""
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            remove_placement_group(group)
        self.groups = []

    def __enter__(self) -> PoolPlacementGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
