"""The batch job end to end on a real local Ray and a real S3 endpoint on loopback (moto's server).

One Ray instance (started here with ray.init, dashboard on for the state API) serves the whole
module; the driver-kill test runs `sd3 generate` as a subprocess against it. Tiny model, 64-96 px,
1-2 steps; the LoRA tests use the embedded default model with adapters from an S3 registry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import manifest
from jobs.batch_generate import run_job
from jobs.cli import main
from jobs.job_config import DEFAULT_MODEL, JobConfig, JobError, JobFailed
from jobs.work_rows import JobDefaults
from sd3_core.lora_registry import publish
from sd3_core.storage import StorageOptions, get_fs, read_bytes, write_bytes_atomic
from tests.reference_cases import fixture_path
from tests.s3_server import PausableProxy, make_bucket, s3_client, storage_options

ray = pytest.importorskip("ray")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = fixture_path("sd3-tiny")
SMALL = JobDefaults(height=64, width=64, num_inference_steps=1, guidance_scale=5.0, job_seed=3)


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray for this module (4 logical CPUs on the shared 2-core machine)."""
    ray.init(
        address="local", num_cpus=4, include_dashboard=True, logging_level="WARNING", configure_logging=False
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _job(output: str, prompts: str, storage: StorageOptions | None = None, **kw) -> JobConfig:
    kw.setdefault("defaults", SMALL)
    return JobConfig(
        output=output,
        prompts=prompts,
        model=MODEL,
        storage=storage or StorageOptions(),
        progress=False,
        **kw,
    )


# --------------------------------------------------------------------------- tables

BAD_ROWS = {  # id -> (column overrides, words the error must contain)
    "bad-empty": ({"prompt": "  "}, "prompt: empty"),
    "bad-null": ({"prompt": None}, "prompt: null"),
    "bad-height": ({"height": 70}, "height: 70"),
    "bad-steps": ({"num_inference_steps": 0}, "num_inference_steps: 0"),
    "bad-count": ({"num_images": 0}, "num_images: 0"),
    "bad-guidance": ({"guidance_scale": math.nan}, "guidance_scale"),
    "bad-seed": ({"seed": -5}, "seed: -5"),
}


def fifty_rows() -> list[dict]:
    """43 good rows (three sizes, 1-2 steps, 1-2 images, negatives, unsafe ids) + 7 bad rows."""
    sizes = [(64, 64), (64, 96), (96, 64)]
    rows = []
    for i in range(43):
        h, w = sizes[i % 3]
        rows.append(
            {
                "id": {5: "a/b", 6: "../up", 7: "x" * 200}.get(i, f"row-{i:02d}"),
                "prompt": f"a picture of thing number {i}",
                "negative_prompt": "blurry" if i % 4 == 0 else None,
                "height": h,
                "width": w,
                "num_inference_steps": 1 + i % 2,
                "guidance_scale": 5.0,
                "num_images": 1 + (i % 5 == 0),
                "seed": 1000 + i if i % 7 == 0 else None,
                "tag": f"t{i % 3}",
                "n": i,
                "score": i / 4,
                "flag": i % 2 == 0,
                "ids": list(range(i % 3)),
                "when": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=i),
            }
        )
    for rid, (overrides, _) in BAD_ROWS.items():
        base = {**rows[0], "id": rid, "seed": None, "num_images": 1}
        rows.append({**base, **overrides})
    return rows


# The columns the job does not use: they reach the manifest with these names and types.
PASSTHROUGH = pa.schema(
    [
        ("tag", pa.string()),
        ("n", pa.int64()),
        ("score", pa.float64()),
        ("flag", pa.bool_()),
        ("ids", pa.list_(pa.int64())),
        ("when", pa.timestamp("us", tz="UTC")),
    ]
)


def rows_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("negative_prompt", pa.string()),
            ("height", pa.int64()),
            ("width", pa.int64()),
            ("num_inference_steps", pa.int64()),
            ("guidance_scale", pa.float64()),
            ("num_images", pa.int64()),
            ("seed", pa.int64()),
            *PASSTHROUGH,
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def expected_images(rows: list[dict]) -> set[tuple[str, int]]:
    return {(r["id"], k) for r in rows if r["id"] not in BAD_ROWS for k in range(r["num_images"])}


