"""The batch job's checks before any work: inputs, output, model, adapter, earlier runs, cluster.

`plan_job` runs them in order on the driver and returns the `JobPlan` the graph is built from;
each raises `JobError` naming the flag and the problem, and nothing is written before they pass.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import pyarrow as pa

from actors.replica import ReplicaSpec
from jobs import manifest
from jobs.generate_stage import RESULT_SCHEMA
from jobs.job_config import JobConfig, JobError, check_config
from jobs.job_record import read_job_json
from jobs.prompt_table import (
    KNOWN_COLUMNS,
    PromptTableError,
    ReadUnit,
    check_unique_ids,
    plan_table,
    prompts_table,
)
from jobs.work_rows import JobDefaults
from sd3_core.folder_defaults import folder_guidance_scale, folder_max_sequence_length
from sd3_core.hub import is_hub_id
from sd3_core.lora_registry import LoRARefError, PinnedLoRA, fetch_lora, pin_lora
from sd3_core.model_cache import hub_model_path, model_identity
from sd3_core.storage import StorageOptions, get_fs, join_url, normalize_url, read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)


def check_output(url: str, options: StorageOptions) -> None:
    """JobError unless `url` is a folder/prefix we can write to (probe written, then removed)."""
    try:
        fs, path = get_fs(url, options)
    except ValueError as e:
        raise JobError(f"--output {url}: {e}") from None
    try:
        if fs.isfile(path):
            raise JobError(f"--output {url}: is an existing file, not a folder")
    except JobError:
        raise
    except Exception as e:  # e.g. a missing bucket or no permission (botocore's error text says which)
        raise JobError(f"--output {url}: cannot access it ({type(e).__name__}: {e})") from None
    probe = join_url(url, f".sd3-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes_atomic(probe, b"probe", options)
    except Exception as e:
        raise JobError(f"--output {url}: not writable ({type(e).__name__}: {e})") from None
    try:
        _, probe_path = get_fs(probe, options)
        fs.rm_file(probe_path)
    except Exception as e:  # harmless: a hidden name is never read as output
        logger.warning("could not remove the write probe %s: %s", probe, e)


class ModelDefaults(NamedTuple):
    """What a model folder implies for rows that do not say: image side, T5 length, guidance."""

    size: int  # transformer sample_size x VAE factor
    max_sequence_length: int  # model_index.json ``_max_sequence_length``, else 256
    guidance_scale: float  # model_index.json ``_guidance_scale``, else 7.0


def model_location(name: str) -> tuple[str, str]:
    """(`--model` as the replicas get it, where the driver reads its configs): a local path made
    absolute or a URL, twice; a Hub id, and this machine's snapshot of its JSON files (each replica
    resolves the id through its own node's Hugging Face cache)."""
    try:
        if is_hub_id(name):
            return name, hub_model_path(name, configs_only=True)
        model = normalize_url(name)
    except (ValueError, OSError) as e:
        raise JobError(f"--model {name}: {e}") from None
    return model, model


