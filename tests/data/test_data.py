from __future__ import annotations

import io
import logging

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sam_hf import (
    SamTransform,
    boxes_from_instances,
    jitter_boxes,
    load_source,
    mask_to_instances,
    tiny_sam_config,
    tiny_sam_processor,
)
from sam_hf.core.images import resized_shape, to_rgb_array
from sam_hf.data.collator import SamDataCollator
from sam_hf.data.indexing import index_objects, prepare_split
from sam_hf.data.sources import load_image_folder
from sam_hf.data.transforms import resize_and_pad_masks


def test_boxes_match_hand_computed():
    inst = np.zeros((10, 12), np.int32)
    inst[2:5, 3:7] = 1  # rows 2..4, cols 3..6
    inst[6, 0] = 2  # a single pixel
    inst[7:10, 9:12] = 3
    expected = np.array([[3, 2, 6, 4], [0, 6, 0, 6], [9, 7, 11, 9]], np.float32)
    np.testing.assert_array_equal(boxes_from_instances(inst), expected)


def test_mask_types():
    binary = np.zeros((8, 8), np.uint8)
    binary[0:2, 0:2] = 255
    binary[5:8, 5:8] = 255
    assert mask_to_instances(binary, "binary").max() == 2
    assert mask_to_instances(binary, "auto").max() == 2  # one non-zero value -> connected components
    # instance ids need not be contiguous; 300 does not fit in 8 bits
    inst = np.zeros((8, 8), np.uint16)
    inst[0:2, 0:2] = 5
    inst[0:2, 3:5] = 300
    out = mask_to_instances(inst, "instance")
    assert sorted(np.unique(out)) == [0, 1, 2] and out[0, 0] == 1 and out[0, 3] == 2
    # touching instances stay apart with "instance", merge with "binary"
    touching = np.zeros((4, 4), np.uint8)
    touching[:, :2], touching[:, 2:] = 1, 2
    assert mask_to_instances(touching, "instance").max() == 2
    assert mask_to_instances(touching, "binary").max() == 1
    # semantic: class 1 has two components, class 2 one -> three objects
    sem = np.zeros((8, 8), np.uint8)
    sem[0:2, 0:2] = 1
    sem[6:8, 6:8] = 1
    sem[0:2, 5:8] = 2
    assert mask_to_instances(sem, "semantic").max() == 3
    with pytest.raises(ValueError, match="mask_type"):
        mask_to_instances(sem, "panoptic")


def test_jitter_stays_within_bounds():
    rng = np.random.default_rng(0)
    boxes = np.array([[50, 60, 80, 90], [0, 0, 5, 5], [190, 90, 199, 99]], np.float32)
    shifts = []
    for _ in range(200):
        j = jitter_boxes(boxes, 20, (100, 200), rng)
        delta = (j - boxes) * np.array([-1, -1, 1, 1])  # outward shift per side
        assert (delta >= -1e-4).all(), "jitter must only move sides outward"
        assert (delta <= 20 + 1e-4).all(), "jitter must not move a side more than box_jitter"
        assert (j[:, [0, 1]] >= 0).all() and (j[:, 2] <= 199).all() and (j[:, 3] <= 99).all()
        shifts.append(delta[0])
    shifts = np.array(shifts)
    assert shifts.max() > 15 and shifts.min() < 5  # the whole range is used for an unclipped box
    assert np.array_equal(jitter_boxes(boxes, 0, (100, 200), rng), boxes)