def simple_table(path, n: int, steps: int = 2) -> set[tuple[str, int]]:
    pq.write_table(
        pa.table(
            {
                "id": [f"p{i:03d}" for i in range(n)],
                "prompt": [f"prompt number {i}" for i in range(n)],
                "num_inference_steps": [steps] * n,
                "n": list(range(n)),  # passed through to the manifest
            }
        ),
        path,
        row_group_size=10,
    )
    return {(f"p{i:03d}", 0) for i in range(n)}


# --------------------------------------------------------------------------- checks


def check_complete(output: str, expected: set, storage: StorageOptions | None = None) -> pa.Table:
    """The manifest has exactly one ok row per expected image, and the objects match it."""
    merged = manifest.read_manifest(output, storage)
    ok = [r for r in merged.to_pylist() if r["status"] == "ok"]
    pairs = [(r["id"], r["k"]) for r in ok]
    assert len(pairs) == len(set(pairs)), "an image appears twice in the manifest"
    assert set(pairs) == expected
    fs, images_path = get_fs(manifest.image_url(output, "x", 0).rsplit("/", 1)[0], storage)
    stored = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(images_path, detail=False))
    assert stored == sorted(r["image"].rsplit("/", 1)[-1] for r in ok), "objects != manifest"
    for r in ok[:5]:
        with fs.open(get_fs(r["image"], storage)[1], "rb") as f:
            assert Image.open(f).size == (r["width"], r["height"])
    return merged


def listing(output: str, storage: StorageOptions | None = None) -> dict:
    """Every object/file under `output` with its size and modification time/ETag."""
    fs, path = get_fs(output, storage)
    return {
        p: (info.get("size"), info.get("ETag") or info.get("mtime"), str(info.get("LastModified")))
        for p, info in fs.find(path, detail=True).items()
    }


# --------------------------------------------------------------------------- the 50-row job on S3


@pytest.fixture(scope="module")
def fifty_row_job(ray_address, s3_endpoint):
    """The 50-row table read from and written to S3; returns what the checks need."""
    rows = fifty_rows()
    bucket = make_bucket(s3_endpoint)
    storage = storage_options(s3_endpoint)
    buf = io.BytesIO()
    pq.write_table(rows_table(rows), buf, row_group_size=12)
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="in/prompts.parquet", Body=buf.getvalue())
    output = f"s3://{bucket}/out"
    config = _job(output, f"s3://{bucket}/in/prompts.parquet", storage, replicas=2, batch_size=4)
    result = run_job(config)
    return rows, output, storage, result, config


def test_fifty_rows_mixed_sizes_and_bad_rows(fifty_row_job):
    rows, output, storage, result, _ = fifty_row_job
    merged = check_complete(output, expected_images(rows), storage)
    assert result.rows_failed == len(BAD_ROWS)
    errors = {r["id"]: r["error"] for r in merged.to_pylist() if r["status"] == "error"}
    assert set(errors) == set(BAD_ROWS)
    for rid, (_, words) in BAD_ROWS.items():
        assert words in errors[rid] and rid in errors[rid], errors[rid]
    by_id = {(r["id"], r["k"]): r for r in merged.to_pylist()}
    r0 = by_id[("row-00", 1)]  # num_images 2, seed given: seeds 1000, 1001
    assert (r0["seed"], r0["negative_prompt"]) == (1001, "blurry")
    assert merged.schema.equals(manifest.manifest_schema(PASSTHROUGH))
    given = {r["id"]: r for r in rows}
    for (rid, _), r in by_id.items():  # ok and error rows alike carry the input's values
        assert {c: r[c] for c in PASSTHROUGH.names} == {c: given[rid][c] for c in PASSTHROUGH.names}
    assert by_id[("row-01", 0)]["height"] == 64 and by_id[("row-01", 0)]["width"] == 96
    assert all("/" not in r["image"].split("/images/")[1] for r in merged.to_pylist() if r["image"])
    assert by_id[("row-01", 0)]["model"].startswith(MODEL + "#sha256:")
    assert len({r["replica"] for r in merged.to_pylist() if r["status"] == "ok"}) == 2
    job = json.loads(read_bytes(output + "/job.json", storage))
    assert job["counts"]["rows_failed"] == len(BAD_ROWS) and job["versions"]["ray"] == ray.__version__
    assert Image.open(io.BytesIO(read_bytes(output + "/contact_sheet.png", storage))).size[0] > 64


def test_rerun_of_a_finished_job_writes_nothing(fifty_row_job):
    rows, output, storage, _, config = fifty_row_job
    before = listing(output, storage)
    again = run_job(config)
    assert (again.finalized, again.processed_images, again.skipped_rows) == (False, 0, len(rows))
    assert listing(output, storage) == before