def model_defaults(model: str, options: StorageOptions) -> ModelDefaults:
    """The model's call defaults (`ModelDefaults`), read from its configs.

    Also the up-front check that `model` is a readable diffusers folder/prefix."""
    try:
        index = json.loads(read_bytes(join_url(model, "model_index.json"), options))
        transformer = json.loads(read_bytes(join_url(model, "transformer", "config.json"), options))
        vae = json.loads(read_bytes(join_url(model, "vae", "config.json"), options))
    except FileNotFoundError as e:
        raise JobError(f"--model {model}: not a diffusers SD3 folder ({e})") from None
    except json.JSONDecodeError as e:
        raise JobError(f"--model {model}: a config file is not valid JSON ({e})") from None
    except ValueError as e:
        raise JobError(f"--model {model}: {e}") from None
    except Exception as e:
        raise JobError(f"--model {model}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or "transformer" not in index:
        raise JobError(f"--model {model}: model_index.json lists no transformer")
    factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    where = join_url(model, "model_index.json")
    try:
        t5_length = folder_max_sequence_length(index, where)
        guidance = folder_guidance_scale(index, where)
    except ValueError as e:
        raise JobError(f"--model {model}: {e}") from None
    return ModelDefaults(int(transformer.get("sample_size", 128)) * factor, t5_length, guidance)


def pin_job_lora(ref: str, model: str, options: StorageOptions) -> PinnedLoRA:
    """The adapter `ref` names now, pinned (version, sha256) and checked against `model`'s
    transformer, so a missing, unreadable or mismatched adapter fails before any row runs."""
    if is_hub_id(ref) and ":" not in ref:
        raise JobError(
            f"--lora {ref}: no such file or folder, and a Hugging Face Hub id is not taken here (each "
            f"node would resolve it on its own): download it (`hf download {ref}`) and pass the file, "
            "or an s3:// copy every replica reads"
        )
    try:
        pinned = pin_lora(ref, options)
        _check_lora_fits(fetch_lora(pinned, options), model, options, pinned.pinned_ref)
    except LoRARefError as e:
        raise JobError(f"--lora {ref}: {e.reason}") from None
    except ValueError as e:  # LoRAError, WeightsFileError and bad files are ValueErrors
        raise JobError(f"--lora {ref}: {e}") from None
    except Exception as e:  # storage errors: botocore's text says which (no access, no bucket, ...)
        raise JobError(f"--lora {ref}: cannot read it ({type(e).__name__}: {e})") from None
    return pinned


def _check_lora_fits(path: str, model: str, options: StorageOptions, source: str) -> None:
    """LoRAError unless the LoRA file at `path` fits `model`'s transformer (built from its config
    without weights: shapes only)."""
    import paddle  # only a job with --lora needs Paddle in its driver

    from sd3_core.lora_file import check_lora_fits, read_lora_file
    from sd3_core.transformer import SD3Transformer2DModel

    config = json.loads(read_bytes(join_url(model, "transformer", "config.json"), options))
    with paddle.LazyGuard():
        transformer = SD3Transformer2DModel.from_config(config)
    check_lora_fits(transformer, replace(read_lora_file(path), source=source))


def lora_record(lora: PinnedLoRA | None, scale: float) -> dict[str, Any] | None:
    """What job.json says about the adapter the images were rendered with."""
    if lora is None:
        return None
    return {
        **asdict(lora),
        "pinned": lora.pinned_ref,
        "identity": lora.identity,
        "scale": scale,
        "fused": True,
    }


def check_same_lora(output: str, rendered: Counter, lora: PinnedLoRA | None, scale: float) -> None:
    """JobError when `output` holds images rendered with another adapter or scale than this run's.

    `rendered`: (lora identity, scale) of the ok images there -> count. Adapters are the same when
    their bytes are (sha256), wherever the file is now."""
    now = (lora.identity, scale) if lora is not None else (None, None)
    for (identity, used_scale), n in rendered.items():
        if (_sha256_of(identity), used_scale) == (_sha256_of(now[0]), now[1]):
            continue
        before = _describe_lora(identity, used_scale)
        raise JobError(
            f"--lora: {output} already holds {n} image(s) rendered with {before}, but this run has "
            f"{_describe_lora(*now)}; resume with the same --lora and --lora-scale, or write to a new "
            "--output"
        )


def _sha256_of(identity: str | None) -> str | None:
    return identity.rpartition("#sha256:")[2] if identity else None


def _describe_lora(identity: str | None, scale: float | None) -> str:
    if identity is None:
        return "no --lora"
    ref, _, sha256 = identity.rpartition("#sha256:")
    return f"--lora {ref} --lora-scale {scale:g} (sha256 {sha256[:16]}...)"


def check_passthrough(passthrough: pa.Schema, where: str) -> None:
    """JobError for a pass-through column named like a column the job writes itself."""
    reserved = manifest.reserved_names() | set(RESULT_SCHEMA.names).difference(KNOWN_COLUMNS)
    clash = [name for name in passthrough.names if name in reserved]
    if clash:
        names = ", ".join(f"`{n}`" for n in clash)
        raise JobError(
            f"--prompts {where}: column(s) {names} would pass through to the manifest, which writes "
            f"its own column of that name; rename them in the table (e.g. `input_{clash[0]}`)"
        )


class Outcomes(NamedTuple):
    """What the parts of earlier runs hold."""

    done: frozenset  # (key, k) with an ok row
    errors: frozenset  # (key, k, error) of error rows
    adapters: Counter  # (lora identity, lora scale) -> ok images
    models: Counter  # model identity -> ok images


def known_outcomes(output: str, options: StorageOptions) -> Outcomes:
    """The `Outcomes` recorded in `output`'s manifest parts."""
    columns = ["key", "k", "status", "error", "model", "lora", "lora_scale"]
    table, bad = manifest.read_parts(output, options, columns=columns)
    if bad:
        logger.warning("%d unreadable manifest part(s) ignored; their rows are redone", len(bad))
    done, errors, adapters, models = set(), set(), Counter(), Counter()
    for key, k, status, error, model, lora, scale in zip(
        *(table.column(c).to_pylist() for c in columns), strict=True
    ):
        if status == manifest.STATUS_OK:
            done.add((key, k))
            adapters[(lora, scale)] += 1
            models[model] += 1
        else:
            errors.add((key, k, error))
    return Outcomes(frozenset(done), frozenset(errors), adapters, models)


def check_same_model(output: str, models: Counter, model: str, configs: str, options: StorageOptions) -> None:
    """JobError when `output` holds images another model (URL or configs, Hub id and commit)
    rendered: a resume must not mix two models' images in one manifest."""
    if not models:  # a new output: nothing to compare, so no listing of the model
        return
    fs, path = get_fs(configs, options)
    now = model_identity(path, model, fs)
    for identity, n in models.items():
        if identity != now:
            raise JobError(
                f"--model: {output} already holds {n} image(s) rendered by {identity}, but this run's "
                f"model is {now} (URL and config hash); resume with the same --model, or write to a "
                "new --output"
            )


def check_cluster(spec: ReplicaSpec, replicas: int) -> None:
    """JobError when the replicas would leave no CPU for the other stages (Ray Data would wait
    forever); a warning when the cluster has fewer devices than the replicas need right now (an
    autoscaling cluster may add them)."""
    import ray

    have = ray.cluster_resources()
    need = spec.total_resources(replicas)
    spare = have.get("CPU", 0.0) - need.get("CPU", 0.0)
    if spare < 1:
        raise JobError(
            f"{replicas} replica(s) x {spec.cpus:g} CPU(s) leave {max(spare, 0):g} of the cluster's "
            f"{have.get('CPU', 0):g} CPUs for reading and encoding (at least 1 is needed); lower "
            "--replicas or --cpus-per-replica"
        )
    for name in ("GPU", "NPU"):
        if need.get(name, 0) > have.get(name, 0):
            logger.warning(
                "the replicas need %g %s but the cluster has %g now; they start when it has them",
                need[name], name, have.get(name, 0),
            )  # fmt: skip


@dataclass(frozen=True)
class JobPlan:
    """What the checks found: the graph's source, the resolved defaults, the replicas' spec, and
    what earlier runs into the same output already did."""

    output: str
    units: list[ReadUnit]  # the table's row groups (empty with `inline`)
    passthrough: pa.Schema  # the table's columns the job does not read, carried to the manifest
    inline: pa.Table | None  # the --prompt texts as a table (None with a table URL)
    total_rows: int
    model: str
    defaults: JobDefaults  # the model's size, T5 length and guidance filled in
    lora: PinnedLoRA | None
    spec: ReplicaSpec
    previous: dict | None  # job.json of an earlier finished run
    known: Outcomes


def plan_job(config: JobConfig) -> JobPlan:
    """Every check that needs no cluster, in order; JobError for the first problem."""
    check_config(config)
    storage = config.storage
    try:
        output = normalize_url(config.output)
    except ValueError as e:
        raise JobError(f"--output {config.output}: {e}") from None
    units: list[ReadUnit] = []
    passthrough = pa.schema([])
    inline: pa.Table | None = None
    if config.prompts is not None:
        try:
            prompts_url = normalize_url(config.prompts)
            plan = plan_table(prompts_url, storage)
            units, passthrough = plan.units, plan.passthrough
            check_unique_ids(prompts_url, storage)
        except PromptTableError as e:
            raise JobError(f"--prompts {e}") from None
        except ValueError as e:
            raise JobError(f"--prompts {config.prompts}: {e}") from None
        check_passthrough(passthrough, config.prompts)
        total_rows = sum(u.num_rows for u in units)
        if total_rows == 0:
            raise JobError(f"--prompts {config.prompts}: the table has no rows")
    else:
        inline = prompts_table(list(config.prompt_list), config.defaults.negative_prompt)
        total_rows = inline.num_rows
    model, configs = model_location(config.model)
    implied = model_defaults(configs, storage)
    given = config.defaults
    defaults = replace(
        given,
        height=given.height or implied.size,
        width=given.width or implied.size,
        max_sequence_length=given.max_sequence_length or implied.max_sequence_length,
        guidance_scale=implied.guidance_scale if given.guidance_scale is None else given.guidance_scale,
        model=model,
    )
    # Pinned once, here: every replica then loads these bytes even if a registry's `latest` moves.
    lora = pin_job_lora(config.lora, configs, storage) if config.lora is not None else None
    spec = ReplicaSpec(
        model=model, dtype=config.dtype, device=config.device, cpus=config.cpus_per_replica, storage=storage,
        cfg=2 if config.cfg_parallel else 1, mp=config.mp, lora=lora, lora_scale=config.lora_scale,
        inference_optimize=config.inference_optimize, vae_tiling=config.vae_tiling,
        vae_tile_tolerance=config.vae_tile_tolerance, benchmark=config.benchmark,
    )  # fmt: skip
    if spec.world_size > 1:  # heads % mp, before any actor starts
        from actors.replica_group import check_replica_shape  # loads Paddle: only for groups

        try:
            check_replica_shape(spec)
        except ValueError as e:
            raise JobError(f"--mp {config.mp}: {e}") from None
    previous = read_job_json(output, storage)
    if previous is None:  # a finished job's rerun must write nothing, not even a probe
        check_output(output, storage)
    known = known_outcomes(output, storage)
    check_same_model(output, known.models, model, configs, storage)
    check_same_lora(output, known.adapters, lora, config.lora_scale)
    return JobPlan(
        output, units, passthrough, inline, total_rows, model, defaults, lora, spec, previous, known
    )
