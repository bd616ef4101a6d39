"""Model replicas for the batch job: what one member of the Ray Data actor pool runs.

A *replica* is whatever renders a batch of same-shape images: today one process holding a
`StableDiffusion3Pipeline` (`LocalReplica`); with issue 4 a group of `cfg x mp` actors in one
placement group, driven from the pool actor. Both sit behind the `Replica` protocol, and
`ReplicaSpec` is the one place that says which Ray resources a replica takes, so the batch job
(`jobs/batch_generate.py`) never changes when a new replica shape plugs in.

`GenerateStage` is the callable class given to `Dataset.map_batches`: it builds its replica once
(in `__init__`, i.e. once per actor and again when Ray restarts a killed actor), groups the rows of
a batch by (height, width, steps, guidance, max_sequence_length), renders each group with one
pipeline call and per-image seeds, and returns raw uint8 pixels plus metadata. Encoding and upload
happen in the next (CPU task) stage so they overlap the next batch's compute.
"""

from __future__ import annotations

import sd3_core.runtime  # noqa: F401  (thread/MKL settings must precede paddle's import)

import logging
import os
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from jobs.lora_registry import PinnedLoRA
from jobs.prompt_table import WORK_ROW_SCHEMA
from jobs.storage import StorageOptions

logger = logging.getLogger(__name__)
# Paddle warns on import that it cannot find ccache (it only matters when building C++ extensions).
warnings.filterwarnings("ignore", message="No ccache found")

DEVICES = ("cpu", "gpu", "npu")
DTYPES = ("float32", "float16", "bfloat16")


def _item_schema() -> pa.Schema:
    """A work row (jobs.prompt_table.WORK_ROW_SCHEMA) expanded to one image: plus `k`, a `status`
    ("todo": render; "error": a bad row, `error` says why; "skip": done by an earlier run) and
    `row_items` (items emitted for this row in this run; progress counts rows). `seed` is the seed
    of this image (row seed + k, modulo 2**63)."""
    fields = list(WORK_ROW_SCHEMA)
    fields.insert(fields.index(WORK_ROW_SCHEMA.field("key")) + 1, pa.field("k", pa.int64()))
    fields.insert(fields.index(WORK_ROW_SCHEMA.field("error")), pa.field("status", pa.string()))
    fields.append(pa.field("row_items", pa.int64()))
    return pa.schema(fields)


# Columns a work item carries through the graph (read stage -> GenerateStage -> write stage).
ITEM_SCHEMA = _item_schema()
# With `ReplicaSpec.benchmark`: an image's share of its pipeline call's stage seconds and denoising
# steps (summing over images gives the totals; null for a replica group, whose stages run on its
# ranks), and the peak RSS of the process that rendered it.
BENCHMARK_TYPE = pa.struct(
    [
        ("text_encoding", pa.float64()),
        ("denoising", pa.float64()),
        ("denoising_steps", pa.float64()),
        ("vae_decode", pa.float64()),
        ("peak_rss_bytes", pa.int64()),
    ]
)
# What GenerateStage adds: pixels (H*W*3 uint8, row-major), render seconds per image, who rendered it.
RESULT_SCHEMA = pa.schema(
    [
        *ITEM_SCHEMA,
        ("image", pa.binary()),
        ("seconds", pa.float64()),
        ("replica", pa.string()),
        ("model", pa.string()),  # model identity: URI + hash of its configs
        ("lora", pa.string()),  # adapter identity: pinned reference + sha256 (null: no adapter)
        ("lora_scale", pa.float64()),
        ("_benchmark", BENCHMARK_TYPE),  # null unless ReplicaSpec.benchmark
    ]
)