# --------------------------------------------------------------------------- failures


def _generate_stage_actors(address: str, job_id: str, class_name: str = "GenerateStage") -> list:
    from ray.util.state import list_actors

    # The address is explicit: other Ray instances may run on this machine.
    return [
        a
        for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
        if class_name in a.class_name and a.job_id == job_id
    ]


def _run_in_thread(config: JobConfig) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = run_job(config)
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for_parts(output: str, n: int, storage=None, timeout: float = 120, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while len(manifest.part_urls(output, storage)) < n:
        assert time.monotonic() < deadline, "the job wrote no manifest part in time"
        if alive is not None:
            assert alive(), "the job ended before it could be interrupted"
        time.sleep(0.05)


def _kill_mid_job(ray_address: str, tmp_path, class_name: str, actors: int, **job) -> tuple[list, set]:
    """Run a 30-row job, SIGKILL the last of its `actors` live `class_name` actors once the first
    manifest part is written; after the job ends, every image is there exactly once. Returns the
    actors seen and the manifest's replica names."""
    expected = simple_table(tmp_path / "t.parquet", 30)
    output = str(tmp_path / "out")
    thread, box = _run_in_thread(_job(output, str(tmp_path / "t.parquet"), batch_size=2, **job))
    _wait_for_parts(output, 1, alive=thread.is_alive)
    seen = _generate_stage_actors(ray_address, ray.get_runtime_context().get_job_id(), class_name)
    assert len(seen) == actors
    os.kill(seen[-1].pid, signal.SIGKILL)
    killed_at = len(manifest.done_keys(output))
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    merged = check_complete(output, expected)
    assert killed_at < len(expected)
    return seen, {r["replica"] for r in merged.to_pylist()}


def test_killed_model_actor_is_replaced_and_its_batch_retried(ray_address, tmp_path):
    killed, replicas = _kill_mid_job(ray_address, tmp_path, "GenerateStage", actors=1)
    assert len(replicas) == 2 and any(r.endswith(f":{killed[0].pid}") for r in replicas)


def test_killed_rank_of_a_cfg_parallel_group_is_replaced_and_its_batch_retried(ray_address, tmp_path):
    """A rank of the pool actor's 2 x 1 group dies: the group breaks, the pool actor ends
    (`ReplicaLost`), Ray restarts it with a new group and reruns the batch; every image once."""
    _, replicas = _kill_mid_job(ray_address, tmp_path, "ShardWorker", actors=2, cfg_parallel=True)
    assert len(replicas) == 2 and all("/cfg2xmp1@" in r for r in replicas), replicas


def test_killed_driver_then_rerun_recomputes_only_in_flight_rows(ray_address, tmp_path):
    expected = simple_table(tmp_path / "t.parquet", 30)
    reference = _job(str(tmp_path / "ref"), str(tmp_path / "t.parquet"), batch_size=2)
    run_job(reference)

    output = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "jobs.cli", "generate", "--prompts", str(tmp_path / "t.parquet"),
           "--output", output, "--model", MODEL, "--height", "64", "--width", "64", "--steps", "1",
           "--guidance-scale", "5", "--seed", "3", "--batch-size", "2", "--ray-address", ray_address,
           "--no-progress"]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_parts(output, 3, alive=lambda: driver.poll() is None)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    time.sleep(3)  # let Ray tear the dead driver's workers down
    done_before = manifest.done_keys(output)
    on_disk = set(os.listdir(os.path.join(output, "images")))
    in_flight = {f for f in on_disk if not f.startswith(".")} - {f"{k}_{i}.png" for k, i in done_before}
    assert 0 < len(done_before) < len(expected)
    parts_before = set(manifest.part_urls(output))
    # What a writer killed between its write and its rename leaves (whether or not this kill did):
    # the rerun removes it, so the images folder ends as exactly the manifest's images.
    abandoned = os.path.join(output, "images", ".p000_0.png.tmp-0123456789ab")
    with open(abandoned, "wb") as f:
        f.write(b"half a png")

    result = run_job(_job(output, str(tmp_path / "t.parquet"), batch_size=2))
    merged = check_complete(output, expected)
    assert [int(i[1:]) for i in merged["id"].to_pylist()] == merged["n"].to_pylist()
    # Only what was not done is computed again: nothing in an earlier part is in a new part.
    assert result.processed_images == len(expected) - len(done_before)
    new_rows, _ = manifest.read_parts(output, columns=["key", "k"])
    new = [(kk, k) for kk, k, p in zip(*(new_rows.column(c).to_pylist() for c in ("key", "k", "_part")),
                                       strict=True) if p not in parts_before]  # fmt: skip
    assert not set(new) & done_before
    # Images written after the last part before the kill: at most the batches in flight
    # (1 replica x 2 queued tasks x batch 2, plus the write stage's tasks).
    assert len(in_flight) <= 12, in_flight
    identical = 0
    for key, k in expected:
        a = np.asarray(Image.open(os.path.join(output, "images", f"{key}_{k}.png")), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "ref" / "images" / f"{key}_{k}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, (key, k)
        identical += (tmp_path / "ref" / "images" / f"{key}_{k}.png").read_bytes() == open(
            os.path.join(output, "images", f"{key}_{k}.png"), "rb"
        ).read()
    print(f"driver kill: {len(done_before)} done before, {len(in_flight)} in flight, "
          f"{result.processed_images} computed by the rerun, {identical}/{len(expected)} PNGs byte-identical")  # fmt: skip


def test_s3_endpoint_unreachable_for_seconds_mid_job(ray_address, s3_endpoint, tmp_path):
    expected = simple_table(tmp_path / "t.parquet", 40, steps=1)
    bucket = make_bucket(s3_endpoint)
    direct = storage_options(s3_endpoint)
    with PausableProxy(s3_endpoint) as proxy:
        via_proxy = dataclasses.replace(direct, endpoint_url=proxy.url)
        output = f"s3://{bucket}/out"
        thread, box = _run_in_thread(_job(output, str(tmp_path / "t.parquet"), via_proxy, batch_size=2))
        _wait_for_parts(output, 1, direct, alive=thread.is_alive)
        proxy.pause(6)
        paused_at = time.monotonic()
        thread.join(timeout=300)
        assert time.monotonic() - paused_at > 6, "the job finished before the endpoint came back"
        assert proxy.refused > 0 or not proxy.paused
    assert "error" not in box, box.get("error")
    assert box["result"].rows_failed == 0
    check_complete(output, expected, direct)


# --------------------------------------------------------------------------- malformed inputs


def _table(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def malformed_cases(tmp_path, s3_endpoint):
    good = _table(tmp_path / "good.parquet", id=["a"], prompt=["a cat"])
    (tmp_path / "text.parquet").write_text("not parquet")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    dup = _table(tmp_path / "dup.parquet", id=["a", "b", "a"], prompt=["x", "y", "z"])
    (tmp_path / "mixed").mkdir()
    _table(tmp_path / "mixed" / "a.parquet", prompt=["x"], tag=[1])
    _table(tmp_path / "mixed" / "b.parquet", prompt=["y"], tag=["one"])
    return [
        ("missing file", ["--prompts", str(tmp_path / "nope.parquet")], "no such file"),
        ("not parquet", ["--prompts", str(tmp_path / "text.parquet")], "not a readable Parquet file"),
        ("no prompt column", ["--prompts", _table(tmp_path / "np.parquet", text=["x"])], "no `prompt` column"),
        ("prompt not text", ["--prompts", _table(tmp_path / "pi.parquet", prompt=[1, 2])], "column `prompt` has type int64"),
        ("height not int", ["--prompts", _table(tmp_path / "hs.parquet", prompt=["x"], height=["big"])], "column `height` has type string"),
        ("duplicate ids", ["--prompts", dup], "duplicate id(s): 'a' (2x)"),
        ("manifest column", ["--prompts", _table(tmp_path / "st.parquet", prompt=["x"], status=["new"])], "column(s) `status` would pass through to the manifest"),
        ("column types differ", ["--prompts", str(tmp_path / "mixed")], "column `tag` has type int64 in a.parquet but string in b.parquet"),
        ("empty table", ["--prompts", _table(tmp_path / "e.parquet", prompt=pa.array([], pa.string()))], "has no rows"),
        ("empty folder", ["--prompts", str(tmp_path / "empty_dir")], "holds no Parquet files"),
        ("bad URL", ["--prompts", "ftp://host/t.parquet"], "unsupported URL scheme 'ftp'"),
        ("malformed s3 URL", ["--prompts", "s3:///t.parquet"], "no bucket name"),
        ("output is a file", ["--prompts", good, "--output", str(tmp_path / "a_file")], "is an existing file"),
        ("output not writable", ["--prompts", good, "--output", str(tmp_path / "a_file" / "out")], "not writable"),
        ("missing bucket", ["--prompts", good, "--output", "s3://no-such-bucket-here/out"], "--output s3://no-such-bucket-here/out"),
        ("missing model", ["--prompts", good, "--model", str(tmp_path / "nomodel")], "not a diffusers SD3 folder"),
        ("bad default size", ["--prompts", good, "--height", "70"], "--height 70 is not a positive multiple of 16"),
        ("bad default strength", ["--prompts", good, "--init-image", "a.png", "--strength", "1.5"], "--strength 1.5 exceeds 1"),
        ("init image on a group", ["--prompts", good, "--init-image", "a.png", "--cfg-parallel"], "--init-image: image to image does not run on parallel"),
    ]  # fmt: skip


def test_malformed_inputs_fail_clearly_before_any_work(tmp_path, s3_endpoint, capsys):
    cases = malformed_cases(tmp_path, s3_endpoint)
    assert len(cases) >= 12
    for name, args, message in cases:
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        argv = ["generate", "--output", str(out), "--model", MODEL, "--steps", "1", *args]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
        assert "Traceback" not in err
        # Nothing that could be taken as done: no parts, manifest, job.json or images.
        if out.exists():
            assert [p.name for p in out.rglob("*")] == [], (name, list(out.rglob("*")))


def test_run_job_raises_job_error(tmp_path):
    with pytest.raises(JobError, match="exactly one of --prompts"):
        run_job(JobConfig(output=str(tmp_path), model=MODEL))


def test_model_that_fails_to_load_on_the_replica_stops_the_job_clearly(ray_address, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(MODEL, broken)
    for f in (broken / "transformer").glob("diffusion_pytorch_model*"):
        f.unlink()
    simple_table(tmp_path / "t.parquet", 3)
    config = _job(str(tmp_path / "out"), str(tmp_path / "t.parquet"))
    config.model = str(broken)
    with pytest.raises(JobFailed, match="transformer: neither diffusion_pytorch_model.safetensors"):
        run_job(config)
    assert manifest.part_urls(str(tmp_path / "out")) == []
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_model_folder_declares_its_default_t5_length_and_guidance(tmp_path):
    import shutil

    from jobs.job_preflight import model_defaults

    # side = sample_size 16 x VAE factor 8; T5 length 256 and guidance 7 (diffusers') unless the folder says
    assert model_defaults(MODEL, StorageOptions()) == (128, 256, 7.0)
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "_max_sequence_length": 32, "_guidance_scale": 2})
    )
    assert model_defaults(str(folder), StorageOptions()) == (128, 32, 2.0)
    for bad in ({"_max_sequence_length": 0}, {"_guidance_scale": "high"}):
        (folder / "model_index.json").write_text(json.dumps({**index, **bad}))
        with pytest.raises(JobError, match=next(iter(bad))):
            model_defaults(str(folder), StorageOptions())


