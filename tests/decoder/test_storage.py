"""gs:// checkpoint folders: upload, localize, and their errors, against an in-memory emulator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gcs_emulator import DEFAULT_BUCKET, start_gcs_emulator  # tests/, on sys.path via conftest

from dflash_batch.decoder._registry import resolve_model_dir
from dflash_batch.decoder._storage import localize, split_gs_uri, upload_dir


BUCKET = DEFAULT_BUCKET


@pytest.fixture(scope="module")
def gcs_host():
    with start_gcs_emulator() as host:
        yield host


@pytest.fixture
def gcs(gcs_host, monkeypatch, tmp_path):
    """The emulator's URL, with the environment pointing at it and at a fresh cache."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
    # Any real credential lookup would now fail loudly instead of passing by luck.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    monkeypatch.setenv("DFLASH_BATCH_CACHE", str(tmp_path / "cache"))
    return gcs_host


def _make_folder(root: Path, seed: int) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}\n',
        "model.safetensors": os.urandom(70_000) + bytes([seed]),
        "sub/dir/notes.txt": f"seed {seed}\n".encode(),
        "empty.bin": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_localize_copies_exactly_the_uploaded_folder(gcs, tmp_path):
    files = _make_folder(tmp_path / "m1", seed=1)
    _make_folder(tmp_path / "m1-v2", seed=2)
    upload_dir(tmp_path / "m1", f"gs://{BUCKET}/models/m1")
    # A sibling whose name starts with the same prefix must not leak into m1's copy.
    upload_dir(tmp_path / "m1-v2", f"gs://{BUCKET}/models/m1-v2")

    local = localize(f"gs://{BUCKET}/models/m1", dest_root=tmp_path / "dest")

    assert local.parent == tmp_path / "dest"
    assert _read_tree(local) == files


def test_localize_reuses_same_size_files_and_refetches_others(gcs, tmp_path):
    files = _make_folder(tmp_path / "m", seed=3)
    uri = f"gs://{BUCKET}/reuse/m/"
    upload_dir(tmp_path / "m", uri)
    local = localize(uri, dest_root=tmp_path / "dest")
    same_size = b"X" * len(files["sub/dir/notes.txt"])
    (local / "sub/dir/notes.txt").write_bytes(same_size)
    (local / "config.json").write_bytes(b"truncated")

    again = localize(uri.rstrip("/"), dest_root=tmp_path / "dest")  # same folder either way

    assert again == local
    assert (local / "sub/dir/notes.txt").read_bytes() == same_size  # skipped: same size
    assert (local / "config.json").read_bytes() == files["config.json"]  # size differed
    assert not [p for p in local.rglob("*.partial")]


def test_localize_of_missing_prefix_names_the_uri(gcs, tmp_path):
    uri = f"gs://{BUCKET}/no/such/model"
    with pytest.raises(FileNotFoundError, match=f"no objects under {uri}"):
        localize(uri, dest_root=tmp_path / "dest")


def test_resolve_model_dir_localizes_a_gs_checkpoint(gcs, tmp_path):
    files = _make_folder(tmp_path / "ckpt", seed=4)
    upload_dir(tmp_path / "ckpt", f"gs://{BUCKET}/ckpt")

    local = resolve_model_dir(f"gs://{BUCKET}/ckpt")

    assert local.is_relative_to(tmp_path / "cache")
    assert _read_tree(local) == files


def test_resolve_model_dir_rejects_a_gs_folder_without_config(gcs, tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"x")
    upload_dir(tmp_path / "w", f"gs://{BUCKET}/weights-only")
    with pytest.raises(ValueError, match="gs://test-bucket/weights-only.*config.json"):
        resolve_model_dir(f"gs://{BUCKET}/weights-only")


@pytest.mark.parametrize("uri", ["s3://b/p", "gs://", "gs:///p"])
def test_split_gs_uri_rejects_non_gs_uris(uri):
    with pytest.raises(ValueError, match="gs://|bucket"):
        split_gs_uri(uri)


def test_split_gs_uri_treats_the_prefix_as_a_folder():
    assert split_gs_uri("gs://b/a/c") == ("b", "a/c/")
    assert split_gs_uri("gs://b/a/c/") == ("b", "a/c/")
    assert split_gs_uri("gs://b") == ("b", "")


def test_upload_dir_of_missing_folder_names_it(tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        upload_dir(tmp_path / "nope", f"gs://{BUCKET}/x")
