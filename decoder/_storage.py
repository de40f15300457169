"""Where checkpoints live: the project's local cache, and copies from Google Cloud Storage.

Set ``STORAGE_EMULATOR_HOST`` (e.g. ``http://127.0.0.1:9023``) to talk to an emulator: the
client then uses anonymous credentials, so no credential lookup (metadata server, gcloud)
ever happens in tests or offline runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.cloud import storage


def cache_dir() -> Path:
    """Root of the project's caches: ``$DFLASH_BATCH_CACHE``, else ``~/.cache/dflash-batch``."""
    env = os.environ.get("DFLASH_BATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dflash-batch"


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b/")``; the prefix is a folder (ends in '/')."""
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    prefix = prefix.strip("/")
    # The trailing '/' keeps gs://b/model from also matching gs://b/model-v2/...
    return bucket, (prefix + "/" if prefix else "")


def localize(uri: str, dest_root: Path | None = None) -> Path:
    """Copy every object under ``uri`` into a local folder and return that folder.

    The folder is ``dest_root/<hash of uri>`` (``dest_root`` defaults to
    ``cache_dir()/gcs``), so repeated calls reuse it: a file already there with the
    object's size is not downloaded again. Each file is written to a temporary name and
    renamed, so an interrupted copy never leaves a truncated file that looks complete.

    Raises FileNotFoundError naming ``uri`` when no object lies under it.
    """
    bucket_name, prefix = split_gs_uri(uri)
    canonical = f"gs://{bucket_name}/{prefix}"
    root = Path(dest_root) if dest_root is not None else cache_dir() / "gcs"
    dest = root / hashlib.sha256(canonical.encode()).hexdigest()[:16]

    client = _client()
    blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
    if not blobs:
        raise FileNotFoundError(f"no objects under {uri}")
    for blob in blobs:
        rel = blob.name[len(prefix) :]
        local = dest / rel
        # An object named 'p/../../x' must not write outside the cache folder.
        if ".." in Path(rel).parts or not local.resolve().is_relative_to(dest.resolve()):
            raise ValueError(f"object gs://{bucket_name}/{blob.name} escapes the local folder {dest}")
        if local.is_file() and local.stat().st_size == blob.size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.partial")
        try:
            blob.download_to_filename(str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def upload_dir(local_dir: str | Path, uri: str) -> list[str]:
    """Upload every file under ``local_dir`` to ``uri``, keeping relative paths.

    Returns the object names written. Raises NotADirectoryError for a missing folder and
    ValueError for an empty one, both naming it.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise NotADirectoryError(f"cannot upload {local_dir} to {uri}: not a folder")
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"cannot upload {local_dir} to {uri}: the folder has no files")
    bucket_name, prefix = split_gs_uri(uri)
    bucket = _client().bucket(bucket_name)
    names = []
    for path in files:
        name = prefix + path.relative_to(local_dir).as_posix()
        bucket.blob(name).upload_from_filename(str(path))
        names.append(name)
    return names


def _client() -> storage.Client:
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        # The client reads STORAGE_EMULATOR_HOST itself; the project only has to be non-empty.
        return storage.Client(credentials=AnonymousCredentials(), project="emulator")
    return storage.Client()