# --------------------------------------------------------------------------- a LoRA adapter for all rows

LORA_PROMPTS = ["a red circle on a white background", "a blue square on a black background",
                "a yellow triangle on a white background"]  # fmt: skip
LORA_DEFAULTS = JobDefaults(height=64, width=64, num_inference_steps=2, guidance_scale=5.0, job_seed=11)
LORA_SCALE = 0.8


def default_model_lora(folder, seed: int) -> str:
    """A rank-4 adapter on every default target of the embedded model, random non-zero A and B."""
    from sd3_core import lora, lora_file
    from sd3_core.transformer import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(DEFAULT_MODEL, subfolder="transformer")
    lora.inject_lora(model, "default", rank=4)
    lora.random_lora_weights(model, "default", seed=seed, std=0.2)
    return str(lora_file.save_lora_weights(folder, model))


def _lora_job(output: str, prompts: list[str], storage: StorageOptions, **kw) -> JobConfig:
    return JobConfig(output=output, prompt_list=prompts, model=DEFAULT_MODEL, defaults=LORA_DEFAULTS,
                     storage=storage, progress=False, **kw)  # fmt: skip


def _pngs(output: str) -> dict[str, np.ndarray]:
    rows = manifest.read_manifest(output).to_pylist()
    return {r["prompt"]: np.asarray(Image.open(r["image"]), dtype=np.int16) for r in rows}


