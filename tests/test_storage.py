"""sd3_core.storage against local paths, file:// URLs and a real S3 endpoint (moto_server on loopback)."""

from __future__ import annotations

import os
import pickle
import time

import pytest

from sd3_core import storage
from sd3_core.storage import StorageOptions, get_fs, join_url, split_url
from tests.s3_server import PausableProxy, make_bucket, s3_client, storage_options

# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    "url, scheme, path",
    [
        ("/abs/dir/f.parquet", "", "/abs/dir/f.parquet"),
        ("file:///abs/dir/f.parquet", "", "/abs/dir/f.parquet"),
        ("FILE:///abs/x", "", "/abs/x"),
        ("s3://bucket/a/b.parquet", "s3", "bucket/a/b.parquet"),
        ("s3://bucket/prefix/", "s3", "bucket/prefix"),
        ("s3://bucket", "s3", "bucket"),
        ("notes:v2.parquet", "", os.path.abspath("notes:v2.parquet")),
    ],
)
def test_split_url(url, scheme, path):
    assert split_url(url) == (scheme, path)


def test_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert split_url("out/x") == ("", str(tmp_path / "out" / "x"))
    assert storage.normalize_url("out") == str(tmp_path / "out")
    assert storage.normalize_url("s3://b/p") == "s3://b/p"


@pytest.mark.parametrize(
    "url, words",
    [
        ("gs://bucket/x", ["scheme 'gs'", "gs://bucket/x"]),
        ("http://host/x.parquet", ["scheme 'http'", "http://host/x.parquet"]),
        ("hdfs://nn/x", ["hdfs://nn/x"]),
        ("s3://", ["no bucket", "s3://"]),
        ("s3:///key", ["no bucket"]),
        ("s3:/bucket/key", ["malformed", "s3:/bucket/key"]),
        ("file://relative/x", ["absolute path", "file://relative/x"]),
        ("", ["empty"]),
        ("   ", ["empty"]),
        ("/tmp/a\x00b", ["NUL"]),
    ],
)
def test_bad_urls_raise_value_error_naming_the_url(url, words):
    with pytest.raises(ValueError) as e:
        get_fs(url)
    for w in words:
        assert w in str(e.value)


def test_join_url():
    assert join_url("s3://b/out", "images", "k_0.png") == "s3://b/out/images/k_0.png"
    assert join_url("s3://b/out/", "/manifest/parts/", "p.parquet") == "s3://b/out/manifest/parts/p.parquet"
    assert join_url("/tmp/out", "a") == "/tmp/out/a"
    assert join_url("/", "a") == "/a"
    assert join_url("file:///x", "y") == "file:///x/y"
    assert join_url("s3://b", "", "c") == "s3://b/c"


# ------------------------------------------------------------------ options


def test_options_from_env_and_flags(monkeypatch):
    for k in [
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_SESSION_TOKEN",
    ]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    o = StorageOptions.from_env()
    assert (o.endpoint_url, o.key, o.secret, o.region, o.anon) == (
        "http://127.0.0.1:1",
        "AK",
        "SK",
        "eu-west-1",
        False,
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the S3-specific variable wins
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    o = StorageOptions.from_env()
    assert (o.endpoint_url, o.region) == ("http://127.0.0.1:2", "us-west-2")
    o = StorageOptions.from_env(endpoint_url="http://127.0.0.1:3", key="K2", anon=True)  # flags override
    assert (o.endpoint_url, o.key, o.secret, o.anon) == ("http://127.0.0.1:3", "K2", "SK", True)
    assert pickle.loads(pickle.dumps(o)) == o
    assert "SK" not in repr(o) and "K2" not in repr(o)
    assert "secret" not in o.public_dict() and "key" not in o.public_dict()


def test_options_from_empty_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    assert StorageOptions.from_env() == StorageOptions()


# ------------------------------------------------------------------ local + file://


@pytest.mark.parametrize("as_file_url", [False, True])
def test_local_roundtrip(tmp_path, as_file_url):
    base = f"file://{tmp_path}" if as_file_url else str(tmp_path)
    url = join_url(base, "deep", "er", "x.bin")
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, b"one")
    assert storage.read_bytes(url) == b"one"
    storage.write_bytes_atomic(url, b"two")  # overwrite
    assert storage.read_bytes(url) == b"two"
    assert storage.exists(url) and storage.exists(join_url(base, "deep"))
    assert os.listdir(tmp_path / "deep" / "er") == ["x.bin"]  # no temporary left behind
    storage.write_bytes_atomic(join_url(base, "deep", "er", "a.txt"), b"")
    storage.write_bytes_atomic(join_url(base, "deep", "er", "_hidden"), b"")
    assert storage.list_files(join_url(base, "deep", "er")) == [
        join_url(base, "deep", "er", "a.txt"),
        join_url(base, "deep", "er", "x.bin"),
    ]
    assert storage.list_files(join_url(base, "deep", "er"), suffix=".bin") == [url]
    assert storage.list_files(join_url(base, "nope")) == []


def test_read_missing_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        storage.read_bytes(str(tmp_path / "nothere"))


