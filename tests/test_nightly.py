"""Nightly LoRA fine-tunes: spec files, `sd3 schedule` output, the once-per-day trigger, and the
adapter registry (publish with `latest` last, `resolve_lora` for the batch job)."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from jobs import nightly
from jobs.cli import build_parser, main
from jobs.train import train
from jobs.train_cli import config_from_args
from sd3_core.lora_file import read_lora_file
from sd3_core.lora_registry import fetch_lora, is_published, pin_lora, publish, resolve_lora, split_ref
from sd3_core.storage import StorageOptions, get_fs, list_files, read_bytes
from tests.lora_recipe import PEFT_SOURCE, peft_folder
from tests.reference_cases import fixture_path
from tests.s3_server import make_bucket

EXAMPLE = Path(__file__).resolve().parent.parent / "jobs" / "specs" / "nightly-example.yaml"


def spec_text(**over) -> str:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec.update(over)
    return yaml.safe_dump(spec)


def test_example_spec_parses_and_becomes_a_train_command():
    spec = nightly.load_spec(str(EXAMPLE))
    args = nightly.train_args(spec, "2026-11-26")
    parsed = build_parser().parse_args(["train", *args])
    cfg = config_from_args(parsed)
    assert (cfg.mode, cfg.rank, cfg.lora_alpha, cfg.device) == ("lora", 4, 4.0, "gpu")
    assert cfg.output_dir == "s3://training/nightly/sks-dog/2026-11-26"
    assert (cfg.publish_to, cfg.publish_version) == ("s3://loras/sks-dog", "2026-11-26")
    assert cfg.resume_from_checkpoint == "latest"  # a re-run of a killed night continues it
    assert nightly.submission_id(spec, "2026-11-26").startswith("sd3-nightly-sks-dog-2026-11-26-")
    assert nightly.submission_id(spec, "2026-11-26") != nightly.submission_id(spec, "2026-11-27")


def test_bad_specs_name_the_field(tmp_path):
    with pytest.raises(nightly.SpecError, match="name 'Dog Run' must be"):
        nightly.parse_spec(spec_text(name="Dog Run"))
    with pytest.raises(nightly.SpecError, match="not a 5-field cron"):
        nightly.parse_spec(spec_text(schedule="nightly"))
    with pytest.raises(nightly.SpecError, match=r"train may not set \['output_dir'\]"):
        nightly.parse_spec(spec_text(train={"output_dir": "x"}))


def test_schedule_prints_cron_systemd_and_a_raycronjob(capsys):
    assert main(["schedule", str(EXAMPLE), "--sd3", "/opt/sd3/bin/sd3"]) == 0
    out = capsys.readouterr().out
    trigger = f"/opt/sd3/bin/sd3 nightly trigger {EXAMPLE}"
    assert f"CRON_TZ=UTC\n0 2 * * * {trigger} >> $HOME/sd3-nightly-sks-dog.log 2>&1" in out
    assert (
        f"ExecStart={trigger}" in out and "OnCalendar=*-*-* 02:00:00 UTC" in out and "Persistent=true" in out
    )
    manifest = yaml.safe_load(out[out.index("apiVersion: ray.io/v1") :])
    assert manifest["kind"] == "RayCronJob" and manifest["spec"]["schedule"] == "0 2 * * *"
    assert manifest["spec"]["jobTemplate"]["clusterSelector"] == {"ray.io/cluster": "sd3"}
    argv = shlex.split(manifest["spec"]["jobTemplate"]["entrypoint"])
    assert argv[:4] == ["sd3", "nightly", "trigger", "--spec-json"]
    assert nightly.parse_spec(argv[4]).as_dict() == nightly.load_spec(str(EXAMPLE)).as_dict()
    assert nightly.systemd_on_calendar("30 1 * * 1-5") == "Mon..Fri *-*-* 01:30:00 UTC"
    assert nightly.systemd_on_calendar("*/15 * 1 * *") == "*-*-01 *:00/15:00 UTC"


class FakeJobServer:
    """What the Ray job server does with submission ids: a second submission of an id is refused."""

    def __init__(self):
        self.jobs: dict[str, str] = {}

    def submit_job(self, entrypoint, submission_id=None, runtime_env=None, metadata=None):
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.jobs[submission_id] = entrypoint
        return submission_id

    def get_job_status(self, sid):
        from ray.job_submission import JobStatus

        if sid not in self.jobs:
            raise RuntimeError(f"Job {sid} does not exist.")
        return JobStatus.RUNNING

    def get_address(self):
        return "http://127.0.0.1:8265"


def test_a_repeated_trigger_submits_one_job_per_day():
    spec = nightly.load_spec(str(EXAMPLE))
    server = FakeJobServer()
    first = nightly.trigger(spec, "2026-11-26", client=server)
    again = nightly.trigger(spec, "2026-11-26", client=server)
    next_day = nightly.trigger(spec, "2026-11-27", client=server)
    assert first["submitted"] and not again["submitted"] and again["status"] == "RUNNING"
    assert next_day["submitted"] and len(server.jobs) == 2
    entrypoint = server.jobs[first["submission_id"]]
    assert (
        entrypoint.startswith("sd3 train dreambooth-lora ") and "--publish_version 2026-11-26" in entrypoint
    )


def _images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(2):
        a = np.full((32, 32, 3), 180, np.uint8)
        a[4:20, 4 + 6 * i : 20 + 6 * i] = (10, 10, 200)
        Image.fromarray(a).save(folder / f"{i}.png")


def test_nightly_run_publishes_once_and_the_batch_job_resolves_it(tmp_path, s3_endpoint):
    options = StorageOptions.from_env()
    bucket = make_bucket(s3_endpoint)
    _images(tmp_path / "dog")
    spec = nightly.parse_spec(spec_text(
        base_model=fixture_path("sd3-tiny"), device="cpu",
        data={"instance_data_dir": str(tmp_path / "dog"), "instance_prompt": "a photo of sks dog"},
        train={"resolution": 32, "train_batch_size": 2, "max_train_steps": 2, "max_sequence_length": 16,
               "report_to": "none", "lr_warmup_steps": 0, "seed": 0},
        output=f"s3://{bucket}/runs", registry=f"s3://{bucket}/registry",
    ))  # fmt: skip
    args = build_parser().parse_args(["train", *nightly.train_args(spec, "2026-11-26")])
    first = train(config_from_args(args))
    assert first.global_step == 2 and first.published == f"s3://{bucket}/registry/2026-11-26"
    assert read_bytes(f"s3://{bucket}/registry/latest", options).decode().strip() == "2026-11-26"
    # The same night again (a second trigger whose job id was lost): nothing is trained or written.
    fs, _ = get_fs(f"s3://{bucket}", options)
    before = sorted(fs.find(bucket))
    again = train(config_from_args(args))
    assert again.skipped == "already published" and again.history == [] and sorted(fs.find(bucket)) == before
    # The batch job's --lora REGISTRY[:VERSION] -> a local file with the published bytes.
    published = read_bytes(f"s3://{bucket}/registry/2026-11-26/pytorch_lora_weights.safetensors", options)
    cache = tmp_path / "cache"
    for ref in (f"s3://{bucket}/registry", f"s3://{bucket}/registry:2026-11-26"):
        local = resolve_lora(ref, options, cache_dir=str(cache))
        assert Path(local).read_bytes() == published
    with pytest.raises(FileNotFoundError, match="version '2026-01-01' is not published"):
        resolve_lora(f"s3://{bucket}/registry:2026-01-01", options)
    # The pipeline reads a registry reference directly.
    from pipelines import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    assert pipe.load_lora_weights(f"s3://{bucket}/registry:2026-11-26", adapter_name="nightly") == "nightly"
    meta = json.loads(read_bytes(f"s3://{bucket}/registry/2026-11-26/adapter.json", options))
    assert meta["base_model"] == fixture_path("sd3-tiny") and meta["global_step"] == 2
    assert list_files(f"s3://{bucket}/runs/2026-11-26", options, suffix=".safetensors")


def test_registry_refs_and_local_publish(tmp_path):
    assert split_ref("s3://b/reg") == ("s3://b/reg", None)
    assert split_ref("s3://b/reg:2026-11-26") == ("s3://b/reg", "2026-11-26")
    assert split_ref("/data/reg:v2") == ("/data/reg", "v2")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 10)
    publish(str(weights), str(tmp_path / "reg"), "v1")
    publish(str(weights), str(tmp_path / "reg"), "v2")
    assert is_published(str(tmp_path / "reg"), "v1")
    assert resolve_lora(str(tmp_path / "reg")) == str(
        tmp_path / "reg" / "v2" / "pytorch_lora_weights.safetensors"
    )
    assert resolve_lora(f"{tmp_path / 'reg'}:v1").endswith("v1/pytorch_lora_weights.safetensors")


def test_a_pinned_adapter_stays_the_version_latest_named_when_pinned(tmp_path):
    registry, files = str(tmp_path / "reg"), {}
    for version in ("v1", "v2", "v3"):
        files[version] = tmp_path / f"{version}.safetensors"
        files[version].write_bytes(version.encode() * 100)
    publish(str(files["v1"]), registry, "v1")
    publish(str(files["v2"]), registry, "v2")
    pinned = pin_lora(registry)
    assert (pinned.registry, pinned.version, pinned.pinned_ref) == (registry, "v2", f"{registry}:v2")
    assert pinned.sha256 == hashlib.sha256(files["v2"].read_bytes()).hexdigest()
    assert pinned.identity == f"{registry}:v2#sha256:{pinned.sha256}"
    publish(str(files["v3"]), registry, "v3")  # `latest` moves while a job runs
    assert Path(fetch_lora(pinned)).read_bytes() == files["v2"].read_bytes()
    assert pin_lora(f"{registry}:v1").url == str(tmp_path / "reg" / "v1" / "pytorch_lora_weights.safetensors")
    # A plain file pinned, then replaced: replicas refuse it rather than render with other weights.
    plain = pin_lora(str(files["v1"]))
    assert (plain.registry, plain.pinned_ref) == (None, str(files["v1"]))
    files["v1"].write_bytes(b"retrained")
    with pytest.raises(ValueError, match="was replaced"):
        fetch_lora(plain)
    # A version whose weights do not match its adapter.json is a damaged publish.
    (tmp_path / "reg" / "v3" / "pytorch_lora_weights.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="adapter.json says"):
        pin_lora(registry)
    with pytest.raises(ValueError, match="adapter.json says"):  # also where the pipeline loads it
        resolve_lora(registry)
    with pytest.raises(FileNotFoundError, match="neither a registry"):
        pin_lora(str(tmp_path / "nothing-here"))


def test_a_pinned_remote_adapter_is_fetched_once_per_node_and_checked(tmp_path, s3_endpoint):
    options = StorageOptions.from_env()
    bucket = make_bucket(s3_endpoint)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"remote adapter" * 10)
    publish(str(weights), f"s3://{bucket}/reg", "2026-11-26", options)
    cache = str(tmp_path / "cache")
    pinned = pin_lora(f"s3://{bucket}/reg", options, cache_dir=cache)
    assert pinned.url == f"s3://{bucket}/reg/2026-11-26/pytorch_lora_weights.safetensors"
    local = fetch_lora(pinned, options, cache_dir=cache)
    assert local.startswith(cache) and Path(local).read_bytes() == weights.read_bytes()
    other_node = str(tmp_path / "other-node-cache")
    assert Path(fetch_lora(pinned, options, cache_dir=other_node)).read_bytes() == weights.read_bytes()
    # The object is overwritten in place after pinning: a node that has not fetched it yet refuses.
    fs, _ = get_fs(pinned.url, options)
    fs.pipe_file(pinned.url.removeprefix("s3://"), b"overwritten")
    assert fetch_lora(pinned, options, cache_dir=cache) == local  # this node's verified copy
    with pytest.raises(ValueError, match="was replaced"):
        fetch_lora(pinned, options, cache_dir=str(tmp_path / "third-node-cache"))


def _alphas(path) -> set[float]:
    return {m.alpha for m in read_lora_file(path).modules.values()}


def test_a_peft_adapter_folder_is_pinned_with_its_config(tmp_path, s3_endpoint):
    local = peft_folder(tmp_path / "peft", alpha=8)
    pinned = pin_lora(str(local))
    weights_sha = hashlib.sha256(PEFT_SOURCE.read_bytes()).hexdigest()
    config_sha = hashlib.sha256((local / "adapter_config.json").read_bytes()).hexdigest()
    assert (pinned.pinned_ref, pinned.url) == (str(local), str(local / "adapter_model.safetensors"))
    assert pinned.identity == f"{local}#sha256:{weights_sha}+adapter_config.json:{config_sha}"
    assert fetch_lora(pinned) == str(local)
    assert _alphas(fetch_lora(pinned)) == {8.0} and _alphas(PEFT_SOURCE) == {2.0}  # alpha = rank alone
    assert pin_lora(str(local / "adapter_model.safetensors")).peft_config is None  # the file alone
    (local / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(
        ValueError, match="adapter_config.json is not the adapter_config.json the job resolved"
    ):
        fetch_lora(pinned)  # the config (so the adapter's scale) changed after pinning
    # The same folder on S3: every node gets a cached folder with the weights and the pinned config.
    options, bucket = StorageOptions.from_env(), make_bucket(s3_endpoint)
    remote_src = peft_folder(tmp_path / "upload", alpha=8)
    fs, _ = get_fs(f"s3://{bucket}", options)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        fs.put_file(str(remote_src / name), f"{bucket}/peft/{name}")
    cache = str(tmp_path / "cache")
    remote = pin_lora(f"s3://{bucket}/peft", options, cache_dir=cache)
    assert remote.identity == f"s3://{bucket}/peft#sha256:{weights_sha}+adapter_config.json:{config_sha}"
    got = fetch_lora(remote, options, cache_dir=cache)
    assert got.startswith(cache) and _alphas(got) == {8.0}
    assert fetch_lora(remote, options, cache_dir=cache) == got  # made once per node
    assert resolve_lora(f"s3://{bucket}/peft", options, cache_dir=cache) == got  # the pipeline's path