@pytest.fixture(scope="module")
def lora_jobs(ray_address, s3_endpoint, tmp_path_factory):
    """Adapters v1, v2 published to a registry on S3 (`latest` = v2); the embedded model's job on
    two prompts with `--lora REGISTRY` (CLI), resumed on three with `--lora REGISTRY:v2`, and the
    same three prompts without an adapter."""
    tmp = tmp_path_factory.mktemp("lora")
    bucket = make_bucket(s3_endpoint)
    storage = storage_options(s3_endpoint)
    registry = f"s3://{bucket}/loras"
    for version, seed in (("v1", 1), ("v2", 2)):
        publish(default_model_lora(tmp / version, seed), registry, version, storage)
    with_lora, without = str(tmp / "with-lora"), str(tmp / "without")
    argv = ["generate", *(a for p in LORA_PROMPTS[:2] for a in ("--prompt", p)), "--output", with_lora,
            "--height", "64", "--width", "64", "--steps", "2", "--guidance-scale", "5", "--seed", "11",
            "--lora", registry, "--lora-scale", str(LORA_SCALE), "--s3-endpoint-url", s3_endpoint,
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    resumed = run_job(
        _lora_job(with_lora, LORA_PROMPTS, storage, lora=f"{registry}:v2", lora_scale=LORA_SCALE)
    )
    run_job(_lora_job(without, LORA_PROMPTS, storage))
    return {"registry": registry, "storage": storage, "with": with_lora, "without": without,
            "resumed": resumed, "tmp": tmp}  # fmt: skip


def test_lora_job_renders_what_the_pipeline_renders_with_that_adapter(lora_jobs):
    from pipelines import StableDiffusion3Pipeline

    assert (lora_jobs["resumed"].processed_images, lora_jobs["resumed"].skipped_rows) == (1, 2)
    rows = manifest.read_manifest(lora_jobs["with"]).to_pylist()
    assert [r["prompt"] for r in rows] == LORA_PROMPTS and all(r["status"] == "ok" for r in rows)
    pipe = StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=LORA_PROMPTS, seed=[r["seed"] for r in rows], height=64, width=64,
                num_inference_steps=2, guidance_scale=5.0)  # fmt: skip
    base = pipe(**call).images
    pipe.load_lora_weights(f"{lora_jobs['registry']}:v2", scale=LORA_SCALE)  # unfused
    adapted = pipe(**call).images
    with_lora, without = _pngs(lora_jobs["with"]), _pngs(lora_jobs["without"])
    for prompt, a, b in zip(LORA_PROMPTS, adapted, base, strict=True):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        assert np.abs(with_lora[prompt] - a).max() <= 2, prompt  # the job fuses: float rounding only
        assert np.abs(without[prompt] - b).max() <= 1, prompt
        assert np.abs(with_lora[prompt] - without[prompt]).mean() > 2, prompt  # the adapter shows


