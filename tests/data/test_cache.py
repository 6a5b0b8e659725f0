from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamModel, SamProcessor

from sam_hf import SamDataCollator, SamDiceCELoss, SamTransform, freeze_modules
from sam_hf.core.images import scale_coords
from sam_hf.data.cache import add_image_embeddings, read_embedding
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source


@pytest.fixture()
def small_folder(nuclei_dir, tmp_path):
    root = tmp_path / "nuclei"
    for sub in ("images", "instances"):
        (root / sub).mkdir(parents=True)
        for path in sorted((nuclei_dir / sub).iterdir())[:3]:
            shutil.copy(path, root / sub / path.name)
    return root


def _loss_and_grads(model, batch):
    model.zero_grad()
    key = "image_embeddings" if "image_embeddings" in batch else "pixel_values"
    out = model(**{key: batch[key]}, input_boxes=batch["input_boxes"], multimask_output=False)
    loss, _ = SamDiceCELoss()(out.pred_masks[:, :, 0], batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.mask_decoder.named_parameters() if p.grad is not None}


def test_cached_and_uncached_training_agree(tiny_model_dir, small_folder, tmp_path):
    model = SamModel.from_pretrained(tiny_model_dir)
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    ds = index_objects(load_source(str(small_folder))["train"])
    cached = add_image_embeddings(ds, model, processor.image_processor, dtype="float32", cache_dir=str(tmp_path))
    transform = SamTransform(processor, train=False, max_objects_per_image=8)
    plain_batch = SamDataCollator()([ds.with_transform(transform)[i] for i in range(3)])
    cached_batch = SamDataCollator()([cached.remove_columns("image").with_transform(transform)[i] for i in range(3)])
    assert "pixel_values" not in cached_batch and cached_batch["image_embeddings"].shape == (3, 64, 16, 16)
    for key in ("input_boxes", "labels", "original_sizes", "reshaped_input_sizes"):
        torch.testing.assert_close(plain_batch[key], cached_batch[key], msg=key)
    loss_a, grads_a = _loss_and_grads(model, plain_batch)
    loss_b, grads_b = _loss_and_grads(model, cached_batch)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def n_caches(folder) -> int:
    """Embedding caches are named by their 32-hex-digit fingerprint (datasets may add its own cache-*.arrow files)."""
    return sum(1 for p in folder.glob("*.arrow") if len(p.stem) == 32 and not p.stem.startswith("cache-"))


def test_stale_cache_is_never_used(tiny_model_dir, small_folder, tmp_path, caplog):
    model = SamModel.from_pretrained(tiny_model_dir)
    ip = SamProcessor.from_pretrained(tiny_model_dir).image_processor
    ds = index_objects(load_source(str(small_folder))["train"])
    cache = tmp_path / "cache"

    def build(dataset):
        out = add_image_embeddings(dataset, model, ip, cache_dir=str(cache))
        return np.stack([read_embedding(out[i]).numpy() for i in range(len(out))])

    first = build(ds)
    assert n_caches(cache) == 1
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        np.testing.assert_array_equal(build(ds), first)
    assert "reusing cached image embeddings" in caplog.text
    assert n_caches(cache) == 1

    with torch.no_grad():  # one weight of the encoder changes -> a new cache
        model.vision_encoder.neck.conv1.weight[0, 0, 0, 0] += 1.0
    changed_weight = build(ds)
    assert n_caches(cache) == 2
    assert not np.array_equal(changed_weight, first)

    image_path = sorted((small_folder / "images").iterdir())[0]  # one image changes, same file name -> a new cache
    pixels = np.asarray(Image.open(image_path).convert("RGB")).copy()
    pixels[:20, :20] = 255 - pixels[:20, :20]
    Image.fromarray(pixels).save(image_path)
    ds2 = index_objects(load_source(str(small_folder))["train"])
    changed_image = build(ds2)
    assert n_caches(cache) == 3
    assert not np.array_equal(changed_image[0], changed_weight[0])
    np.testing.assert_array_equal(changed_image[1:], changed_weight[1:])


def test_scale_coords_matches_processor(tiny_model_dir):
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    image = np.zeros((150, 420, 3), np.uint8)
    boxes = np.array([[10.0, 20.0, 200.0, 140.0], [0.0, 0.0, 419.0, 149.0]])
    enc = processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    reshaped = tuple(int(v) for v in enc["reshaped_input_sizes"][0])
    torch.testing.assert_close(scale_coords(boxes, (150, 420), reshaped), enc["input_boxes"][0].float())
    points = [[[30.0, 40.0], [419.0, 149.0]]]  # one prompt with two points
    enc = processor(images=image, input_points=[points], input_labels=[[[1, 0]]], return_tensors="pt")
    torch.testing.assert_close(scale_coords(points, (150, 420), reshaped), enc["input_points"][0].float())