def test_labels_resized_and_padded_like_the_image():
    """A non-square image: labels must sit where the processor puts the image, not stretched to the square."""
    config = tiny_sam_config()  # 256 input, 64 x 64 low-res masks
    processor = tiny_sam_processor(config)
    h, w = 100, 200
    image = np.zeros((h, w, 3), np.uint8)
    inst = np.zeros((h, w), np.uint16)
    image[20:40, 50:100] = 255
    inst[20:40, 50:100] = 1
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(image)], "label": [Image.fromarray(inst)]})
    ds = index_objects(ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image()))
    ex = ds.with_transform(SamTransform(processor, train=False))[0]
    label = ex["labels"][0].numpy()
    assert label.shape == (64, 64)
    # Worked out by hand: scale 64 / 200 = 0.32, so the image occupies rows 0..32 and the object rows
    # 20 * 0.32 = 6.4 .. 40 * 0.32 = 12.8 and columns 50 * 0.32 = 16 .. 100 * 0.32 = 32.
    assert np.allclose(label[8:12, 17:31], 1.0, atol=1e-4)
    assert label[:6].max() == 0 and label[14:].max() == 0
    assert label[:, :15].max() == 0 and label[:, 33:].max() == 0
    assert abs(label.sum() - 6.4 * 16) < 3.0  # area is preserved by area-style resampling
    # A stretched label (the common bug) would put the object at rows 12.8 .. 25.6 instead.
    # The image goes through the same geometry: input scale 256 / 200 = 1.28, bright rows 25.6 .. 51.2.
    bright = ex["pixel_values"].numpy().mean(0) > 0
    rows, cols = np.nonzero(bright)
    assert (rows.min(), rows.max()) == (26, 50) and (cols.min(), cols.max()) == (64, 127)
    # And the processor's own (nearest-neighbour) resize of the same mask agrees on the object.
    ref = processor.image_processor(images=image, segmentation_maps=(inst > 0).astype(np.uint8), return_tensors="np")[
        "labels"
    ][0]
    assert ref.shape == (64, 64)
    agreement = ((label > 0.5) == (ref > 0)).mean()
    assert agreement > 0.99
    # Boxes are scaled by the same factor: x 50 -> 64, y 20 -> 25.6
    np.testing.assert_allclose(ex["input_boxes"][0].numpy(), [50 * 1.28, 20 * 1.28, 99 * 1.28, 39 * 1.28], atol=0.01)


def test_resize_and_pad_masks_square_and_tall():
    masks = torch.zeros(1, 80, 40, dtype=torch.bool)
    masks[0, :, :] = True
    out = resize_and_pad_masks(masks, 64, 64)
    # tall image: 64 rows, 32 columns, padding on the right
    assert out[0, :, :32].min() > 0.999 and out[0, :, 32:].max() == 0


def test_image_conversions():
    gray16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    rgb = to_rgb_array(Image.fromarray(gray16))
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8 and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 1] = 7
    assert to_rgb_array(Image.fromarray(rgba)).shape == (3, 4, 3)
    assert to_rgb_array(Image.fromarray(rgba))[0, 0, 1] == 7
    assert to_rgb_array(np.full((5, 6), 9, np.uint8)).shape == (5, 6, 3)


def test_nuclei_folder_objects_match_manifest(nuclei_dir):
    import csv

    rows = list(csv.DictReader(open(nuclei_dir / "manifest.csv")))
    ds = index_objects(load_source(str(nuclei_dir))["train"])
    assert len(ds) == len(rows) == 32
    assert sum(ds["num_objects"]) == sum(int(r["n_instances"]) for r in rows) == 1417


def test_train_transform_samples_and_collates(nuclei_dir, tiny_model_dir):
    from transformers import SamProcessor

    processor = SamProcessor.from_pretrained(tiny_model_dir)
    ds = index_objects(load_source(str(nuclei_dir))["train"].select(range(3)))
    train = ds.with_transform(SamTransform(processor, train=True, box_jitter=5, max_objects_per_image=4, seed=1))
    batch = SamDataCollator()([train[0], train[1], train[2]])
    assert batch["pixel_values"].shape == (3, 3, 256, 256)
    assert batch["input_boxes"].shape == (3, 4, 4) and batch["labels"].shape == (3, 4, 64, 64)
    counts = [min(4, n) for n in ds["num_objects"]]
    for i, n in enumerate(counts):
        assert ((batch["labels"][i, :n] >= 0) & (batch["labels"][i, :n] <= 1)).all()
        assert (batch["labels"][i, n:] == -100).all() and (batch["input_boxes"][i, n:] == 0).all()
    # Prompt randomness is keyed by (seed, epoch, row): repeatable within an epoch, fresh in the next one.
    torch.testing.assert_close(train[0]["input_boxes"], train[0]["input_boxes"], rtol=0, atol=0)
    transform = train.format["format_kwargs"]["transform"]
    epoch0 = [train[i]["input_boxes"] for i in range(3)]
    transform.set_epoch(1)
    assert not any(torch.equal(a, train[i]["input_boxes"]) for i, a in enumerate(epoch0))
    transform.set_epoch(0)
    assert all(torch.equal(a, train[i]["input_boxes"]) for i, a in enumerate(epoch0))