def test_lora_registry_reference_is_pinned_and_recorded(lora_jobs):
    registry, storage = lora_jobs["registry"], lora_jobs["storage"]
    v2 = read_bytes(f"{registry}/v2/pytorch_lora_weights.safetensors", storage)
    sha256 = hashlib.sha256(v2).hexdigest()
    rows = manifest.read_manifest(lora_jobs["with"]).to_pylist()
    assert {(r["lora"], r["lora_scale"]) for r in rows} == {(f"{registry}:v2#sha256:{sha256}", LORA_SCALE)}
    assert {
        (r["lora"], r["lora_scale"]) for r in manifest.read_manifest(lora_jobs["without"]).to_pylist()
    } == {(None, None)}
    job = json.loads(read_bytes(os.path.join(lora_jobs["with"], "job.json")))
    record = job["resolved"]["lora"]
    assert (record["ref"], record["registry"], record["version"]) == (f"{registry}:v2", registry, "v2")
    assert (record["sha256"], record["size"], record["scale"]) == (sha256, len(v2), LORA_SCALE)
    assert record["url"] == f"{registry}/v2/pytorch_lora_weights.safetensors"
    assert job["config"]["lora"] == f"{registry}:v2"
    assert json.loads(read_bytes(os.path.join(lora_jobs["without"], "job.json")))["resolved"]["lora"] is None


