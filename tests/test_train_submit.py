"""The nightly trigger on a real local Ray head (Ray Jobs): its job is `sd3 train dreambooth-lora ...`
exactly as `sd3 submit train ...` builds it, and a second firing on the same day starts no second job."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.ray_head import Head, run
from tests.reference_cases import fixture_path


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(2):
        a = np.full((32, 32, 3), 150, np.uint8)
        a[2:18, 2 + 8 * i : 18 + 8 * i] = (250, 250, 0)
        Image.fromarray(a).save(folder / f"{i}.png")
    return folder


def _jobs(head: Head) -> list[dict]:
    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    request = urllib.request.Request(
        f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def test_a_repeated_nightly_trigger_does_not_train_twice(ray_head, tmp_path):
    spec = {
        "name": "tiny-dog",
        "schedule": "0 2 * * *",
        "base_model": fixture_path("sd3-tiny"),
        "data": {
            "instance_data_dir": str(_images(tmp_path / "dog")),
            "instance_prompt": "a photo of sks dog",
        },
        "lora": {"rank": 2},
        "train": {
            "resolution": 32,
            "train_batch_size": 2,
            "max_train_steps": 2,
            "max_sequence_length": 16,
            "report_to": "none",
            "lr_warmup_steps": 0,
        },  # fmt: skip
        "device": "cpu",
        "output": str(tmp_path / "runs"),
        "registry": str(tmp_path / "registry"),
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    trigger = [
        "sd3",
        "nightly",
        "trigger",
        str(spec_file),
        "--date",
        "2026-11-26",
        "--address",
        ray_head.address,
    ]
    first = run(ray_head, *trigger, "--follow")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (tmp_path / "registry" / "latest").read_text().strip() == "2026-11-26"
    second = run(ray_head, *trigger)
    assert (
        second.returncode == 0 and "already submitted (status SUCCEEDED); not training twice" in second.stderr
    )
    nightly_jobs = [
        j for j in _jobs(ray_head) if (j.get("submission_id") or "").startswith("sd3-nightly-tiny-dog-")
    ]
    assert len(nightly_jobs) == 1 and nightly_jobs[0]["status"] == "SUCCEEDED"