def test_prompt_draws_do_not_depend_on_dataloader_workers(nuclei_dir, tiny_model_dir):
    from transformers import SamProcessor

    processor = SamProcessor.from_pretrained(tiny_model_dir)
    ds = index_objects(load_source(str(nuclei_dir))["train"].select(range(4)))
    train = ds.with_transform(SamTransform(processor, train=True, box_jitter=5, max_objects_per_image=3, seed=7))

    def boxes(num_workers):
        loader = torch.utils.data.DataLoader(
            train, batch_size=2, num_workers=num_workers, collate_fn=SamDataCollator(), shuffle=False
        )
        return torch.cat([batch["input_boxes"] for batch in loader])

    in_process = boxes(0)
    torch.testing.assert_close(boxes(2), in_process, rtol=0, atol=0)
    # A different seed draws different prompts.
    train.format["format_kwargs"]["transform"].seed = 8
    assert not torch.equal(boxes(0), in_process)


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_errors_name_the_file(tmp_path):
    root = tmp_path / "d"
    _write(root / "images" / "a.png", np.zeros((10, 10, 3), np.uint8))
    _write(root / "masks" / "a.png", np.zeros((12, 10), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png.*10x10.*12"):
        load_image_folder(root)
    _write(root / "masks" / "a.png", np.zeros((10, 10), np.uint8))
    _write(root / "masks" / "b.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"b\.png has no image"):
        load_image_folder(root)
    (root / "masks" / "b.png").unlink()
    (root / "images" / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"Cannot read image file .*a\.png"):
        load_image_folder(root)
    _write(root / "images" / "a.png", np.random.default_rng(0).integers(0, 255, (10, 10, 3), np.uint8))
    data = (root / "images" / "a.png").read_bytes()
    (root / "images" / "a.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"Cannot read image file .*a\.png"):
        load_image_folder(root)


def test_empty_after_filtering_and_skips_are_logged(tmp_path, caplog):
    root = tmp_path / "d"
    for stem, value in (("a", 0), ("b", 0), ("c", 255)):
        _write(root / "images" / f"{stem}.png", np.zeros((8, 8, 3), np.uint8))
        m = np.zeros((8, 8), np.uint8)
        m[2:4, 2:4] = value
        _write(root / "masks" / f"{stem}.png", m)
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        kept = index_objects(load_image_folder(root))
    assert len(kept) == 1
    assert "skipped 2 of 3" in caplog.text
    (root / "masks" / "c.png").unlink()
    _write(root / "masks" / "c.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="empty after dropping"):
        index_objects(load_image_folder(root))


def test_missing_column_and_mismatched_row(tmp_path):
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    ds = datasets.Dataset.from_dict({"image": [img], "mask": [Image.fromarray(np.ones((8, 9), np.uint8))]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="--mask_column 'label' is not a column.*image, mask"):
        load_source(str(tmp_path / "saved"))
    loaded = load_source(str(tmp_path / "saved"), mask_column="mask")["train"]
    with pytest.raises(ValueError, match="row 0 of split 'train'.*8x8.*8x9"):
        index_objects(loaded)


def test_saved_dataset_dict_uses_its_eval_split_and_seeded_carving(tmp_path):
    from sam_hf.data.sources import split_source

    def part(n, offset):
        imgs, masks = [], []
        for i in range(n):
            m = np.zeros((16, 16), np.uint8)
            m[2 : 4 + i % 5, 3:9] = 255
            imgs.append(Image.fromarray(np.full((16, 16, 3), offset + i, np.uint8)))
            masks.append(Image.fromarray(m))
        ds = datasets.Dataset.from_dict({"image": imgs, "label": masks})
        return ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())

    datasets.DatasetDict({"train": part(6, 0), "validation": part(2, 100)}).save_to_disk(str(tmp_path / "dd"))
    train, evaluation = split_source(load_source(str(tmp_path / "dd")))
    assert len(train) == 6 and len(evaluation) == 2
    assert np.asarray(evaluation[0]["image"])[0, 0, 0] == 100  # the saved validation split, not a carved one
    only_train = datasets.DatasetDict({"train": part(10, 0)})
    a_train, a_eval = split_source(only_train, validation_split_percentage=20, seed=3)
    b_train, b_eval = split_source(only_train, validation_split_percentage=20, seed=3)
    assert len(a_eval) == 2 and len(a_train) == 8
    assert [np.asarray(x)[0, 0, 0] for x in a_eval["image"]] == [np.asarray(x)[0, 0, 0] for x in b_eval["image"]]
    with pytest.raises(ValueError, match="--train_split 'training' is not a split"):
        split_source(only_train, train_split="training")


def test_areas_and_fill_the_box_baseline_by_hand():
    from sam_hf.training.report import box_baseline_dice

    inst = np.zeros((10, 10), np.uint16)
    inst[0:4, 0:4] = 1  # a full 4x4 square: its box is itself, Dice 1
    inst[6:8, 5:9] = 2  # rows 6..7, columns 5..8: a 2x4 box
    inst[7, 8] = 0  # one corner pixel off: area 7 in an 8-pixel box -> Dice 2 * 7 / (7 + 8)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.zeros((10, 10, 3), np.uint8))], "label": [Image.fromarray(inst)]}
    )
    ds = index_objects(ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image()))
    assert ds[0]["areas"] == [16, 7]
    assert box_baseline_dice(ds) == pytest.approx((1.0 + 14 / 15) / 2)


def test_point_prompts_lie_inside_their_objects(nuclei_dir, tiny_model_dir):
    from transformers import SamProcessor

    from sam_hf.data.collator import SamDataCollator

    processor = SamProcessor.from_pretrained(tiny_model_dir)
    ds = index_objects(load_source(str(nuclei_dir))["train"].select(range(2)))
    transform = SamTransform(processor, train=True, max_objects_per_image=5, point_prompts=True, seed=3)
    batch = transform(ds[:2])
    for row in range(2):
        inst = mask_to_instances(ds[row]["label"])
        h, w = inst.shape
        rh, rw = (int(v) for v in batch["reshaped_input_sizes"][row])
        pts = batch["input_points"][row][:, 0].numpy() * np.array([w / rw, h / rh])
        boxes = batch["input_boxes"][row].numpy() * np.array([w / rw, h / rh, w / rw, h / rh])
        for (x, y), box in zip(pts, boxes):
            x, y = int(round(x)), int(round(y))
            obj = inst[y, x]
            assert obj > 0, "a point prompt fell on background"
            x0, y0, x1, y1 = box  # the same object's (unjittered) box contains the point
            assert x0 - 1e-3 <= x <= x1 + 1e-3 and y0 - 1e-3 <= y <= y1 + 1e-3
        assert batch["input_labels"][row].tolist() == [[1]] * len(pts)
    collated = SamDataCollator()([{k: v[i] for k, v in batch.items()} for i in range(2)])
    assert collated["input_points"].shape == (2, 5, 1, 2) and collated["input_labels"].shape == (2, 5, 1)


def test_background_points_and_point_only_rows(nuclei_dir, tiny_model_dir):
    from transformers import SamProcessor

    from sam_hf.data.collator import SamDataCollator
    from sam_hf.data.windows import crop_objects

    processor = SamProcessor.from_pretrained(tiny_model_dir)
    source = load_source(str(nuclei_dir))["train"].select(range(2))

    def to_pixels(batch, row, xy):
        h, w = (int(v) for v in batch["original_sizes"][row])
        rh, rw = (int(v) for v in batch["reshaped_input_sizes"][row])
        return xy * np.array([w / rw, h / rh])

    # Whole images: the point comes from the pixels of no object in the label.
    ds = index_objects(source)
    transform = SamTransform(processor, train=True, point_prompts=True, background_points=True, seed=1)
    batch = transform(ds[:2])
    for row in range(2):
        inst = mask_to_instances(ds[row]["label"])
        x, y = np.round(to_pixels(batch, row, batch["background_points"][row][0, 0].numpy())).astype(int)
        assert inst[y, x] == 0 and batch["background_labels"][row].tolist() == [[1]]
    assert "point_only" not in batch and "point_labels" not in batch
    # Not asked for, or not training: no background point.
    assert "background_points" not in SamTransform(processor, train=True, point_prompts=True)(ds[:1])
    assert "background_points" not in SamTransform(processor, train=False, background_points=True)(ds[:1])

    # Object crops: the point is one of the row's listed background pixels; point-only rows have no box target.
    crops = index_objects(crop_objects(source, 6, point_scale=12, point_every=3), "instance")
    rows = crops[:]
    batch = SamTransform(
        processor, train=True, point_prompts=True, background_points=True, mask_type="instance", seed=1
    )(rows)
    exact = SamTransform(processor, train=False, mask_type="instance")(rows)
    assert any(rows["point_only"]) and not all(rows["point_only"])
    for row, point_only in enumerate(rows["point_only"]):
        xy = to_pixels(batch, row, batch["background_points"][row][0, 0].numpy())
        assert any(np.allclose(xy, p, atol=1e-3) for p in rows["background_points"][row])
        assert batch["point_only"][row].item() == point_only
        torch.testing.assert_close(batch["point_labels"][row], exact["labels"][row])
        if point_only:
            assert (batch["labels"][row] == -100).all()
        else:
            torch.testing.assert_close(batch["labels"][row], exact["labels"][row])
    collated = SamDataCollator()([{k: v[i] for k, v in batch.items()} for i in range(len(rows["point_only"]))])
    n = len(rows["point_only"])
    assert collated["background_points"].shape == (n, 1, 1, 2) and collated["background_labels"].shape == (n, 1, 1)
    assert collated["point_only"].tolist() == rows["point_only"]
    torch.testing.assert_close(collated["point_labels"][:, :1], torch.stack(exact["labels"]))


def test_an_image_without_background_gets_no_background_point(tiny_model_dir):
    from transformers import SamProcessor

    inst = np.ones((12, 12), np.uint16)
    inst[:, 6:] = 2
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.zeros((12, 12, 3), np.uint8))], "label": [Image.fromarray(inst)]}
    )
    ds = index_objects(ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image()), "instance")
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    batch = SamTransform(processor, train=True, point_prompts=True, background_points=True, mask_type="instance")(
        ds[:1]
    )
    assert batch["background_labels"][0].tolist() == [[-10]]


