"""Nightly LoRA fine-tunes: a spec file, the lines that schedule it, and the trigger they run.

A spec (YAML or JSON; example: ``jobs/nightly/example.yaml``)::

    name: sks-dog                     # [a-z0-9-]; part of the Ray submission id
    schedule: "0 2 * * *"             # cron, UTC: minute hour day-of-month month day-of-week
    base_model: s3://models/sd3-medium-diffusers
    data:                             # instance_data_dir + instance_prompt, or dataset (+ columns)
      instance_data_dir: s3://data/dog/
      instance_prompt: a photo of sks dog
    lora: {rank: 4, alpha: 4, layers: null, blocks: null}
    train: {resolution: 512, max_train_steps: 500, learning_rate: 5.0e-5}   # any train flag
    device: gpu                       # gpu | npu | cpu
    output: s3://bucket/nightly/sks-dog          # run of day D: OUTPUT/D/
    registry: s3://bucket/lora-registry/sks-dog  # adapter of day D: REGISTRY/D/, then REGISTRY/latest
    ray: {address: http://ray-head:8265, cluster: sd3, runtime_env: null}

``sd3 schedule SPEC`` prints a crontab line, a systemd service + timer, and a KubeRay RayCronJob.
Each runs ``sd3 nightly trigger``, which submits ``sd3 train dreambooth-lora ...`` through Ray
Jobs with the submission id ``sd3-nightly-<name>-<date>``: Ray refuses a second job with that id,
so a repeated trigger on the same day does not train twice; and the training job itself
returns at once when ``REGISTRY/<date>`` is already published (the guard that survives a
cluster whose job records were lost). A killed run resumes from its latest checkpoint when
triggered again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from jobs import submit
from sd3_core.storage import StorageOptions, join_url, read_bytes

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# Train flags a spec may not set: the nightly run owns them.
_RESERVED = {"output_dir", "publish_to", "publish_version", "pretrained_model_name_or_path", "device"}
_DOW = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


class SpecError(ValueError):
    """A nightly spec is unusable; the message names the field."""


@dataclass(frozen=True)
class NightlySpec:
    name: str
    schedule: str
    base_model: str
    data: dict[str, Any]
    output: str
    registry: str
    lora: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    device: str = "gpu"
    ray: dict[str, Any] = field(default_factory=dict)
    source: str = "<spec>"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "schedule": self.schedule, "base_model": self.base_model, "data": self.data,
            "lora": self.lora, "train": self.train, "device": self.device, "output": self.output,
            "registry": self.registry, "ray": self.ray,
        }  # fmt: skip


def parse_spec(text: str, source: str = "<spec>") -> NightlySpec:
    try:
        # JSON first: YAML 1.1 would read a JSON number like 5e-05 as a string.
        raw = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{source}: not valid YAML/JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec is a mapping of fields, got {type(raw).__name__}")
    known = {"name", "schedule", "base_model", "data", "lora", "train", "device", "output", "registry", "ray"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
    for required in ("name", "schedule", "base_model", "data", "output", "registry"):
        if not raw.get(required):
            raise SpecError(f"{source}: `{required}` is required")
    name = str(raw["name"])
    if not _NAME_RE.match(name):
        raise SpecError(
            f"{source}: name {name!r} must be 1-40 of [a-z0-9-], starting and ending alphanumeric"
        )
    data = dict(raw["data"])
    if ("instance_data_dir" in data) == ("dataset" in data):
        raise SpecError(f"{source}: data needs exactly one of instance_data_dir or dataset")
    if "instance_data_dir" in data and not data.get("instance_prompt"):
        raise SpecError(f"{source}: data.instance_prompt is required with data.instance_data_dir")
    train = dict(raw.get("train") or {})
    reserved = sorted(_RESERVED & set(train))
    if reserved:
        raise SpecError(f"{source}: train may not set {reserved} (the spec's own fields decide them)")
    device = str(raw.get("device", "gpu"))
    if device not in ("cpu", "gpu", "npu"):
        raise SpecError(f"{source}: device {device!r} must be cpu, gpu or npu")
    spec = NightlySpec(
        name=name, schedule=str(raw["schedule"]), base_model=str(raw["base_model"]), data=data,
        output=str(raw["output"]), registry=str(raw["registry"]), lora=dict(raw.get("lora") or {}),
        train=train, device=device, ray=dict(raw.get("ray") or {}), source=source,
    )  # fmt: skip
    cron_fields(spec.schedule, source)
    return spec


def load_spec(url: str, options: StorageOptions | None = None) -> NightlySpec:
    return parse_spec(read_bytes(url, options).decode("utf-8"), url)


# ---- what a run does ---------------------------------------------------------------------------


def run_date(date: str | None = None) -> str:
    """``date`` (YYYY-MM-DD, checked) or today's UTC date."""
    if date is None:
        return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise SpecError(f"--date {date!r} is not a YYYY-MM-DD date") from None
    return date


