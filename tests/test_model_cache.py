"""sd3_core.model_cache: local folders as is; object-storage models downloaded once per node, atomically."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time

import pytest

from sd3_core import model_cache
from sd3_core.model_cache import cache_path, local_model_path, model_identity
from tests.s3_server import make_bucket, storage_options

FILES = {
    "model_index.json": b'{"_class_name": "StableDiffusion3Pipeline"}',
    "transformer/config.json": b'{"sample_size": 8}',
    # Deterministic bytes: spawned worker processes re-import this module.
    "transformer/diffusion_pytorch_model.safetensors": bytes(range(256)) * 800,
    "scheduler/scheduler_config.json": b'{"shift": 3.0}',
    "tokenizer/vocab.json": b"{}",
}


def upload_model(endpoint: str, files: dict[str, bytes] = FILES) -> str:
    import s3fs

    bucket = make_bucket(endpoint)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    for rel, data in files.items():
        fs.pipe(f"{bucket}/models/tiny/{rel}", data)
    return f"s3://{bucket}/models/tiny"


def assert_complete(path: str) -> None:
    for rel, data in FILES.items():
        with open(os.path.join(path, rel), "rb") as f:
            assert f.read() == data, rel


def test_local_folder_is_used_as_is(tmp_path):
    assert local_model_path(str(tmp_path)) == str(tmp_path)
    assert local_model_path(f"file://{tmp_path}") == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        local_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="gs://"):
        local_model_path("gs://bucket/model")


def test_download_once_with_concurrent_threads(s3_endpoint, tmp_path, monkeypatch):
    uri = upload_model(s3_endpoint)
    opts = storage_options(s3_endpoint)
    calls = []
    real = model_cache._download

    def counting(*args):
        calls.append(args)
        time.sleep(0.3)  # a slow download: the others must wait, not start their own
        return real(*args)

    monkeypatch.setattr(model_cache, "_download", counting)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker():
        try:
            path = local_model_path(uri, opts, cache_dir=str(tmp_path))
            assert_complete(path)  # whoever returns sees the whole model
            results.append(path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len(set(results)) == 1 and results[0] == cache_path(uri, str(tmp_path))
    info = json.loads(open(os.path.join(results[0], model_cache.INFO_NAME)).read())
    assert info["uri"] == uri and info["files"] == len(FILES)
    # Later calls hit the cache without any download.
    assert local_model_path(uri + "/", opts, cache_dir=str(tmp_path)) == results[0]
    assert len(calls) == 1
    # Nothing but the model and its lock file in the cache dir.
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(results[0]), os.path.basename(results[0]) + ".lock"]
    )


def _process_worker(uri, opts, cache_dir, marker_dir, queue):
    real = model_cache._download

    def counting(*args):
        open(os.path.join(marker_dir, f"download-{os.getpid()}"), "w").close()
        time.sleep(0.3)
        return real(*args)

    model_cache._download = counting
    try:
        path = local_model_path(uri, opts, cache_dir=cache_dir)
        assert_complete(path)
        queue.put(("ok", path))
    except BaseException as e:  # noqa: BLE001 - sent to the parent
        queue.put(("error", repr(e)))


def test_download_once_with_concurrent_processes(s3_endpoint, tmp_path):
    uri = upload_model(s3_endpoint)
    opts = storage_options(s3_endpoint)
    markers = tmp_path / "markers"
    markers.mkdir()
    ctx = multiprocessing.get_context("spawn")  # s3fs's event loop is not fork-safe
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(uri, opts, str(tmp_path / "cache"), str(markers), queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [s for s, _ in got] == ["ok", "ok"], got
    assert len({path for _, path in got}) == 1
    assert len(os.listdir(markers)) == 1  # exactly one process downloaded


def test_failed_download_is_never_visible_and_is_retried(s3_endpoint, tmp_path, monkeypatch):
    uri = upload_model(s3_endpoint)
    opts = storage_options(s3_endpoint)
    real = model_cache._download

    def half_then_crash(u, target, o):
        os.makedirs(os.path.join(target, "transformer"))
        with open(os.path.join(target, "model_index.json"), "wb") as f:
            f.write(FILES["model_index.json"])
        raise ConnectionError("network died mid-download (simulated)")

    monkeypatch.setattr(model_cache, "_download", half_then_crash)
    with pytest.raises(ConnectionError):
        local_model_path(uri, opts, cache_dir=str(tmp_path))
    dest = cache_path(uri, str(tmp_path))
    assert not os.path.exists(dest)
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []

    # A temp folder left by a killed process (no cleanup ran) is removed by the next download.
    os.makedirs(dest + ".tmp-99999-dead")
    monkeypatch.setattr(model_cache, "_download", real)
    path = local_model_path(uri, opts, cache_dir=str(tmp_path))
    assert path == dest
    assert_complete(path)
    assert not os.path.exists(dest + ".tmp-99999-dead")


def test_prefix_without_a_model(s3_endpoint, tmp_path):
    uri = upload_model(s3_endpoint, {"readme.txt": b"hi"})
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        local_model_path(uri, storage_options(s3_endpoint), cache_dir=str(tmp_path))
    assert not os.path.exists(cache_path(uri, str(tmp_path)))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "c"))
    assert cache_path("s3://b/m").startswith(str(tmp_path / "c") + os.sep)
    monkeypatch.delenv(model_cache.CACHE_ENV)
    assert ".cache/sd3-ray/models" in cache_path("s3://b/m")
    assert cache_path("s3://b/m") == cache_path("s3://b/m/") != cache_path("s3://b/other")


def test_model_identity(tmp_path):
    for rel, data in FILES.items():
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    ident = model_identity(str(tmp_path), "s3://b/m")
    assert ident.startswith("s3://b/m#sha256:") and len(ident.split(":")[-1]) == 16
    assert model_identity(str(tmp_path), "s3://b/m") == ident
    assert model_identity(str(tmp_path)).startswith(str(tmp_path) + "#sha256:")
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert model_identity(str(tmp_path), "s3://b/m") == ident  # weights are not hashed (too slow)
    (tmp_path / "scheduler" / "scheduler_config.json").write_bytes(b'{"shift": 1.0}')
    assert model_identity(str(tmp_path), "s3://b/m") != ident


def _walk_identity(local: str, uri: str) -> str:
    """The identity as first written (os.walk, sorted): a reference the fsspec version must match,
    so manifests written before it still name the same model."""
    import hashlib

    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".json") and ("config" in name or name == "model_index.json"):
                full = os.path.join(dirpath, name)
                h.update(os.path.relpath(full, local).replace(os.sep, "/").encode() + b"\0")
                h.update(open(full, "rb").read() + b"\0")
    return f"{uri}#sha256:{h.hexdigest()[:16]}"


def test_model_identity_is_the_same_locally_and_on_s3(s3_endpoint, tmp_path):
    from sd3_core.storage import get_fs

    # a root file that sorts after a folder name: hashed before the folder's files, as os.walk does
    files = {**FILES, "z_config.json": b"{}", "a/b/config.json": b'{"x": 1}', "a/config.json": b"{}"}
    uri = upload_model(s3_endpoint, files)
    for rel, data in files.items():
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    fs, path = get_fs(uri, storage_options(s3_endpoint))
    remote = model_identity(path, uri, fs)
    assert remote == model_identity(str(tmp_path), uri) == _walk_identity(str(tmp_path), uri)
    assert model_identity(str(tmp_path) + "/", uri) == remote


def test_model_identity_of_the_default_model():
    default_model = os.path.join(os.path.dirname(model_cache.__file__), "default_model")
    assert model_identity(default_model) != model_identity(
        os.path.join(os.path.dirname(__file__), "fixtures", "sd35-tiny")
    )
    assert model_identity(default_model) == model_identity(default_model)