@pytest.mark.parametrize("shape", [(256, 256), (383, 512), (512, 243), (40, 30), (7, 300), (64, 64)])
def test_object_labels_equal_full_frame_resize(shape):
    from scipy import ndimage

    from sam_hf.core.masks import boxes_from_instances
    from sam_hf.data.transforms import object_labels

    rng = np.random.default_rng(sum(shape))
    blobs = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    instances = ndimage.label(blobs)[0].astype(np.int32)
    assert instances.max() > 0
    boxes = boxes_from_instances(instances)
    ids = np.arange(1, len(boxes) + 1)
    for longest_edge, pad in ((64, 64), (256, 256), (48, 64)):
        full = resize_and_pad_masks(torch.from_numpy(instances)[None] == torch.from_numpy(ids)[:, None, None],
                                    longest_edge, pad)  # fmt: skip
        fast = object_labels(instances, boxes, ids, resized_shape(*shape, longest_edge), pad)
        torch.testing.assert_close(fast, full, rtol=0, atol=2e-6)
    # SAM 2-style geometry: the whole image stretched over the square mask frame, no padding.
    masks = (torch.from_numpy(instances)[None] == torch.from_numpy(ids)[:, None, None]).float()[:, None]
    stretched = F.interpolate(masks, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    torch.testing.assert_close(
        object_labels(instances, boxes, ids, (48, 48), 48), stretched.clamp(0, 1), rtol=0, atol=2e-6
    )
    # A subset of objects, in another order, gives the matching subset of labels.
    pick = ids[::-1][: max(1, len(ids) // 3)]
    torch.testing.assert_close(
        object_labels(instances, boxes[pick - 1], pick, resized_shape(*shape, 64), 64),
        object_labels(instances, boxes, ids, resized_shape(*shape, 64), 64)[pick - 1],
        rtol=0,
        atol=0,
    )


def test_transform_reads_a_4_pixel_high_image_channels_last():
    """The uncached transform tells the processor the channels come last: a 4x64 image stays 4x64."""
    processor = tiny_sam_processor(tiny_sam_config())
    image = np.zeros((4, 64, 3), np.uint8)
    image[:, 32:] = 255  # right half bright
    inst = np.zeros((4, 64), np.uint8)
    inst[1:3, 40:50] = 1
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(image)], "label": [Image.fromarray(inst)]})
    ds = index_objects(ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image()))
    ex = ds.with_transform(SamTransform(processor, train=False))[0]
    assert ex["original_sizes"].tolist() == [4, 64]
    assert ex["reshaped_input_sizes"].tolist() == [16, 256]  # scale 256 / 64 = 4
    # x 40..49 scaled by 4, y 1..2 scaled by 4
    np.testing.assert_allclose(ex["input_boxes"][0].numpy(), [160, 4, 196, 8])
    bright = ex["pixel_values"].numpy().mean(0) > 0
    rows, cols = np.nonzero(bright)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 15, 128, 255)