def submission_id(spec: NightlySpec, date: str) -> str:
    """Unique per spec (name + registry) and date; the same on every trigger of that day."""
    tag = hashlib.sha256(spec.registry.encode()).hexdigest()[:6]
    return f"sd3-nightly-{spec.name}-{date}-{tag}"


def _flag(name: str, value: Any) -> list[str]:
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{name}"]
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return [f"--{name}", str(value)]


def train_args(spec: NightlySpec, date: str) -> list[str]:
    """Arguments of ``sd3 train`` for the run of ``date``."""
    args = ["dreambooth-lora", "--pretrained_model_name_or_path", spec.base_model]
    for key, value in spec.data.items():
        args += _flag(key, value)
    lora_flags = {"rank": "rank", "alpha": "lora_alpha", "layers": "lora_layers", "blocks": "lora_blocks"}
    for key, value in spec.lora.items():
        if key not in lora_flags:
            raise SpecError(f"{spec.source}: lora.{key} is not one of {sorted(lora_flags)}")
        args += _flag(lora_flags[key], value)
    train = {"resume_from_checkpoint": "latest", "report_to": "wandb", **spec.train}
    for key, value in train.items():
        args += _flag(key, value)
    args += ["--output_dir", join_url(spec.output, date), "--device", spec.device]
    args += ["--publish_to", spec.registry, "--publish_version", date]
    return args


def trigger(
    spec: NightlySpec, date: str | None = None, client: Any = None, address: str | None = None
) -> dict[str, Any]:
    """Submit the run of ``date`` (default today, UTC) unless a job with its id exists already.

    Returns ``{"submission_id", "submitted": bool, "status"}``."""
    date = run_date(date)
    sid = submission_id(spec, date)
    client = client or submit.connect(address or spec.ray.get("address"))
    existing = _job_status(client, sid)
    if existing is not None:
        return {"submission_id": sid, "submitted": False, "status": existing}
    runtime_env = spec.ray.get("runtime_env") or None
    try:
        submit.submit(
            "train", train_args(spec, date), submission_id=sid, runtime_env=runtime_env, client=client,
            metadata={"sd3_nightly": spec.name, "date": date},
        )  # fmt: skip
    except ValueError:
        # Another trigger won the race for this id between our check and our submission.
        status = _job_status(client, sid)
        if status is None:
            raise
        return {"submission_id": sid, "submitted": False, "status": status}
    return {"submission_id": sid, "submitted": True, "status": "PENDING"}


def _job_status(client: Any, sid: str) -> str | None:
    try:
        return str(client.get_job_status(sid).value)
    except RuntimeError:  # the job server's "job not found"
        return None


# ---- schedules -----------------------------------------------------------------------------------


def cron_fields(schedule: str, source: str = "<spec>") -> list[str]:
    parts = schedule.split()
    if len(parts) != 5:
        raise SpecError(
            f"{source}: schedule {schedule!r} is not a 5-field cron expression (e.g. '0 2 * * *')"
        )
    pattern = re.compile(r"^(\*|\*/\d+|\d+(-\d+)?(,\d+(-\d+)?)*)$")
    for part in parts:
        if not pattern.match(part):
            raise SpecError(f"{source}: cron field {part!r} of {schedule!r}: use *, */N, N, N-M or lists")
    return parts