def test_resume_with_another_adapter_is_refused(lora_jobs):
    registry, storage, tmp = lora_jobs["registry"], lora_jobs["storage"], lora_jobs["tmp"]
    publish(default_model_lora(tmp / "v3", 3), registry, "v3", storage)  # `latest` moves on
    used, s = f"--lora {registry}:v2 --lora-scale 0.8", {"lora_scale": LORA_SCALE}
    cases = {  # name: (output, this run's adapter, the adapter of the images there, this run's)
        "other version": ("with", {"lora": f"{registry}:v1", **s}, used, f"--lora {registry}:v1 --lora-scale 0.8"),
        "other scale": ("with", {"lora": f"{registry}:v2"}, used, f"--lora {registry}:v2 --lora-scale 1 "),
        "latest moved": ("with", {"lora": registry, **s}, used, f"--lora {registry}:v3 --lora-scale 0.8"),
        "no adapter": ("with", {}, used, "no --lora;"),
        "adapter added": ("without", {"lora": f"{registry}:v2"}, "no --lora,", f"--lora {registry}:v2 "),
    }  # fmt: skip
    for name, (output, adapter, before, now) in cases.items():
        output = lora_jobs[output]
        files = listing(output)
        with pytest.raises(JobError, match=r"^--lora: .* already holds \d image\(s\) rendered with ") as e:
            run_job(_lora_job(output, LORA_PROMPTS, storage, **adapter))
        message = str(e.value)
        assert f"rendered with {before}" in message and f"this run has {now}" in message, (name, message)
        assert listing(output) == files, name  # refused before anything is written


def test_resume_with_another_model_is_refused(lora_jobs, tmp_path):
    import dataclasses
    import shutil

    output, storage = lora_jobs["without"], lora_jobs["storage"]
    files = listing(output)
    copy = tmp_path / "default_model"  # the same configs at another URL: maybe other weights
    shutil.copytree(DEFAULT_MODEL, copy)
    for model in (str(copy), MODEL):
        with pytest.raises(JobError, match=r"^--model: .* already holds 3 image\(s\) rendered by ") as e:
            run_job(dataclasses.replace(_lora_job(output, LORA_PROMPTS, storage), model=model))
        assert f"rendered by {DEFAULT_MODEL}#sha256:" in str(e.value)
        assert f"this run's model is {model}#sha256:" in str(e.value)
        assert listing(output) == files  # refused before anything is written
    assert run_job(_lora_job(output, LORA_PROMPTS, storage)).processed_images == 0  # the same model resumes


def test_a_peft_adapter_folder_is_what_replicas_apply(tmp_path):
    """--lora PEFT_FOLDER: checked against the model on the driver, and a replica bakes in the
    adapter with the alpha of its adapter_config.json, as the pipeline loads the folder."""
    from actors.replica import apply_lora
    from jobs.job_preflight import pin_job_lora
    from pipelines import StableDiffusion3Pipeline
    from tests.lora_recipe import peft_folder

    folder = peft_folder(tmp_path / "peft", alpha=8)
    pinned = pin_job_lora(str(folder), MODEL, StorageOptions())
    call = dict(prompt="a cat", seed=3, height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
                output_type="np")  # fmt: skip

    def render(load) -> np.ndarray:
        pipe = StableDiffusion3Pipeline.from_pretrained(MODEL)
        pipe.set_progress_bar_config(disable=True)
        load(pipe)
        return pipe(**call).images

    want = render(lambda pipe: pipe.load_lora_weights(str(folder)))
    np.testing.assert_allclose(
        render(lambda pipe: apply_lora(pipe, pinned, 1.0, StorageOptions())), want, atol=1e-4
    )
    alone = render(lambda pipe: pipe.load_lora_weights(str(folder / "adapter_model.safetensors")))
    assert np.abs(alone - want).max() > 1e-3  # the config's alpha (8, not the rank 2) shows