def _blobs_mask(h=32, w=32):
    m = np.zeros((h, w), np.uint8)
    m[4:12, 4:14] = 1
    m[16:28, 10:20] = 2
    m[20:30, 22:30] = 3
    return m


def test_jpeg_masks_are_refused_by_content_not_extension(tmp_path):
    root = tmp_path / "d"
    _write(root / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    _write(root / "masks" / "a.png", _blobs_mask() * 80)
    assert len(load_image_folder(root)) == 1
    # The same mask as JPEG: what it would have become (many more "objects" than the 3 drawn) ...
    Image.fromarray(_blobs_mask() * 80).save(root / "masks" / "a.png", format="JPEG", quality=75)
    with Image.open(root / "masks" / "a.png") as im:
        assert im.format == "JPEG" and mask_to_instances(np.asarray(im), "instance").max() > 3
    # ... is refused, although the file is called .png, and so is a .jpg.
    message = r"a\.png is stored as JPEG: masks must be stored losslessly \(PNG/TIFF\), JPEG compression creates"
    with pytest.raises(ValueError, match=message):
        load_image_folder(root)
    (root / "masks" / "a.png").rename(root / "masks" / "a.jpg")
    with pytest.raises(ValueError, match=r"a\.jpg is stored as JPEG.*false objects"):
        load_image_folder(root)


def test_jpeg_masks_of_a_saved_dataset_are_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_blobs_mask() * 80).save(buffer, format="JPEG")
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(np.zeros((32, 32, 3), np.uint8)), "path": None}] * 2,
            "label": [{"bytes": _png_bytes(_blobs_mask()), "path": None}, {"bytes": buffer.getvalue(), "path": None}],
        }
    )
    ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    loaded = load_source(str(tmp_path / "saved"))["train"]
    with pytest.raises(ValueError, match=r"row 1 of split 'train'.*JPEG.*stored losslessly \(PNG/TIFF\)"):
        index_objects(loaded)
    assert mask_to_instances(loaded[0]["label"]).max() == 3  # the PNG row is fine
    with pytest.raises(ValueError, match="JPEG compression creates false objects"):
        mask_to_instances(loaded[1]["label"])


