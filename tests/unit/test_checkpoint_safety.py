"""Damaged checkpoints are errors that name the file; `latest` falls back, never silently."""

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

from megatron_paci.checkpoint.format import (
    CheckpointError,
    checkpoint_dir,
    load_checkpoint,
    load_latest,
    read_meta,
    resolve_loadable,
    save_checkpoint,
    verify_checkpoint,
    wait_for_pending_save,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def state(seed, rows=64):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(rows, 32, generator=g), "b": torch.randn(32, generator=g)},
            "optimizer": {"w.step": torch.tensor(float(seed))}}


def zeros_like(s):
    return {k: zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in s.items()}


def equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def crc(path):
    with open(path, "rb") as f:
        return f"{zlib.crc32(f.read()):08x}"


@pytest.fixture
def two(tmp_path):
    """Checkpoints at iterations 10 and 20 (different contents)."""
    root = str(tmp_path / "checkpoints")
    save_checkpoint(root, 10, state(10), {"consumed_samples": 80}, "a: 1\n")
    save_checkpoint(root, 20, state(20), {"consumed_samples": 160}, "a: 1\n")
    return root, checkpoint_dir(root, 10), checkpoint_dir(root, 20)


def shard(path):
    return os.path.join(path, "__0_0.distcp")


def test_manifest_lists_every_file_with_its_size_and_crc32(two):
    _, _, new = two
    manifest = json.load(open(os.path.join(new, "manifest.json")))
    assert manifest["checksum"] == "crc32"
    names = sorted(n for n in os.listdir(new) if n != "manifest.json")
    assert sorted(manifest["files"]) == names == [".metadata", "__0_0.distcp", "config.yaml",
                                                  "meta.json"]
    for name, entry in manifest["files"].items():
        file = os.path.join(new, name)
        assert entry == {"size": os.path.getsize(file), "crc32": crc(file)}


