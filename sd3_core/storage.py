"""Storage access for batch jobs: every path is an fsspec URL (local path, file://, s3:// via s3fs).

Writes are atomic: a local file is written to a temporary sibling and `os.replace`d into place; an
S3 object is written with one PUT (s3fs uses a single `PutObject` below 100 MiB, and a multipart
upload only becomes visible when it is completed). So a reader never sees half an object
under its final name. Transient S3 errors are retried by botocore (standard retry mode, several
attempts with exponential backoff) and by s3fs, never by loops of our own.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

LOCAL_SCHEMES = ("", "file", "local")
S3_SCHEMES = ("s3", "s3a")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")

# botocore retry/timeouts: with "standard" mode each retry waits rand(0, 1) * min(2**attempt, 20) s,
# so 12 attempts ride out an endpoint that is unreachable for tens of seconds.
S3_MAX_ATTEMPTS = 12
S3_CONNECT_TIMEOUT = 5
S3_READ_TIMEOUT = 60


@dataclass(frozen=True)
class StorageOptions:
    """Endpoint and credentials for object storage; picklable, so it travels to Ray workers.

    None means "let botocore decide" (its own environment/credential chain)."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None
    anon: bool = False
    token: str | None = None

    @classmethod
    def from_env(
        cls,
        *,
        endpoint_url: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        region: str | None = None,
        anon: bool | None = None,
        token: str | None = None,
    ) -> StorageOptions:
        """Options from the standard AWS variables; non-None arguments (command-line flags) override."""
        env = os.environ
        base = cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret=env.get("AWS_SECRET_ACCESS_KEY") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            token=env.get("AWS_SESSION_TOKEN") or None,
        )
        flags = {
            "endpoint_url": endpoint_url,
            "key": key,
            "secret": secret,
            "region": region,
            "anon": anon,
            "token": token,
        }
        return replace(base, **{k: v for k, v in flags.items() if v is not None})

    def __repr__(self) -> str:
        # Never print secrets into logs or job.json.
        return (
            f"StorageOptions(endpoint_url={self.endpoint_url!r}, key={'***' if self.key else None}, "
            f"secret={'***' if self.secret else None}, region={self.region!r}, anon={self.anon})"
        )

    def public_dict(self) -> dict:
        """The options without credentials (for job.json)."""
        return {"endpoint_url": self.endpoint_url, "region": self.region, "anon": self.anon}


