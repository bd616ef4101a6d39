"""Model replicas: what renders a batch of same-shape images for one member of an actor pool.

A *replica* is one process holding a `StableDiffusion3Pipeline` (`LocalReplica`), or a group of
`cfg x mp` actors in one placement group driven from the pool actor
(`actors.parallel_pipeline.GroupReplica`). Both implement the `Replica` protocol and render a
request with the same `render_request`; `ReplicaSpec` is the one place that says which Ray
resources a replica takes, so the batch job's stage (`jobs/generate_stage.py`) does not change
when a new replica shape plugs in.

The job's driver imports this module (for `ReplicaSpec`) and never loads Paddle: what does (the
pipelines, `sd3_core.lora`) is imported inside the replica, after its `runtime.configure()`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Protocol

import numpy as np

from sd3_core import runtime
from sd3_core.devices import DEVICE_KINDS, paddle_device
from sd3_core.generation_fields import image_fields
from sd3_core.lora_registry import PinnedLoRA, fetch_lora
from sd3_core.storage import StorageOptions

DTYPES = ("float32", "float16", "bfloat16")
POOL_ACTOR_CPUS = 0.01  # a replica group's pool actor: it only coordinates its ranks


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
    vae_tiling: bool = False  # decode in overlapping tiles (pipe.vae.enable_tiling): bounded memory
    vae_tile_tolerance: float | None = None  # pipe.vae.tile_tolerance (None: the VAE's default)
    benchmark: bool = False  # warm up once, then time each call's stages (see BENCHMARK_TYPE)

    def __post_init__(self) -> None:
        if self.device not in DEVICE_KINDS:
            raise ValueError(f"device={self.device!r} must be one of {DEVICE_KINDS}")
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
        """Ray resources of one rank: one device of the chosen kind (plus its host CPUs)."""
        if self.device == "gpu":
            return {"CPU": self.cpus, "GPU": 1.0}
        if self.device == "npu":
            return {"CPU": self.cpus, "NPU": 1.0}
        return {"CPU": self.cpus}

    def rank_bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles of a replica group's ranks: bundle r is rank r's device."""
        return [self.device_bundle() for _ in range(self.world_size)]

    def pool_bundles(self) -> list[dict[str, float]]:
        """The bundles of a replica group's pool actor's placement group
        (``actors/pool_placement.py``): the ranks' bundles, then the pool actor's own (index
        ``world_size``), a token CPU share, as the pool actor only coordinates."""
        return [*self.rank_bundles(), {"CPU": POOL_ACTOR_CPUS}]

    def pool_actor_resources(self) -> dict[str, Any]:
        """Keyword arguments for `map_batches` (num_cpus, num_gpus, resources) of one pool actor.

        A single-process replica runs in the pool actor, which therefore holds the device. A
        replica group's pool actor takes the token CPU share of its placement group's last bundle
        (`pool_bundles`); its ranks hold the devices."""
        if self.world_size > 1:
            return {"num_cpus": POOL_ACTOR_CPUS}
        bundle = self.device_bundle()
        args: dict[str, Any] = {"num_cpus": bundle["CPU"]}
        if "GPU" in bundle:
            args["num_gpus"] = bundle["GPU"]
        if "NPU" in bundle:
            args["resources"] = {"NPU": bundle["NPU"]}
        return args

    def total_resources(self, replicas: int) -> dict[str, float]:
        """Ray resources `replicas` replicas take in all (to check the cluster can hold them)."""
        bundles = [self.device_bundle()] if self.world_size == 1 else self.pool_bundles()
        out: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                out[name] = out.get(name, 0.0) + amount * replicas
        return out


def _request_fields() -> list[tuple[str, Any]]:
    return [(f.name, Any) for f in image_fields()]


#: One pipeline call: images that share every ``shared`` generation field (shape, steps,
#: guidance, T5 length), one value each of those; the other fields are sequences, one value per
#: image, already resolved through their fallbacks (a row with num_images=3 appears three times,
#: with seeds s, s+1, s+2).
RenderRequest = make_dataclass(
    "RenderRequest", _request_fields(), frozen=True, namespace={"__module__": __name__}
)


class Replica(Protocol):
    """Renders requests to uint8 HxWx3 arrays, one per image, in request order."""

    name: str  # which replica made an image (host:pid of the process driving it)
    model: str  # model identity (the manifest's `model` column)
    lora: str | None  # identity of the adapter in its weights (the manifest's `lora` column)

    def render(self, request: RenderRequest) -> list[np.ndarray]: ...