def test_bad_lora_fails_before_any_work(lora_jobs, capsys):
    tmp = lora_jobs["tmp"]
    (tmp / "garbage.safetensors").write_text("not a safetensors file")
    tiny = os.path.join(ROOT, "tests", "fixtures", "training", "lora", "ours_sd3-tiny_r4_alpha6.safetensors")
    cases = [
        (["--lora", str(tmp / "missing.safetensors")], "missing.safetensors does not exist"),
        (["--lora", str(tmp / "no-such-folder")], "neither a registry"),
        (["--lora", f"{lora_jobs['registry']}:v9"], "version 'v9' is not published"),
        (["--lora", str(tmp / "garbage.safetensors")], "safetensors header"),
        (["--lora", tiny], "LoRA does not match SD3Transformer2DModel"),
        (["--lora", tiny, "--lora-scale", "nan"], "--lora-scale nan must be a finite number"),
        (["--lora-scale", "0.5"], "--lora-scale 0.5 needs --lora"),
        (["--lora", "org/sd3-lora"], "a Hugging Face Hub id is not taken here"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp / f"bad-{i}"
        argv = ["generate", "--prompt", "a cat", "--output", str(out), "--steps", "1", "--no-progress", *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and "--lora" in err and "Traceback" not in err, (args, err)
        assert not out.exists(), args  # not even the write probe: the adapter is checked first


# --------------------------------------------------------------------------- image to image


def test_init_image_rows_render_image_to_image_beside_text_rows(ray_address, s3_endpoint, tmp_path):
    """A table mixing text-to-image rows and `init_image` rows (a local path and an S3 URL), with
    per-row `strength`; a bad picture and a strength without init_image are reported per row."""
    from pipelines import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    bucket = make_bucket(s3_endpoint)
    storage = storage_options(s3_endpoint)
    rng = np.random.default_rng(0)
    start = np.repeat(np.repeat(rng.uniform(0, 255, (4, 4, 3)), 16, 0), 16, 1).round().astype(np.uint8)
    Image.fromarray(start).save(tmp_path / "start.png")
    s3_picture = f"s3://{bucket}/pictures/start.png"
    write_bytes_atomic(s3_picture, (tmp_path / "start.png").read_bytes(), storage)
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    rows = [
        {"id": "text", "prompt": "a red fox", "init_image": None, "strength": None},
        {"id": "local", "prompt": "a red fox", "init_image": str(tmp_path / "start.png"), "strength": None},
        {"id": "s3", "prompt": "a cat", "init_image": s3_picture, "strength": 0.4},
        {"id": "broken", "prompt": "a dog", "init_image": str(tmp_path / "broken.png"), "strength": None},
        {"id": "stray", "prompt": "a dog", "init_image": None, "strength": 0.5},
        {"id": "zero", "prompt": "a dog", "init_image": s3_picture, "strength": 0.0},
    ]
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("init_image", pa.string()), ("strength", pa.float64())]
    )), table)  # fmt: skip
    output = str(tmp_path / "out")
    run_job(_job(output, str(table), storage, defaults=dataclasses.replace(SMALL, num_inference_steps=4)))
    got = {r["id"]: r for r in manifest.read_manifest(output, storage).to_pylist()}
    assert {i: r["status"] for i, r in got.items()} == {
        "text": "ok", "local": "ok", "s3": "ok", "broken": "error", "stray": "error", "zero": "error"
    }  # fmt: skip
    assert "init_image: cannot read" in got["broken"]["error"] and "broken.png" in got["broken"]["error"]
    assert "strength: given without init_image" in got["stray"]["error"]
    assert "strength: 0.0 is not > 0" in got["zero"]["error"]
    assert (got["local"]["init_image"], got["local"]["strength"]) == (str(tmp_path / "start.png"), None)
    assert (got["s3"]["init_image"], got["s3"]["strength"]) == (s3_picture, 0.4)
    assert got["text"]["init_image"] is None

    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    call = dict(height=64, width=64, num_inference_steps=4, guidance_scale=5.0, image=Image.fromarray(start))
    text_to_image = StableDiffusion3Pipeline.from_pipe(pipe)
    expected = {
        "local": pipe("a red fox", **call, seed=[got["local"]["seed"]]).images[0],
        "s3": pipe("a cat", **call, strength=0.4, seed=[got["s3"]["seed"]]).images[0],
        "text": text_to_image("a red fox", **{k: v for k, v in call.items() if k != "image"},
                              seed=[got["text"]["seed"]]).images[0],
    }  # fmt: skip
    for name, picture in expected.items():
        image = np.asarray(Image.open(io.BytesIO(read_bytes(got[name]["image"], storage))), dtype=np.int16)
        assert np.abs(image - np.asarray(picture, dtype=np.int16)).max() <= 1, name


def test_a_replica_without_an_image_to_image_pipeline_refuses_init_image_rows_by_name():
    """A parallel group's replica (`GroupReplica` renders with no image-to-image pipeline)."""
    from actors.replica import RenderRequest, render_request
    from sd3_core.generation_fields import image_fields

    values = {"prompt": "a fox", "seed": 1, "init_image": "start.png", "strength": None}
    request = RenderRequest(
        **{f.name: values.get(f.name) if f.shared else [values.get(f.name)] for f in image_fields()}
    )
    with pytest.raises(
        ValueError, match=r"init_image: image to image does not run on parallel replica groups"
    ):
        render_request(None, request)