GROUP_COLUMNS = ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica is: the model, its precision, its devices and how they are split.

    `cfg` x `mp` is the replica group shape (issue 4: CFG halves x tensor-parallel shards); 1 x 1 is
    one process. `cpus` is the CPU share of a replica on `device="cpu"` (its thread count), or of
    its host-side work on accelerators. `lora` is an adapter every replica bakes into its
    transformer at `lora_scale` (see `apply_lora`)."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    cfg: int = 1
    mp: int = 1
    cpus: float = 1.0
    storage: StorageOptions = field(default_factory=StorageOptions)
    lora: PinnedLoRA | None = None
    lora_scale: float = 1.0
    inference_optimize: bool = False  # the transformer as cached static programs (sd3_core.inference_program)
    benchmark: bool = False  # warm up once, then time each call's stages (see BENCHMARK_TYPE)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} must be one of {DEVICES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg={self.cfg!r} must be 1 or 2")
        if not isinstance(self.mp, int) or self.mp < 1:
            raise ValueError(f"mp={self.mp!r} must be an integer >= 1")
        if not self.cpus > 0:
            raise ValueError(f"cpus={self.cpus!r} must be > 0")
        if self.inference_optimize and self.device == "npu":
            raise ValueError("inference_optimize runs on CPU and GPU; NPU replicas run eagerly")
        if self.inference_optimize and self.mp > 1:
            raise ValueError(
                f"inference_optimize runs whole transformers; mp={self.mp} shards run eagerly "
                "(use mp=1: CFG parallelism works with it)"
            )

    @property
    def world_size(self) -> int:
        """Processes (and devices) in one replica."""
        return self.cfg * self.mp

    def device_bundle(self) -> dict[str, float]:
        """Ray resources of one rank: one device of the chosen kind (plus its host CPUs).

        Issue 4's placement groups use one such bundle per rank."""
        if self.device == "gpu":
            return {"CPU": self.cpus, "GPU": 1.0}
        if self.device == "npu":
            return {"CPU": self.cpus, "NPU": 1.0}
        return {"CPU": self.cpus}

    def pool_actor_resources(self) -> dict[str, Any]:
        """Keyword arguments for `map_batches` (num_cpus, num_gpus, resources) of one pool actor.

        A single-process replica runs in the pool actor, which therefore holds the device. A
        replica group's pool actor only coordinates; its ranks hold the devices through their
        placement group, so the pool actor asks for a token CPU share."""
        if self.world_size > 1:
            return {"num_cpus": 0.01}
        bundle = self.device_bundle()
        args: dict[str, Any] = {"num_cpus": bundle["CPU"]}
        if "GPU" in bundle:
            args["num_gpus"] = bundle["GPU"]
        if "NPU" in bundle:
            args["resources"] = {"NPU": bundle["NPU"]}
        return args

    def total_resources(self, replicas: int) -> dict[str, float]:
        """Ray resources `replicas` replicas take in all (to check the cluster can hold them)."""
        out: dict[str, float] = {}
        for name, amount in self.device_bundle().items():
            out[name] = out.get(name, 0.0) + amount * self.world_size * replicas
        return out


@dataclass(frozen=True)
class RenderRequest:
    """One pipeline call: images that share a shape, step count, guidance and T5 length.

    Lists are per image (a row with num_images=3 appears three times, with seeds s, s+1, s+2)."""

    prompt: Sequence[str]
    prompt_2: Sequence[str]
    prompt_3: Sequence[str]
    negative_prompt: Sequence[str]
    negative_prompt_2: Sequence[str]
    negative_prompt_3: Sequence[str]
    seed: Sequence[int]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int


class Replica(Protocol):
    """Renders requests to uint8 HxWx3 arrays, one per image, in request order."""

    name: str  # which replica made an image (host:pid of the process driving it)
    model: str  # model identity (the manifest's `model` column)
    lora: str | None  # identity of the adapter in its weights (the manifest's `lora` column)

    def render(self, request: RenderRequest) -> list[np.ndarray]: ...


def _paddle_device(device: str) -> str:
    if device == "gpu":
        return "gpu:0"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
    if device == "npu":
        return "npu:0"  # Ray sets ASCEND_RT_VISIBLE_DEVICES to the actor's NPU
    return "cpu"


def apply_lora(pipe: Any, lora: PinnedLoRA, scale: float, storage: StorageOptions) -> str:
    """Load exactly the pinned adapter (its sha256 checked) into `pipe` at `scale` and bake it
    into the transformer's weights; returns its identity.

    Fused, then unloaded, as diffusers users do for inference, but a layer at a time
    (``sd3_core.lora.bake_lora``): the forward then costs what the base model's does, and the
    unfused weights are never all held at once."""
    from jobs.lora_registry import fetch_lora
    from sd3_core.lora import bake_lora

    pipe.load_lora_weights(fetch_lora(lora, storage), adapter_name="job", scale=scale)
    bake_lora(pipe.transformer)
    return lora.identity