def _cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


def _build_once(tiny_model_dir, small_folder, cache, **kwargs):
    model = SamModel.from_pretrained(tiny_model_dir)
    ip = SamProcessor.from_pretrained(tiny_model_dir).image_processor
    # A filtered split has an indices mapping, as after train_test_split: the case that used to copy the cache.
    ds = index_objects(load_source(str(small_folder))["train"]).filter(lambda n: n > 0, input_columns="num_objects")
    assert ds._indices is not None
    out = add_image_embeddings(ds, model, ip, cache_dir=str(cache), **kwargs)
    return out, np.stack([read_embedding(out[i]).numpy() for i in range(len(out))])


def test_cache_exists_once_on_disk(tiny_model_dir, small_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        out, _ = _build_once(tiny_model_dir, small_folder, cache)
    assert _cache_files(cache) == [f"{p.stem}.arrow" for p in cache.glob("*.arrow")]
    assert len(_cache_files(cache)) == 1
    # The dataset reads the one file memory-mapped; nothing else was written beside it.
    assert [Path(f["filename"]).parent for f in out.cache_files] == [cache]
    assert "GB needed" in caplog.text and "GB free" in caplog.text
    # Embeddings are stored as raw array bytes, so reading a row never builds nested Python lists.
    assert isinstance(out[0]["image_embeddings"], bytes)


def _row_offset(path, blob: bytes) -> int:
    data = path.read_bytes()
    offset = data.find(blob[1000:1200])
    assert offset > 0 and data.count(blob[1000:1200]) == 1
    return offset


@pytest.mark.parametrize("damage", ["nan_row", "swap_rows", "truncate", "empty", "overwrite"])
def test_damaged_cache_is_moved_aside_and_rebuilt(tiny_model_dir, small_folder, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    out, first = _build_once(tiny_model_dir, small_folder, cache)
    (path,) = cache.glob("*.arrow")
    size = path.stat().st_size
    if damage == "nan_row":  # 16 KiB of float16 NaN inside row 1's embedding
        offset = _row_offset(path, out[1]["image_embeddings"])
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(np.full(8192, np.nan, np.float16).tobytes())
    elif damage == "swap_rows":  # rows 0 and 1 exchange their embedding bytes, all else in place
        a, b = out[0]["image_embeddings"], out[1]["image_embeddings"]
        assert len(a) == len(b) and a != b
        data = path.read_bytes()
        start_a, start_b = data.find(a), data.find(b)
        data = bytearray(data)
        data[start_a : start_a + len(a)], data[start_b : start_b + len(b)] = b, a
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"not an arrow file at all" * 100)
    assert path.stat().st_size != size or damage in ("nan_row", "swap_rows")
    del out
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        _, rebuilt = _build_once(tiny_model_dir, small_folder, cache)
    assert f"Embedding cache {path} is damaged" in caplog.text
    np.testing.assert_array_equal(rebuilt, first)
    aside = [p for p in cache.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].name.startswith(path.name)
    assert path.is_file()


def test_damage_found_when_reading_stops_training(tiny_model_dir, small_folder, tmp_path, monkeypatch):
    import sam_hf.data.cache as cache_module
    from sam_hf.data.cache import quarantine_damaged

    monkeypatch.setattr(cache_module, "VERIFY_ON_OPEN_MAX_BYTES", 0)  # a large cache: checked per row, when read
    cache = tmp_path / "cache"
    out, _ = _build_once(tiny_model_dir, small_folder, cache)
    (path,) = cache.glob("*.arrow")
    offset = _row_offset(path, out[1]["image_embeddings"])  # opening checks only the first and last rows
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.full(64, np.nan, np.float16).tobytes())
    out, _ = None, None
    reopened = add_image_embeddings(
        index_objects(load_source(str(small_folder))["train"]),
        SamModel.from_pretrained(tiny_model_dir),
        SamProcessor.from_pretrained(tiny_model_dir).image_processor,
        cache_dir=str(cache),
    )
    train = reopened.remove_columns("image").with_transform(
        SamTransform(SamProcessor.from_pretrained(tiny_model_dir), train=True)
    )
    train[0], train[2]  # sound rows read fine
    with pytest.raises(cache_module.EmbeddingCacheError, match="fails its checksum"):
        train[1]
    message = quarantine_damaged(train)
    assert str(path) in message and "row 1 fails its checksum" in message and not path.exists()