def split_url(url: str) -> tuple[str, str]:
    """(scheme, path-within-filesystem) of `url`; ValueError naming the URL when it is unusable."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty or invalid URL {url!r}")
    if "\x00" in url:
        raise ValueError(f"URL {url!r} contains a NUL character")
    m = _SCHEME.match(url)
    # A one-letter "scheme" is a Windows drive letter, i.e. a local path.
    if m is None or len(m.group(1)) == 1:
        return "", os.path.abspath(os.path.expanduser(url))
    scheme = m.group(1).lower()
    if m.group(2) is None:
        if "/" in url[: m.end() + 1]:
            raise ValueError(f"malformed URL {url!r}: expected {scheme}://...")
        return "", os.path.abspath(os.path.expanduser(url))  # e.g. "notes:v2.parquet", a file name
    rest = url[m.end() :]
    if scheme in LOCAL_SCHEMES:
        if rest and not rest.startswith("/"):
            raise ValueError(f"malformed URL {url!r}: a file URL needs an absolute path (file:///abs/path)")
        return "", os.path.abspath(rest or "/")
    if scheme in S3_SCHEMES:
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError(f"malformed URL {url!r}: no bucket name (expected s3://bucket/prefix)")
        return "s3", rest.rstrip("/") if rest.rstrip("/") else bucket
    raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}: use a local path, file:// or s3://")


def normalize_url(url: str) -> str:
    """`url` with a local path made absolute (Ray workers do not share the driver's cwd)."""
    scheme, path = split_url(url)
    return path if scheme == "" else url


def get_fs(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path within it."""
    scheme, path = split_url(url)
    if scheme == "":
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), path
    return _s3fs(options if options is not None else StorageOptions.from_env()), path


def _s3fs(options: StorageOptions) -> fsspec.AbstractFileSystem:
    import s3fs

    client_kwargs = {}
    if options.region:
        client_kwargs["region_name"] = options.region
    return s3fs.S3FileSystem(
        key=options.key,
        secret=options.secret,
        token=options.token,
        anon=options.anon,
        endpoint_url=options.endpoint_url,
        client_kwargs=client_kwargs,
        config_kwargs={
            "retries": {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            "connect_timeout": S3_CONNECT_TIMEOUT,
            "read_timeout": S3_READ_TIMEOUT,
        },
        # Other processes write to the same prefixes (parts, images): a cached listing would be stale.
        use_listings_cache=False,
    )


def pyarrow_fs(url: str, options: StorageOptions | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem (wrapping the fsspec one) and the path, for pyarrow/Ray readers."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = get_fs(url, options)
    return PyFileSystem(FSSpecHandler(fs)), path


def join_url(base: str, *parts: str) -> str:
    """`base` joined with `parts` by "/" (the separator of every URL kind we support)."""
    out = base.rstrip("/") or base
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if out != "/" else f"/{part}"
    return out


# The temporary name of a local atomic write: hidden (readers skip ".x" names), then renamed.
_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


def write_bytes_atomic(url: str, data: bytes, options: StorageOptions | None = None) -> str:
    """Write `data` to `url` so the name only ever holds a complete object; returns `url`."""
    fs, path = get_fs(url, options)
    if _is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return url
    # One PutObject for anything below s3fs's chunk size: S3 makes it visible only when complete.
    fs.pipe_file(path, bytes(data))
    return url


def remove_abandoned_temporaries(
    folder_url: str, before: float, options: StorageOptions | None = None
) -> int:
    """Delete the temporaries of `write_bytes_atomic` in `folder_url` last modified before `before`
    (a POSIX time); returns how many. A writer killed between its write and its rename (a killed
    driver's workers, a lost node) leaves one behind; one older than the start of the job that
    sweeps is no write of that job's. Object stores have none: their writes are single PUTs."""
    fs, path = get_fs(folder_url, options)
    if not _is_local(fs) or not os.path.isdir(path):
        return 0
    removed = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if _TEMPORARY.match(entry.name) and entry.is_file() and entry.stat().st_mtime < before:
                _remove_quietly(entry.path)
                removed += 1
    return removed


def check_writable(url: str, options: StorageOptions | None = None) -> None:
    """Write and delete a probe object under the folder/prefix `url`: fails early (naming the URL)
    when the output cannot be written, before any work is done."""
    probe = join_url(url, f".sd3-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes_atomic(probe, b"", options)
    except (OSError, ValueError) as e:
        raise PermissionError(f"output {url} is not writable: {e}") from e
    fs, path = get_fs(probe, options)
    try:
        fs.rm_file(path)
    except OSError:
        pass  # a leftover hidden probe is harmless: readers skip ".x" names


def read_bytes(url: str, options: StorageOptions | None = None) -> bytes:
    """The whole content of `url` (FileNotFoundError naming the URL when absent)."""
    fs, path = get_fs(url, options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file or object") from None


def exists(url: str, options: StorageOptions | None = None) -> bool:
    """Whether `url` names an existing file, object or directory/prefix."""
    fs, path = get_fs(url, options)
    return fs.exists(path)


def list_files(url: str, options: StorageOptions | None = None, suffix: str = "") -> list[str]:
    """Sorted URLs of the files directly under `url` ending in `suffix`, skipping hidden/temporary
    names (".x", "_x"); [] when the folder does not exist."""
    fs, path = get_fs(url, options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = sorted(os.path.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")
    return [join_url(url, n) for n in names if n.endswith(suffix) and not n.startswith((".", "_"))]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