def test_failed_local_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    target = tmp_path / "out" / "img.png"

    def broken_fsync(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(str(target), b"x" * 1000)
    assert not target.exists()
    assert os.listdir(tmp_path / "out") == []  # the temporary is removed too

    monkeypatch.undo()
    storage.write_bytes_atomic(str(target), b"old")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        storage.write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"  # the previous complete content survives
    assert os.listdir(tmp_path / "out") == ["img.png"]


def test_abandoned_temporaries_older_than_the_sweep_are_removed_and_nothing_else(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    left = []  # a writer killed between write and rename: its temporary stays, under its real name
    monkeypatch.setattr(os, "replace", lambda src, dst: left.append(src))
    storage.write_bytes_atomic(str(folder / "a_0.png"), b"half")
    storage.write_bytes_atomic(str(folder / "b_0.png"), b"in flight")
    monkeypatch.undo()
    old, live = left
    os.utime(old, (time.time() - 600, time.time() - 600))
    for name in ("c_0.png", ".c_0.png.tmp-notahexname", "x.tmp-0123456789ab"):
        (folder / name).write_bytes(b"kept")
    assert storage.remove_abandoned_temporaries(str(folder), time.time() - 60) == 1
    assert sorted(os.listdir(folder)) == sorted(
        [os.path.basename(live), "c_0.png", ".c_0.png.tmp-notahexname", "x.tmp-0123456789ab"]
    )  # a temporary newer than the sweep's start may be a live write: kept
    assert storage.remove_abandoned_temporaries(f"file://{folder}", time.time() + 1) == 1
    assert storage.remove_abandoned_temporaries(str(tmp_path / "missing"), time.time()) == 0


def test_unwritable_local_output_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        storage.write_bytes_atomic(str(blocker / "sub" / "x"), b"data")


# ------------------------------------------------------------------ s3


def test_s3_roundtrip(s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    opts = storage_options(s3_endpoint)
    url = f"s3://{bucket}/out/images/a_0.png"
    assert not storage.exists(url, opts)
    storage.write_bytes_atomic(url, b"\x89PNG...", opts)
    assert storage.read_bytes(url, opts) == b"\x89PNG..."
    assert storage.exists(url, opts) and storage.exists(f"s3://{bucket}/out/images", opts)
    storage.write_bytes_atomic(url, b"v2", opts)
    assert storage.read_bytes(url, opts) == b"v2"
    storage.write_bytes_atomic(f"s3://{bucket}/out/images/.tmp", b"", opts)
    assert storage.list_files(f"s3://{bucket}/out/images", opts) == [url]
    assert storage.list_files(f"s3://{bucket}/out/missing", opts) == []
    # One PUT, no multipart upload left behind.
    assert "Uploads" not in s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket)
    with pytest.raises(FileNotFoundError, match="nothing"):
        storage.read_bytes(f"s3://{bucket}/nothing", opts)


def test_s3_options_from_env(s3_endpoint):
    # The fixture set the standard AWS variables: no explicit options needed.
    bucket = make_bucket(s3_endpoint)
    storage.write_bytes_atomic(f"s3://{bucket}/x", b"env")
    assert storage.read_bytes(f"s3://{bucket}/x") == b"env"
    assert StorageOptions.from_env().endpoint_url == s3_endpoint


def test_s3_missing_bucket(s3_endpoint):
    opts = storage_options(s3_endpoint)
    assert not storage.exists("s3://no-such-bucket-xyz/a", opts)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://no-such-bucket-xyz/a", opts)


@pytest.mark.parametrize("mode", ["refuse", "close"])
def test_s3_write_rides_out_a_short_outage(s3_endpoint, mode):
    """botocore's retries (standard mode) carry a write through seconds of an unreachable endpoint."""
    bucket = make_bucket(s3_endpoint)
    with PausableProxy(s3_endpoint) as proxy:
        opts = storage_options(proxy.url)
        storage.write_bytes_atomic(f"s3://{bucket}/before", b"1", opts)  # opens pooled connections
        proxy.pause(2.0, mode=mode)
        t0 = time.monotonic()
        storage.write_bytes_atomic(f"s3://{bucket}/during", b"2", opts)
        assert time.monotonic() - t0 >= 1.5  # it really waited for the endpoint
        assert not proxy.paused
        assert storage.read_bytes(f"s3://{bucket}/during", opts) == b"2"


def test_pausable_proxy_close_mode(s3_endpoint):
    import socket

    with PausableProxy(s3_endpoint) as proxy:
        with proxy.paused_for(5, mode="close"):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:
                assert s.recv(1) == b""  # accepted and closed at once
        with proxy.paused_for(5, mode="refuse"):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:  # resumed
            s.sendall(b"GET /moto-api/ HTTP/1.0\r\n\r\n")
            assert s.recv(12).startswith(b"HTTP/1.")


# ------------------------------------------------------------------ writability probe


def test_check_writable(tmp_path, s3_endpoint):
    storage.check_writable(str(tmp_path / "new" / "out"))
    assert os.listdir(tmp_path / "new" / "out") == []  # the probe is removed
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(PermissionError, match="is not writable") as e:
        storage.check_writable(str(tmp_path / "file" / "out"))
    assert str(tmp_path / "file" / "out") in str(e.value)
    opts = storage_options(s3_endpoint)
    bucket = make_bucket(s3_endpoint)
    storage.check_writable(f"s3://{bucket}/out", opts)
    assert storage.list_files(f"s3://{bucket}/out", opts) == []
    with pytest.raises(PermissionError, match="s3://no-such-bucket-abc/out"):
        storage.check_writable("s3://no-such-bucket-abc/out", opts)
