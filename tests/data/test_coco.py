"""COCO sources: RLE and polygon decoding against values worked out by hand (and published pycocotools output),
load_source on a COCO file, the counted skips, the errors, and the round trip through write_coco."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from sam_hf.core.masks import mask_to_instances
from sam_hf.core.rle import decode_rle, encode_rle, polygons_to_mask, rle_counts_to_string, rle_string_to_counts
from sam_hf.data.coco import find_coco_file, index_coco, load_coco
from sam_hf.data.coco_export import write_coco
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source

# (run lengths, pycocotools string). Small counts are chr(48 + count); from the fourth count on the difference to
# the count two places earlier is stored; 100 = 4 + 3 * 32 is "T" (48 + 4 + 0x20 for "more") then "3"; a difference
# of -1 is the single group 31 with its sign bit 0x10 set, chr(48 + 31) = "O".
RLE_STRINGS = [
    ([3, 2, 4], "324"),
    ([1, 2, 3, 1], "123O"),
    ([100], "T3"),
    ([5, 2, 2, 2, 5], "52203"),  # rpycocotools' COCO_RLE example for a 4x4 mask
    # 25x25 mask[0:5, 0:5]: column-major runs 0, then 5 ones / 20 zeros per column, then 20 + 20 * 25 zeros.
    ([0, 5, 20, 5, 20, 5, 20, 5, 20, 5, 520], "05d00000000d?"),  # pycocotools.mask.encode's output
]


@pytest.mark.parametrize("counts, text", RLE_STRINGS)
def test_compressed_rle_strings(counts, text):
    assert rle_string_to_counts(text) == counts
    assert rle_counts_to_string(counts) == text


@pytest.mark.parametrize(
    "text, start, stop",
    [("05d00000000d?", 0, 5), ("R45d00000000b;", 5, 10), ("X`05d00000000", 20, 25)],  # pycocotools.mask.encode
)
def test_compressed_rle_matches_pycocotools(text, start, stop):
    expected = np.zeros((25, 25), bool)
    expected[start:stop, start:stop] = True
    assert (decode_rle({"size": [25, 25], "counts": text}) == expected).all()
    assert encode_rle(expected) == {"size": [25, 25], "counts": text}


def test_uncompressed_rle_by_hand():
    # 3x4 (HxW); column-major: col 0 = 0,1,1 / col 1 = 1,0,0 / col 2 = 0,0,0 / col 3 = 0,0,1
    # flat: 0 1 1 1 0 0 0 0 0 0 0 1 -> runs 1 zero, 3 ones, 7 zeros, 1 one
    expected = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1]], bool)
    assert (decode_rle({"size": [3, 4], "counts": [1, 3, 7, 1]}) == expected).all()
    assert encode_rle(expected, compressed=False) == {"size": [3, 4], "counts": [1, 3, 7, 1]}
    # A mask whose first pixel is set starts with a zero-length background run.
    assert encode_rle(np.ones((2, 2)), compressed=False)["counts"] == [0, 4]


@pytest.mark.parametrize(
    "rle, message",
    [
        ({"size": [3, 4], "counts": [1, 3, 7]}, "sum to 11 pixels"),
        ({"size": [3, 4], "counts": [1, -3, 7, 7]}, "negative run"),
        ({"size": [3, 4], "counts": "1 3"}, "not a compressed RLE character"),
        ({"size": [3, 4], "counts": "T"}, "ends inside a count"),
        ({"size": [3], "counts": [12]}, "'size' must be [height, width]"),
        ({"counts": [12]}, "expected an RLE object"),
    ],
)
def test_bad_rle(rle, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_rle(rle)


@pytest.mark.parametrize(
    "polygon, count, rows_cols",
    [
        ([10, 10, 20, 10, 20, 20, 10, 20], 100, (10, 19)),  # pixel centres 10.5 .. 19.5 lie in [10, 20)
        ([10.2, 10.2, 20.2, 10.2, 20.2, 20.2, 10.2, 20.2], 100, (10, 19)),  # same centres inside
        ([10.6, 10.6, 20.6, 10.6, 20.6, 20.6, 10.6, 20.6], 100, (11, 20)),  # 10.5 drops out, 20.5 comes in
        ([0, 0, 10, 0, 0, 10], 45, None),  # row j holds centres i + 0.5 < 9.5 - j: 9 + 8 + ... + 1
        ([5, 5, 6, 5, 6, 6, 5, 6], 1, (5, 5)),  # a unit square is one pixel
        ([5, 5, 5.4, 5, 5.4, 5.4, 5, 5.4], 0, None),  # misses every pixel centre
    ],
)
def test_polygon_pixels(polygon, count, rows_cols):
    mask = polygons_to_mask([polygon], 32, 32)
    assert mask.sum() == count
    if rows_cols is not None:
        ys, xs = np.nonzero(mask)
        assert (xs.min(), xs.max()) == rows_cols and (ys.min(), ys.max()) == rows_cols


def test_polygon_covering_the_image_fills_it():
    # pycocotools' frPoly of this square on a 10x10 image equals the RLE of an all-ones mask (a published test case)
    assert polygons_to_mask([[0, 0, 0, 10, 10, 10, 10, 0]], 10, 10).all()


def test_polygons_of_one_annotation_are_united():
    two = polygons_to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
    assert two.sum() == 16 + 16 - 4  # the 2x2 overlap once, not cut out


# --------------------------------------------------------------------------------------------------------------------
# A hand-made COCO directory
# --------------------------------------------------------------------------------------------------------------------


def _square_rle(height, width, x0, y0, size, compressed):
    mask = np.zeros((height, width), bool)
    mask[y0 : y0 + size, x0 : x0 + size] = True
    return encode_rle(mask, compressed)


def make_coco(root, images=("a", "b", "c"), missing=("d",), annotations=None):
    """images a (32x24: a polygon square, a compressed and an uncompressed RLE square, a crowd), b (no annotation),
    c (one polygon), d (listed, no file); one annotation of an unknown image."""
    (root / "images").mkdir(parents=True)
    for name in images:
        Image.fromarray(np.full((24, 32, 3), 40, np.uint8)).save(root / "images" / f"{name}.png")
    listed = [{"id": i + 1, "file_name": f"{n}.png", "height": 24, "width": 32} for i, n in enumerate(images)]
    listed += [{"id": 100 + i, "file_name": f"{n}.png", "height": 24, "width": 32} for i, n in enumerate(missing)]
    if annotations is None:
        cell = {"category_id": 1, "iscrowd": 0}
        annotations = [
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
            {"id": 12, "image_id": 1, **cell, "segmentation": _square_rle(24, 32, 10, 3, 5, True)},
            {"id": 13, "image_id": 1, **cell, "segmentation": _square_rle(24, 32, 20, 10, 6, False)},
            {"id": 14, "image_id": 1, **cell, "iscrowd": 1, "segmentation": _square_rle(24, 32, 0, 0, 24, False)},
            {"id": 31, "image_id": 3, "category_id": 1, "segmentation": [[0, 0, 8, 0, 8, 3, 0, 3]]},
            {"id": 41, "image_id": 100, "category_id": 1, "segmentation": [[0, 0, 8, 0, 8, 3, 0, 3]]},
            {"id": 99, "image_id": 7, "category_id": 1, "segmentation": [[0, 0, 8, 0, 8, 3, 0, 3]]},
        ]
    coco = {"images": listed, "annotations": annotations, "categories": [{"id": 1, "name": "cell"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def test_load_source_reads_coco_like_an_image_folder(tmp_path, caplog):
    make_coco(tmp_path / "coco")
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        dsd = load_source(str(tmp_path / "coco"))
    ds = dsd["train"]
    assert list(dsd) == ["train"] and ds.column_names == ["image", "label", "file_name"]
    assert ds["file_name"] == ["a", "b", "c"]  # d has no file
    label = np.asarray(ds[0]["label"])
    assert label.dtype == np.uint16 and label.shape == (24, 32)
    # annotation k of the image is id k + 1; the crowd annotation is not an object
    assert np.bincount(label.ravel()).tolist() == [24 * 32 - 16 - 25 - 36, 16, 25, 36]
    assert (label[2:6, 2:6] == 1).all() and (label[3:8, 10:15] == 2).all() and (label[10:16, 20:26] == 3).all()
    assert np.asarray(ds[1]["label"]).max() == 0
    assert (np.asarray(ds[2]["label"]) == 1).sum() == 24

    text = caplog.text
    assert "skipped 1 crowd annotation(s)" in text and "ids 14" in text
    assert "skipped 1 annotation(s) whose image_id is not an image of the file: ids 99" in text
    assert "skipped 1 listed image(s) not found" in text and "with their 1 annotation(s): d.png" in text
    assert "1 image(s) have no (non-crowd) annotation" in text and "b.png" in text

    index = index_coco(tmp_path / "coco")
    assert (index.crowd, index.orphans, index.missing_files, index.unannotated) == ([14], [99], ["d.png"], ["b.png"])
    assert index.num_annotations == 7 and index.missing_annotations == 1

    # What train.py does next: the same objects and boxes as the instance maps hold.
    indexed = index_objects(ds, "instance")
    assert indexed["file_name"] == ["a", "c"]  # b has no object and is skipped, as an empty mask would be
    assert indexed[0]["boxes"] == [[2, 2, 5, 5], [10, 3, 14, 7], [20, 10, 25, 15]]
    assert indexed[0]["areas"] == [16, 25, 36]


def test_explicit_json_path_and_images_beside_it(tmp_path):
    root = make_coco(tmp_path / "export")
    for p in (root / "images").iterdir():
        p.rename(root / p.name)
    (root / "images").rmdir()
    (root / "instances.json").rename(root / "_annotations.coco.json")
    ds = load_source(str(root / "_annotations.coco.json"))["train"]
    assert ds["file_name"] == ["a", "b", "c"]


def test_overlapping_annotations_smaller_wins_and_hidden_ones_are_logged(tmp_path, caplog):
    annotations = [
        {"id": 1, "image_id": 1, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},  # 100 px
        {"id": 2, "image_id": 1, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},  # 16 px inside it
        {"id": 3, "image_id": 1, "segmentation": [[20, 20, 21, 20, 21, 20.2]]},  # no pixel centre inside
    ]
    make_coco(tmp_path / "c", images=("a",), missing=(), annotations=annotations)
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        label = np.asarray(load_coco(tmp_path / "c")[0]["label"])
    assert np.bincount(label.ravel(), minlength=3).tolist()[1:] == [84, 16]
    assert "1 annotation(s) have no visible pixel" in caplog.text and "ids 3" in caplog.text


@pytest.mark.parametrize(
    "segmentation, expected",
    [
        ([[2, 2, 6, 2, 6]], "polygon 0 must be a flat list of at least 3 x, y pairs"),
        ([[2, 2, 6, 2, "x", 6]], "polygon 0 must be a flat list"),
        ([], "must be a non-empty list of polygons"),
        ({"size": [10, 10], "counts": [100]}, r"RLE 'size' is \[10, 10\] but the image is \[24, 32\]"),
        ({"size": [24, 32], "counts": [100]}, "RLE runs sum to 100 pixels"),
        (None, "has no 'segmentation'"),
    ],
)
def test_bad_annotation_names_file_annotation_and_image(tmp_path, segmentation, expected):
    ann = {"id": 5, "image_id": 1}
    if segmentation is not None:
        ann["segmentation"] = segmentation
    make_coco(tmp_path / "c", images=("a",), missing=(), annotations=[ann])
    with pytest.raises(ValueError, match=expected) as err:
        load_source(str(tmp_path / "c"))
    assert str(tmp_path / "c" / "instances.json") in str(err.value)
    assert "annotation 5 (image 1, a.png)" in str(err.value)


def test_bad_files(tmp_path):
    root = make_coco(tmp_path / "c", images=("a",), missing=(), annotations=[])
    (root / "instances.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="instances.json is not valid JSON"):
        load_coco(root)
    (root / "instances.json").write_text('{"info": {}}')
    with pytest.raises(ValueError, match="is not a COCO instances file"):
        load_coco(root)
    (root / "instances.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 5}]}))
    with pytest.raises(ValueError, match=r"is 24x32 \(HxW\) but the file lists height 5"):
        load_coco(root)
    (root / "instances.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "zz.png"}]}))
    with pytest.raises(ValueError, match="None of the 1 images listed"):
        load_coco(root)
    (root / "instances.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}] * 2}))
    with pytest.raises(ValueError, match="image id 1 is listed twice"):
        load_coco(root)


def test_folder_with_masks_and_instances_json_stays_an_image_folder(tmp_path, nuclei_dir, caplog):
    root = tmp_path / "both"
    shutil.copytree(nuclei_dir, root, ignore=shutil.ignore_patterns("*.csv", "*.md"))
    (root / "instances.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        assert find_coco_file(root) is None
        assert len(load_source(str(root))["train"]) == 32
    assert "reading it as an image folder" in caplog.text
    assert find_coco_file(root / "instances.json") == root / "instances.json"


def test_write_coco_round_trip_reproduces_the_instance_maps(tmp_path, nuclei_dir):
    source = load_source(str(nuclei_dir))["train"].select(range(3))
    path = write_coco(source, tmp_path / "coco")
    coco = json.loads(path.read_text())
    assert [a["iscrowd"] for a in coco["annotations"]] == [0] * len(coco["annotations"])
    back = load_source(str(tmp_path / "coco"))["train"]
    assert back["file_name"] == source["file_name"]
    for i in range(3):
        original = mask_to_instances(source[i]["label"], "instance")
        assert (mask_to_instances(back[i]["label"], "instance") == original).all()
        assert np.array_equal(np.asarray(back[i]["image"]), np.asarray(source[i]["image"]))
    first = coco["annotations"][0]
    ys, xs = np.nonzero(mask_to_instances(source[0]["label"], "instance") == 1)
    assert first["area"] == len(xs)
    assert first["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    with pytest.raises(FileExistsError, match="already holds files"):
        write_coco(source, tmp_path / "coco")


@pytest.mark.slow
def test_training_runs_on_a_coco_source(tmp_path, tiny_model_dir, nuclei_dir):
    from sam_hf.config.parser import parse_args
    from sam_hf.training.run import run_training

    write_coco(load_source(str(nuclei_dir))["train"].select(range(4)), tmp_path / "coco")
    argv = f"--model_name_or_path {tiny_model_dir} --dataset_name {tmp_path / 'coco'} --mask_type instance "
    argv += f"--output_dir {tmp_path / 'run'} --max_steps 2 --per_device_train_batch_size 2 --report_to none "
    argv += "--max_objects_per_image 4 --validation_split_percentage 25 --eval_before_training false "
    argv += f"--embedding_cache_dir {tmp_path / 'cache'}"
    metrics = run_training(*parse_args(argv.split()))
    assert 0.0 <= metrics["eval_dice"] <= 1.0
