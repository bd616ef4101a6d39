"""jobs.job_record: job.json (configuration, counts, times, versions)."""

from __future__ import annotations

import json

from jobs.job_record import write_job_json
from sd3_core.storage import read_bytes


def test_job_json(tmp_path):
    url = write_job_json(
        str(tmp_path), {"prompts": "in.parquet", "replicas": 2}, {"images_ok": 3}, started=0.0, finished=10.5
    )
    doc = json.loads(read_bytes(url))
    assert doc["config"] == {"prompts": "in.parquet", "replicas": 2}
    assert doc["counts"] == {"images_ok": 3}
    assert doc["started"] == "1970-01-01T00:00:00+00:00" and doc["finished"].startswith(
        "1970-01-01T00:00:10.5"
    )
    assert set(doc["versions"]) >= {"sd3-ray", "paddle", "ray", "python"}
    assert doc["versions"]["sd3-ray"] and doc["versions"]["ray"] and doc["versions"]["python"]