def _calendar_field(part: str, width: int = 2) -> str:
    if part == "*":
        return "*"
    if part.startswith("*/"):
        return f"{0:0{width}d}/{int(part[2:])}"
    return ",".join("..".join(f"{int(x):0{width}d}" for x in item.split("-")) for item in part.split(","))


def systemd_on_calendar(schedule: str) -> str:
    """A cron expression as a systemd ``OnCalendar=`` value (UTC)."""
    minute, hour, dom, month, dow = cron_fields(schedule)
    days = ""
    if dow != "*":
        if dow.startswith("*/"):
            raise SpecError(f"schedule {schedule!r}: a day-of-week step has no systemd equivalent here")
        names = []
        for item in dow.split(","):
            ends = [_DOW[int(x)] for x in item.split("-")]
            names.append("..".join(ends))
        days = ",".join(names) + " "
    return f"{days}*-{_calendar_field(month)}-{_calendar_field(dom)} {_calendar_field(hour)}:{_calendar_field(minute)}:00 UTC"


def trigger_command(spec_path: str, sd3: str = "sd3") -> list[str]:
    return [sd3, "nightly", "trigger", spec_path]


def schedule_text(spec: NightlySpec, spec_path: str, sd3: str = "sd3") -> str:
    """The crontab line, systemd units and RayCronJob manifest that run ``spec`` on its schedule."""
    unit = f"sd3-nightly-{spec.name}"
    cmd = shlex.join(trigger_command(spec_path, sd3))
    cron = f"CRON_TZ=UTC\n{spec.schedule} {cmd} >> $HOME/{unit}.log 2>&1"
    service = "\n".join([
        "[Unit]", f"Description=SD3 nightly LoRA fine-tune {spec.name} (submits a Ray job)",
        "Wants=network-online.target", "After=network-online.target", "",
        "[Service]", "Type=oneshot", f"ExecStart={cmd}",
    ])  # fmt: skip
    timer = "\n".join([
        "[Unit]", f"Description=Nightly trigger of {unit}.service", "",
        "[Timer]", f"OnCalendar={systemd_on_calendar(spec.schedule)}", "Persistent=true", f"Unit={unit}.service", "",
        "[Install]", "WantedBy=timers.target",
    ])  # fmt: skip
    # On the cluster `sd3` is the image's own; the local path of the executable means nothing there.
    manifest = yaml.safe_dump(raycronjob_manifest(spec), sort_keys=False, width=1000)
    return "\n".join([
        f"# ---- cron: add to `crontab -e` ({spec.name})",
        cron, "",
        f"# ---- systemd: ~/.config/systemd/user/{unit}.service",
        service, "",
        f"# ---- systemd: ~/.config/systemd/user/{unit}.timer  (then: systemctl --user enable --now {unit}.timer)",
        timer, "",
        "# ---- KubeRay RayCronJob (kubectl apply -f -; needs the RayCronJob feature gate)",
        manifest,
    ])  # fmt: skip


def raycronjob_manifest(spec: NightlySpec, sd3: str = "sd3") -> dict[str, Any]:
    """A RayCronJob whose RayJob runs the trigger on an existing RayCluster (the spec travels
    inline, so nothing needs to be mounted), which submits the dated training job there."""
    inline = json.dumps(spec.as_dict(), sort_keys=True, separators=(",", ":"))
    entrypoint = shlex.join(
        [sd3, "nightly", "trigger", "--spec-json", inline, "--address", "http://127.0.0.1:8265", "--follow"]
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": f"sd3-nightly-{spec.name}"},
        "spec": {
            "schedule": spec.schedule,
            "timeZone": "UTC",  # KubeRay >= 1.7; older operators use their own local time zone
            "jobTemplate": {
                "entrypoint": entrypoint,
                "clusterSelector": {"ray.io/cluster": str(spec.ray.get("cluster", "sd3"))},
                "metadata": {"sd3_nightly": spec.name},
            },
        },
    }