class LocalReplica:
    """A whole pipeline in this process (the 1 x 1 replica)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import paddle

        from jobs.model_cache import local_model_path, model_identity
        from pipelines import StableDiffusion3Pipeline

        paddle.set_device(_paddle_device(spec.device))
        if spec.device == "cpu":
            # Ray gives a CPU actor OMP_NUM_THREADS=num_cpus; keep Paddle's pool to that share.
            paddle.base.core.set_num_threads(max(1, int(spec.cpus)))
        path = local_model_path(spec.model, spec.storage)
        self.pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=spec.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        if spec.benchmark:
            from pipelines.stage_timer import StageTimer

            self.pipe.stage_timer = StageTimer()
        self.model = model_identity(path, spec.model)
        self.lora = (
            None if spec.lora is None else apply_lora(self.pipe, spec.lora, spec.lora_scale, spec.storage)
        )
        if spec.inference_optimize:  # after the adapter is baked: the program holds the final weights
            self.pipe.enable_inference_optimize(
                threads=max(1, int(spec.cpus)) if spec.device == "cpu" else None
            )
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def render(self, request: RenderRequest) -> list[np.ndarray]:
        images = self.pipe(
            prompt=list(request.prompt),
            prompt_2=list(request.prompt_2),
            prompt_3=list(request.prompt_3),
            negative_prompt=list(request.negative_prompt),
            negative_prompt_2=list(request.negative_prompt_2),
            negative_prompt_3=list(request.negative_prompt_3),
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            max_sequence_length=request.max_sequence_length,
            seed=[int(s) for s in request.seed],
            output_type="np",
        ).images
        # The same rounding as the pipeline's PIL output, so PNGs match `output_type="pil"`.
        return list((images * 255).round().astype(np.uint8))


def make_replica(spec: ReplicaSpec) -> Replica:
    """The replica for `spec`: in this process for 1 x 1, else a group of cfg x mp actors."""
    if spec.world_size == 1:
        return LocalReplica(spec)
    from actors.replica_group import GroupReplica

    return GroupReplica(spec)


def _or(*values: str | None) -> str:
    return next(v for v in values if v is not None)


def _rows_of(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _group_key(row: dict[str, Any]) -> tuple:
    return tuple(row[c] for c in GROUP_COLUMNS)


class GenerateStage:
    """`map_batches` callable: work items in, the same items plus pixels out (one row per image).

    Rows with status "error" or "skip" pass through untouched (no model time). A pipeline call that
    fails is retried image by image so one bad row cannot fail its neighbours; an image that still
    fails becomes an error row naming the exception. A crash of the process itself is Ray's to
    handle: the actor is restarted (this `__init__` runs again) and the batch is retried."""

    def __init__(self, spec: ReplicaSpec) -> None:
        started = time.perf_counter()
        self.replica = make_replica(spec)
        self.lora_scale = None if spec.lora is None else spec.lora_scale
        self.benchmark = spec.benchmark
        self.warmed_up = not spec.benchmark
        logger.info(
            "replica %s loaded %s in %.1fs", self.replica.name, spec.model, time.perf_counter() - started
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _rows_of(batch)
        out: list[dict[str, Any]] = []
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            row.update(image=None, seconds=None, replica=None, model=self.replica.model)
            row.update(lora=self.replica.lora, lora_scale=self.lora_scale, _benchmark=None)
            if row["status"] == "todo":
                groups.setdefault(_group_key(row), []).append(row)
            else:
                out.append(row)
        for members in groups.values():
            out.extend(self._render_group(members))
        # The items' pass-through columns (beyond ITEM_SCHEMA) ride along unchanged.
        passthrough = [f for f in batch.schema if f.name not in ITEM_SCHEMA.names]
        return pa.Table.from_pylist(out, schema=pa.schema([*RESULT_SCHEMA, *passthrough]))

    def _render_group(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return self._render(rows)
        except Exception as e:  # isolate the failing image(s); see the class docstring
            if len(rows) == 1:
                row = rows[0]
                row.update(status="error", error=f"generation failed: {type(e).__name__}: {e}")
                row["replica"] = self.replica.name
                return [row]
            logger.warning("a batch of %d failed (%s); rendering its images one by one", len(rows), e)
            return [r for row in rows for r in self._render_group([row])]

    def _render(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        first = rows[0]
        request = RenderRequest(
            prompt=[r["prompt"] for r in rows],
            # The pipeline's fallbacks, per image: prompt_2/_3 -> prompt, negative -> "",
            # negative_2/_3 -> negative.
            prompt_2=[_or(r["prompt_2"], r["prompt"]) for r in rows],
            prompt_3=[_or(r["prompt_3"], r["prompt"]) for r in rows],
            negative_prompt=[_or(r["negative_prompt"], "") for r in rows],
            negative_prompt_2=[_or(r["negative_prompt_2"], r["negative_prompt"], "") for r in rows],
            negative_prompt_3=[_or(r["negative_prompt_3"], r["negative_prompt"], "") for r in rows],
            seed=[r["seed"] for r in rows],
            height=first["height"],
            width=first["width"],
            num_inference_steps=first["num_inference_steps"],
            guidance_scale=first["guidance_scale"],
            max_sequence_length=first["max_sequence_length"],
        )
        if not self.warmed_up:  # the first call pays one-off costs (allocations, kernel choice)
            self.replica.render(request)
            self.warmed_up = True
        timer = getattr(getattr(self.replica, "pipe", None), "stage_timer", None)
        if timer is not None:
            timer.reset()
        started = time.perf_counter()
        images = self.replica.render(request)
        seconds = (time.perf_counter() - started) / len(rows)
        if len(images) != len(rows):
            raise RuntimeError(f"replica returned {len(images)} images for {len(rows)} requests")
        bench = self._benchmark_share(timer, len(rows)) if self.benchmark else None
        for row, image in zip(rows, images, strict=True):
            row.update(
                status="ok",
                image=np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
                seconds=seconds,
                replica=self.replica.name,
                _benchmark=bench,
            )
        return rows

    @staticmethod
    def _benchmark_share(timer: Any, n: int) -> dict[str, Any]:
        """One image's share of the call's stage figures (see BENCHMARK_TYPE)."""
        import resource

        share: dict[str, Any] = dict.fromkeys(BENCHMARK_TYPE.names[:-1])
        if timer is not None:
            share.update({name: s / n for name, s in timer.seconds.items()}, denoising_steps=timer.steps / n)
        share["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return share
