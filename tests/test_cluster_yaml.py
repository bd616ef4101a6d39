"""cluster.yaml: valid for the Ray cluster launcher of the pinned ray, and it sets up what the jobs need."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_valid_against_the_schema_shipped_in_ray(config: dict[str, Any]) -> None:
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))


def test_ray_launcher_accepts_it(config: dict[str, Any]) -> None:
    # What `ray up` does before touching the cloud: merge the provider's defaults, check docker
    # and node-type settings, validate the result against the schema again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_worker_types_have_gpus_and_can_start(config: dict[str, Any]) -> None:
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers, "no worker node types"
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name} has no GPU resources"
        assert node_type["resources"].get("CPU", 0) >= 1, f"{name} has no CPU resources"
        assert node_type.get("max_workers", 0) >= 1, f"{name} can never be started"
        assert node_type["node_config"]["InstanceType"].startswith(("g", "p")), name
        # Workers read prompts and models from and write images to S3 themselves.
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name} has no S3 access"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0  # GPUs are for workers


def test_image_matches_the_pinned_ray_and_python(config: dict[str, Any]) -> None:
    image = config["docker"]["image"]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image == f"rayproject/ray:{_pins()['ray']}-{python}-gpu"
    assert _pins()["ray"] == ray.__version__


def test_file_mounts_carry_the_project(config: dict[str, Any]) -> None:
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
        assert remote == f"~/sd3-ray/{local}", f"{remote} is not the mirror of {local}"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "constraints.txt", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= set(mounts.values())
    assert ".venv" not in mounts.values() and "." not in mounts.values()


def test_setup_installs_the_project_and_paddle_gpu(config: dict[str, Any]) -> None:
    commands = [shlex.split(c) for c in config["setup_commands"]]
    joined = [" ".join(c) for c in commands]

    def index(predicate) -> int:
        hits = [i for i, c in enumerate(commands) if predicate(c)]
        assert len(hits) == 1, joined
        return hits[0]

    install = index(lambda c: c[:2] == ["pip", "install"] and "-e" in c and "~/sd3-ray" in c)
    assert "-c" in commands[install] and "~/sd3-ray/constraints.txt" in commands[install]
    drop_cpu = index(lambda c: c[:2] == ["pip", "uninstall"] and c[-1] == "paddlepaddle")
    gpu = index(lambda c: c[:2] == ["pip", "install"] and any(a.startswith("paddlepaddle-gpu") for a in c))
    assert install < drop_cpu < gpu, "CPU Paddle must be installed, removed, then replaced by the GPU build"
    assert f"paddlepaddle-gpu=={_pins()['paddlepaddle']}" in commands[gpu]
    assert "~/sd3-ray/constraints.txt" in commands[gpu]
    # Rerunnable: both Paddle wheels are removed before anything is installed.
    assert commands[0][:2] == ["pip", "uninstall"] and {"paddlepaddle", "paddlepaddle-gpu"} <= set(
        commands[0]
    )
    head = [shlex.split(c) for c in config["head_setup_commands"]]
    assert any(c[:2] == ["pip", "install"] and "boto3" in c and "-c" in c for c in head)


def test_start_commands(config: dict[str, Any]) -> None:
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    port = re.search(r"--port=(\d+)", head).group(1)
    assert f"--address=$RAY_HEAD_IP:{port}" in worker
    assert "--dashboard-port=8265" in head  # where `ray dashboard cluster.yaml` and `sd3 submit` look


def test_every_command_is_valid_shell(config: dict[str, Any]) -> None:
    keys = [k for k in config if k.endswith("_commands")]
    for key in keys:
        for command in config[key]:
            check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert check.returncode == 0, f"{key}: {command!r}: {check.stderr}"