class ReplicaLost(SystemExit):
    """Raised by a replica that can no longer render (its group broke): it ends the pool actor.

    Ray counts an actor task that raises SystemExit with a non-zero code as its worker process
    dying unexpectedly, unlike `ray.actor.exit_actor()` (an intended exit, neither restarted nor
    retried). The pool's `max_restarts=-1` and `max_task_retries=-1` (Ray Data's defaults) then
    start the actor again, with a new replica, and rerun its batch. A SystemExit, not an
    Exception, so the stage's image-by-image retry of a failed call does not catch it."""

    def __init__(self, reason: str) -> None:
        super().__init__(1)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def render_request(
    pipe: Any, request: RenderRequest, image_to_image: Any = None, storage: StorageOptions | None = None
) -> list[np.ndarray]:
    """`pipe(...)` (a `StableDiffusion3Pipeline` or anything taking its arguments) on one request:
    uint8 HxWx3 images, one per image of the request, in order. A request with `init_image` (a
    call's images all have one or none: `generation_fields.call_key`) is rendered by
    `image_to_image` (a `StableDiffusion3Img2ImgPipeline`) from the pictures read with `storage`."""
    arguments = {
        f.name: getattr(request, f.name) if f.shared else list(getattr(request, f.name))
        for f in image_fields()
    }
    arguments["seed"] = [int(s) for s in arguments["seed"]]
    init_images, strength = arguments.pop("init_image"), arguments.pop("strength")
    if init_images[0] is not None:
        if image_to_image is None:
            raise ValueError(
                "init_image: image to image does not run on parallel replica groups (--cfg 2 / --mp 2); "
                "render these rows with a 1 x 1 replica"
            )
        from pipelines.stable_diffusion_3_img2img import read_picture

        try:
            arguments["image"] = [read_picture(url, storage) for url in init_images]
        except ValueError as e:
            raise ValueError(f"init_image: {e}") from None
        if strength is not None:
            arguments["strength"] = strength
        pipe = image_to_image
    images = pipe(**arguments, output_type="np").images
    # The same rounding as the pipeline's PIL output, so PNGs match `output_type="pil"`.
    return list((images * 255).round().astype(np.uint8))


def configure_vae(pipe: Any, spec: ReplicaSpec) -> None:
    """Turn on the spec's tiled decoding (``vae_tiling``, ``vae_tile_tolerance``) in ``pipe``."""
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    if spec.vae_tile_tolerance is not None:
        pipe.vae.tile_tolerance = spec.vae_tile_tolerance


def apply_lora(pipe: Any, lora: PinnedLoRA, scale: float, storage: StorageOptions) -> str:
    """Load exactly the pinned adapter (its sha256 checked) into `pipe` at `scale` and bake it
    into the transformer's weights; returns its identity.

    Fused, then unloaded, as diffusers users do for inference, but a layer at a time
    (``sd3_core.lora.bake_lora``): the forward then costs what the base model's does, and the
    unfused weights are never all held at once."""
    from sd3_core.lora import bake_lora  # loads Paddle (see the module docstring)

    pipe.load_lora_weights(fetch_lora(lora, storage), adapter_name="job", scale=scale)
    bake_lora(pipe.transformer)
    return lora.identity


class LocalReplica:
    """A whole pipeline in this process (the 1 x 1 replica)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        # A CPU actor computes on its share of the node (Ray gives it OMP_NUM_THREADS=num_cpus too).
        runtime.configure(threads=spec.cpus if spec.device == "cpu" else None)
        import paddle  # this and the pipelines after configure() (see the module docstring)

        from pipelines import StableDiffusion3Pipeline
        from sd3_core.model_cache import local_model_path, model_identity

        # Ray exposes exactly the actor's device (CUDA/ASCEND_RT_VISIBLE_DEVICES): it is device 0 here.
        paddle.set_device(paddle_device(spec.device))
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
        configure_vae(self.pipe, spec)
        from pipelines import StableDiffusion3Img2ImgPipeline

        self.image_to_image = StableDiffusion3Img2ImgPipeline.from_pipe(self.pipe)  # the same models
        self.image_to_image.stage_timer = self.pipe.stage_timer
        self.storage = spec.storage
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def render(self, request: RenderRequest) -> list[np.ndarray]:
        return render_request(self.pipe, request, self.image_to_image, self.storage)