def _png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_files_sharing_a_stem_are_refused(tmp_path):
    root = tmp_path / "d"
    _write(root / "images" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _write(root / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    _write(root / "images" / "a.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r"images has 1 file stem\(s\) shared by several image files \(a\.jpg, a\.png\)"
    ):
        load_image_folder(root)
    (root / "images" / "a.jpg").unlink()
    _write(root / "masks" / "a.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"masks has 1 file stem.*\(a\.png, a\.tif\)"):
        load_image_folder(root)


def test_decompression_bomb_names_the_file_and_the_way_out(tmp_path, monkeypatch, caplog):
    root = tmp_path / "d"
    _write(root / "images" / "big.png", np.zeros((10, 10, 3), np.uint8))
    _write(root / "masks" / "big.png", np.zeros((10, 10), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 100 pixels > 2 x 40: Pillow raises
    with pytest.raises(
        ValueError,
        match=r"Image file .*images/big\.png is larger than .*MAX_IMAGE_PIXELS = 40 .*"
        r"raise the limit",
    ):
        load_image_folder(root)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # 100 pixels in (60, 120]: Pillow only warns
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        assert len(load_image_folder(root)) == 1
    assert "images/big.png is larger than" in caplog.text and "masks/big.png" in caplog.text


def test_epoch_reaches_persistent_dataloader_workers(nuclei_dir, tiny_model_dir):
    from transformers import SamProcessor

    processor = SamProcessor.from_pretrained(tiny_model_dir)
    ds = index_objects(load_source(str(nuclei_dir))["train"].select(range(4)))
    transform = SamTransform(processor, train=True, box_jitter=5, max_objects_per_image=3, seed=7)
    train = ds.with_transform(transform)
    kwargs = {"batch_size": 2, "collate_fn": SamDataCollator(), "shuffle": False}
    persistent = torch.utils.data.DataLoader(train, num_workers=2, persistent_workers=True, **kwargs)
    in_process = torch.utils.data.DataLoader(train, num_workers=0, **kwargs)

    def boxes(loader):
        return torch.cat([batch["input_boxes"] for batch in loader])

    epochs = []
    for epoch in range(2):
        transform.set_epoch(epoch)
        epochs.append(boxes(persistent))
        torch.testing.assert_close(epochs[-1], boxes(in_process), rtol=0, atol=0)
    assert not torch.equal(epochs[0], epochs[1]), "the second epoch must draw new prompts in the same workers"


def test_decompression_bomb_in_a_saved_dataset_names_the_row(tmp_path, monkeypatch, caplog):
    """Hub and save_to_disk datasets are decoded by sam_hf when indexed, so an oversized image names its row."""
    small, big = np.zeros((4, 4, 3), np.uint8), np.zeros((10, 10, 3), np.uint8)
    masks = [np.pad(np.ones((2, 2), np.uint8), 1), np.pad(np.ones((8, 8), np.uint8), 1)]
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(small), Image.fromarray(big)], "label": [Image.fromarray(m) for m in masks]}
    )
    ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = load_source(str(tmp_path / "saved"))["train"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 100 pixels > 2 x 40: Pillow raises
    with pytest.raises(ValueError, match=r"The image of row 1 of split 'train' is larger than .*raise the limit"):
        index_objects(saved)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # 100 pixels in (60, 120]: Pillow only warns
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        indexed = index_objects(saved)
    assert "The image of row 1 of split 'train' is larger than" in caplog.text
    assert "The mask of row 1 of split 'train' is larger than" in caplog.text
    # The columns decode again as images afterwards, and the objects are found.
    assert isinstance(indexed[1]["image"], Image.Image) and indexed["num_objects"] == [1, 1]
    assert indexed["boxes"][1] == [[1.0, 1.0, 8.0, 8.0]]


def test_images_too_elongated_for_the_model_are_skipped_counted_and_logged(tmp_path, caplog):
    """The tiny processor resizes images to 256 px and training labels to 64 px on their longest side: a short side
    under 1/128 of the long one rounds to 0 px in the labels, so such rows are skipped (and named), not crashed on."""
    from sam_hf.config.arguments import DataArguments
    from sam_hf.core.images import processor_longest_edge

    root = tmp_path / "d"
    for stem, (height, width) in {"a": (32, 32), "strip": (1, 600), "tall": (200, 2)}.items():
        _write(root / "images" / f"{stem}.png", np.full((height, width, 3), 80, np.uint8))
        _write(root / "masks" / f"{stem}.png", np.ones((height, width), np.uint8))
    processor = tiny_sam_processor(tiny_sam_config())
    longest_edge = processor_longest_edge(processor, labels=True)
    assert longest_edge == 64  # 600 / 1 > 2 x 64 >= 200 / 2
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        kept = prepare_split(
            load_source(str(root))["train"], DataArguments(dataset_name=str(root)), "train", longest_edge
        )
    assert kept["file_name"] == ["a", "tall"]
    assert "strip.png) is 600x1 (WxH)" in caplog.text
    assert "The largest aspect ratio this model takes is 128:1" in caplog.text
    assert "Split 'train': skipped 1 of 3 images too elongated for the model's input" in caplog.text
    batch = SamTransform(processor, train=False)(kept[:2])  # what is kept goes through the processor
    assert [tuple(s.tolist()) for s in batch["original_sizes"]] == [(32, 32), (200, 2)]


def _exif_rotated_jpeg(path, displayed: np.ndarray) -> np.ndarray:
    """Store `displayed` rotated back and tagged "rotate 90 clockwise" (EXIF orientation 6), as a phone stores a
    portrait photo; returns the pixels a viewer shows (the decoded JPEG rotated with numpy)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rot90(displayed, k=1)).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        return np.rot90(np.asarray(im.convert("RGB")), k=-1)


def test_rotated_photos_are_checked_and_indexed_as_displayed(tmp_path):
    """A photo stored 200 x 120 (WxH) and tagged "rotate 90" is shown 120 x 200: its mask is drawn that way, and
    the folder check, the index and the decoded rows all use that orientation, as datasets and viewers do."""
    root = tmp_path / "d"
    displayed = np.full((200, 120, 3), 30, np.uint8)
    displayed[140:180, 20:60] = 220
    mask = np.zeros((200, 120), np.uint8)
    mask[140:180, 20:60] = 1
    shown = _exif_rotated_jpeg(root / "images" / "photo.jpg", displayed)
    _write(root / "masks" / "photo.png", mask)
    indexed = index_objects(load_source(str(root))["train"])
    assert indexed["boxes"] == [[[20.0, 140.0, 59.0, 179.0]]]
    np.testing.assert_array_equal(np.asarray(indexed[0]["image"].convert("RGB")), shown)
    # A mask drawn on the stored pixels does not match the photo as shown, and is refused.
    _write(root / "masks" / "photo.png", np.rot90(mask, k=1))
    with pytest.raises(ValueError, match=r"photo\.jpg is 120x200 \(WxH\) but its mask .*photo\.png is 200x120"):
        load_image_folder(root)


def test_non_finite_pixels_in_training_data_name_the_row(tmp_path):
    pixels = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    pixels[3, 4] = np.inf
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    Image.fromarray(pixels, mode="F").save(root / "images" / "a.tif")
    _write(root / "masks" / "a.png", np.pad(np.ones((4, 4), np.uint8), 6))
    with pytest.raises(ValueError, match=r"row 0 of split 'train' \(.*a\.tif\): the image has 1 NaN or infinite"):
        index_objects(load_source(str(root))["train"])