def test_flipped_byte_in_a_shard_names_the_file_and_checksums(two):
    _, _, new = two
    before = crc(shard(new))
    with open(shard(new), "r+b") as f:
        f.seek(os.path.getsize(shard(new)) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(new, zeros_like(state(20)))
    msg = str(e.value)
    assert shard(new) in msg and f"expected {before}" in msg and f"crc32 {crc(shard(new))}" in msg


def test_truncated_shard_names_the_file_and_sizes(two):
    _, _, new = two
    size = os.path.getsize(shard(new))
    with open(shard(new), "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated|bytes, expected") as e:
        load_checkpoint(new, zeros_like(state(20)))
    assert shard(new) in str(e.value) and str(size - 100) in str(e.value)


def test_missing_shard(two):
    _, _, new = two
    os.remove(shard(new))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_checkpoint(new, zeros_like(state(20)))
    assert shard(new) in str(e.value)


def test_corrupt_meta_json_names_it(two):
    _, _, new = two
    meta = os.path.join(new, "meta.json")
    with open(meta, "w") as f:
        f.write('{"iteration": 20,')
    for call in (lambda: load_checkpoint(new, zeros_like(state(20))), lambda: read_meta(new)):
        with pytest.raises(CheckpointError, match="not valid JSON") as e:
            call()
        assert meta in str(e.value)


def test_meta_json_missing_a_key_names_the_key(two):
    _, _, new = two
    meta = os.path.join(new, "meta.json")
    with open(meta, "w") as f:
        json.dump({"format_version": 1}, f)
    with pytest.raises(CheckpointError, match=r"meta.json: missing key 'iteration'"):
        verify_checkpoint(new)


def test_missing_or_truncated_dcp_metadata(two):
    _, old, new = two
    os.remove(os.path.join(new, ".metadata"))
    with pytest.raises(CheckpointError, match="missing") as e:
        verify_checkpoint(new)
    assert os.path.join(new, ".metadata") in str(e.value)
    md = os.path.join(old, ".metadata")
    data = open(md, "rb").read()
    with open(md, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable DCP index") as e:
        verify_checkpoint(old)
    assert md in str(e.value)


def test_checkpoint_without_manifest_loads_with_one_warning(two):
    _, _, new = two
    os.remove(os.path.join(new, "manifest.json"))
    warnings = []
    dst = zeros_like(state(20))
    meta = load_checkpoint(new, dst, on_warning=warnings.append)
    assert equal(dst, state(20)) and meta["iteration"] == 20
    assert len(warnings) == 1 and "manifest.json" in warnings[0] and new in warnings[0]


def test_checkpoint_without_manifest_still_catches_a_truncated_shard(two):
    _, _, new = two
    os.remove(os.path.join(new, "manifest.json"))
    with open(shard(new), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_checkpoint(new, zeros_like(state(20)), on_warning=lambda m: None)
    assert shard(new) in str(e.value)


def test_fallback_to_the_previous_checkpoint_names_both(two):
    root, old, new = two
    with open(shard(new), "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff")
    warnings = []
    assert resolve_loadable(root, warnings.append) == old
    assert len(warnings) == 1 and new in warnings[0] and old in warnings[0]
    assert shard(new) in warnings[0]
    dst = zeros_like(state(10))
    assert load_checkpoint(old, dst)["iteration"] == 10 and equal(dst, state(10))


def test_fallback_over_a_newer_directory_without_meta_json(two):
    root, old, new = two
    os.remove(os.path.join(new, "meta.json"))
    warnings = []
    assert resolve_loadable(root, warnings.append) == old
    assert "meta.json: missing" in warnings[0] and old in warnings[0]


def test_every_checkpoint_damaged_is_an_error_listing_them(two):
    root, old, new = two
    for path in (old, new):
        os.remove(shard(path))
    with pytest.raises(CheckpointError, match="no usable checkpoint") as e:
        resolve_loadable(root, lambda m: None)
    assert shard(old) in str(e.value) and shard(new) in str(e.value)


def test_no_checkpoint_at_all_is_none(tmp_path):
    os.makedirs(tmp_path / "iter_0000005.partial")
    assert resolve_loadable(str(tmp_path)) is None
    assert load_latest(str(tmp_path / "absent"), {}) is None


def test_load_latest_falls_back_when_the_newest_does_not_fit(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 1, state(1), {}, "")
    save_checkpoint(root, 2, state(2, rows=80), {}, "")  # verifies, but another shape
    warnings = []
    dst = zeros_like(state(0))
    path, meta = load_latest(root, dst, warnings.append)
    assert path == checkpoint_dir(root, 1) and meta["iteration"] == 1 and equal(dst, state(1))
    assert checkpoint_dir(root, 2) in warnings[0] and "could not load" in warnings[0]


def test_keep_last_leaves_no_half_deleted_directory(tmp_path):
    for it in (1, 2, 3):
        save_checkpoint(str(tmp_path), it, state(it), {}, "", keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]


# --- asynchronous save -------------------------------------------------------------


def test_async_save_is_bit_identical_to_a_sync_save(tmp_path):
    src = state(3, rows=512)
    ref = zeros_like(src)
    for k in src:
        for n in src[k]:
            ref[k][n].copy_(src[k][n])
    sync = save_checkpoint(str(tmp_path / "sync"), 4, src, {"consumed_samples": 7}, "x: 1\n")
    path = save_checkpoint(str(tmp_path / "async"), 4, src, {"consumed_samples": 7}, "x: 1\n",
                           async_save=True)
    for t in (src["model"]["w"], src["model"]["b"]):  # training goes on right away
        t.add_(1.0)
    assert wait_for_pending_save() == path
    a, b = zeros_like(src), zeros_like(src)
    assert load_checkpoint(sync, a) == load_checkpoint(path, b)
    assert equal(a, ref) and equal(b, ref)
    files = json.load(open(os.path.join(path, "manifest.json")))["files"]
    assert files["__0_0.distcp"] == json.load(open(os.path.join(sync, "manifest.json")))[
        "files"]["__0_0.distcp"]


def test_next_save_waits_for_the_one_in_flight(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 1, state(1), {}, "", async_save=True, keep_last=1)
    assert not os.path.exists(checkpoint_dir(root, 1))  # still in flight (not renamed)
    save_checkpoint(root, 2, state(2), {}, "", async_save=True, keep_last=1)
    assert os.path.isfile(os.path.join(checkpoint_dir(root, 1), "manifest.json"))
    wait_for_pending_save()
    assert sorted(os.listdir(root)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert wait_for_pending_save() is None


def test_process_exit_completes_the_async_save(tmp_path):
    """A process that never waits still leaves the final checkpoint in place."""
    code = ("import torch\n"
            "from megatron_paci.checkpoint.format import save_checkpoint\n"
            f"save_checkpoint({str(tmp_path)!r}, 9, {{'w': torch.arange(1000000.0)}}, {{}}, '',"
            " async_save=True)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    path = checkpoint_dir(str(tmp_path), 9)
    dst = {"w": torch.zeros(1000000)}
    load_checkpoint(path, dst)
    assert torch.equal(dst["w"], torch.arange(1000000.0))