def test_interrupted_build_leaves_no_temporary(tiny_model_dir, small_folder, tmp_path, monkeypatch):
    import sam_hf.data.cache as cache_module

    cache = tmp_path / "cache"
    cache.mkdir()
    # Left by a killed build of this machine and PID namespace (no such process).
    stale = cache / f"{'0' * 32}.arrow.incomplete-{cache_module._origin()}-{'0' * 32}-999999999"
    stale.write_bytes(b"partial")
    model = SamModel.from_pretrained(tiny_model_dir)
    calls = []

    def failing(pixel_values):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return SamModel.get_image_embeddings(model, pixel_values)

    monkeypatch.setattr(model, "get_image_embeddings", failing)
    ds = index_objects(load_source(str(small_folder))["train"])
    with pytest.raises(OSError, match="No space left"):
        add_image_embeddings(
            ds, model, SamProcessor.from_pretrained(tiny_model_dir).image_processor, cache_dir=str(cache)
        )
    assert _cache_files(cache) == []


def test_two_builders_with_the_same_pid_do_not_collide(tiny_model_dir, small_folder, tmp_path, monkeypatch, caplog):
    """Two containers share the cache directory and each runs its build as PID 1: the second build starts and
    finishes while the first one is writing. Neither writes the other's temporary, and the file published first stays
    (the first build's copy is discarded, not renamed over it)."""
    from datasets.arrow_writer import ArrowWriter

    cache = tmp_path / "cache"
    model = SamModel.from_pretrained(tiny_model_dir)
    ip = SamProcessor.from_pretrained(tiny_model_dir).image_processor
    ds = index_objects(load_source(str(small_folder))["train"])
    write_batch = ArrowWriter.write_batch
    second: dict = {}

    def first_batch_lets_the_second_build_run(self, *args, **kwargs):
        if not second:
            second["temporaries"] = _cache_files(cache)
            second["out"] = add_image_embeddings(ds, model, ip, cache_dir=str(cache))
            second["published"] = _cache_files(cache)
            second["inode"] = next(cache.glob("*.arrow")).stat().st_ino
        return write_batch(self, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write_batch", first_batch_lets_the_second_build_run)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        first = add_image_embeddings(ds, model, ip, cache_dir=str(cache))
    monkeypatch.undo()
    assert len(second["temporaries"]) == 1 and ".arrow.incomplete-" in second["temporaries"][0]
    (path,) = cache.glob("*.arrow")
    # While the first build was still writing, the second published its file and left the first one's temporary.
    assert second["published"] == sorted([path.name, second["temporaries"][0]])
    assert _cache_files(cache) == [path.name] and path.stat().st_ino == second["inode"]
    assert "another build published the embedding cache" in caplog.text
    embeddings = [np.stack([read_embedding(out[i]).numpy() for i in range(len(ds))]) for out in (first, second["out"])]
    np.testing.assert_array_equal(embeddings[0], embeddings[1])


def test_stale_temporaries_of_other_machines_are_left_alone(tiny_model_dir, small_folder, tmp_path):
    """A build removes the temporaries of dead builds of its own machine and PID namespace, never another machine's
    by its PID (PID 999999999 exists nowhere here, but may be alive there), unless unwritten for a week."""
    import sam_hf.data.cache as cache_module

    cache = tmp_path / "cache"
    cache.mkdir()
    prefix = f"{'0' * 32}.arrow.incomplete-"
    other_live = cache / f"{prefix}node-7-4026531836-{'a' * 32}-999999999"
    other_abandoned = cache / f"{prefix}node-7-4026531836-{'b' * 32}-999999998"
    ours_dead = cache / f"{prefix}{cache_module._origin()}-{'c' * 32}-999999999"
    ours_live = cache / f"{prefix}{cache_module._origin()}-{'d' * 32}-{os.getpid()}"
    for tmp in (other_live, other_abandoned, ours_dead, ours_live):
        tmp.write_bytes(b"partial")
    week_ago = time.time() - cache_module.STALE_TEMPORARY_SECONDS - 3600
    os.utime(other_abandoned, (week_ago, week_ago))
    _build_once(tiny_model_dir, small_folder, cache)
    assert other_live.exists() and ours_live.exists()
    assert not ours_dead.exists() and not other_abandoned.exists()


def test_cache_build_refuses_without_disk_space(tiny_model_dir, small_folder, tmp_path, monkeypatch):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr("sam_hf.data.cache.shutil.disk_usage", lambda p: usage._replace(free=1000))
    ds = index_objects(load_source(str(small_folder))["train"])
    with pytest.raises(OSError, match=r"Not enough disk space .* --embedding_cache_dir"):
        add_image_embeddings(
            ds,
            SamModel.from_pretrained(tiny_model_dir),
            SamProcessor.from_pretrained(tiny_model_dir).image_processor,
            cache_dir=str(tmp_path / "cache"),
        )
