"""sam-hf autolabel: the overlap and area rules by hand, then end to end with the tiny base on bundled images, read
back by the training loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BASE
from PIL import Image

from sam_hf.apps.autolabel import AutolabelArguments, run_autolabel
from sam_hf.apps.cli import main
from sam_hf.core.masks import instance_map, mask_to_instances
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source
from sam_hf.viz.overlays import contact_sheet


def _box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_instance_map_by_hand():
    shape = (10, 10)
    masks = np.stack(
        [
            _box(shape, 0, 10, 0, 10),  # 0: 100 px = the whole image -> too large at 0.9
            _box(shape, 0, 4, 0, 4),  # 1: 16 px, 4 of them taken by mask 2 -> 12 visible
            _box(shape, 1, 3, 1, 3),  # 2: 4 px inside mask 1: the smaller wins
            _box(shape, 8, 9, 8, 9),  # 3: 1 px -> too small at min_area 2
            _box(shape, 5, 7, 5, 7),  # 4: 4 px
            _box(shape, 5, 7, 5, 7),  # 5: the same 4 px, painted after 4 -> 4 is hidden
        ]
    )
    instances, kept, dropped = instance_map(masks, min_area=2, max_area_fraction=0.9)
    assert kept.tolist() == [1, 2, 5]
    assert dropped == {"too_large": 1, "too_small": 1, "hidden": 1}
    assert instances.dtype == np.uint16
    assert np.bincount(instances.ravel()).tolist() == [100 - 12 - 4 - 4, 12, 4, 4]
    assert (instances[1:3, 1:3] == 2).all() and instances[0, 0] == 1 and (instances[5:7, 5:7] == 3).all()
    # No mask: an empty map of the image's size.
    empty, kept, _ = instance_map(np.zeros((0, 3, 5), bool))
    assert empty.shape == (3, 5) and not empty.any() and len(kept) == 0


def test_contact_sheet_layout():
    image = np.zeros((40, 80, 3), np.uint8)
    instances = np.zeros((40, 80), np.uint16)
    instances[10:20, 10:20] = 1
    sheet = contact_sheet([("a", image, instances)] * 7, thumb_size=64, columns=3)
    assert sheet.size == (6 + 3 * 70, 6 + 3 * (64 + 18 + 6))  # 3 columns, 3 rows
    pixels = np.asarray(sheet)
    # The object is drawn in colour in the first thumbnail (80 px wide image scaled to 64: the square at 8..16).
    assert pixels[6 + 12, 6 + 12].any()
    with pytest.raises(ValueError, match="No image"):
        contact_sheet([])


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory, nuclei_dir):
    folder = tmp_path_factory.mktemp("to-label")
    for p in sorted((nuclei_dir / "images").iterdir())[:2]:
        shutil.copyfile(p, folder / p.name)
    return folder


def _args(images_dir, out, **kwargs):
    settings = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area=5)
    return AutolabelArguments(
        images=str(images_dir), output_dir=str(out), **{"model": str(TINY_BASE), **settings, **kwargs}
    )


@pytest.fixture(scope="module")
def labelled(images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "out"
    argv = ["autolabel", "--model", str(TINY_BASE), "--images", str(images_dir), "--output_dir", str(out)]
    argv += ["--points_per_side", "4", "--pred_iou_thresh", "0", "--stability_score_thresh", "0", "--min_area", "5"]
    assert main(argv) == 0
    return out


def test_autolabel_writes_a_folder_that_training_reads_back(labelled, images_dir):
    names = sorted(p.name for p in images_dir.iterdir())
    assert sorted(p.name for p in (labelled / "images").iterdir()) == names
    for name in names:  # the images are copied byte for byte
        assert (labelled / "images" / name).read_bytes() == (images_dir / name).read_bytes()
    report = json.loads((labelled / "autolabel.json").read_text())
    assert report["num_images"] == 2 and report["settings"]["points_per_side"] == 4
    for name, entry in report["images"].items():
        # every mask the model gave is either an object or counted as dropped
        assert entry["masks_from_model"] == entry["num_objects"] + sum(entry["dropped"].values())
        assert entry["masks_after_refinement"] is None  # the tiny base was not tuned on object crops
        stem = Path(name).stem
        instances = np.asarray(Image.open(labelled / "instances" / f"{stem}.png"))
        binary = np.asarray(Image.open(labelled / "masks" / f"{stem}.png"))
        assert instances.dtype == np.uint16 and int(instances.max()) == entry["num_objects"]
        assert set(np.unique(binary)) <= {0, 255} and ((binary > 0) == (instances > 0)).all()
        areas = np.bincount(instances.ravel(), minlength=entry["num_objects"] + 1)[1:]
        assert areas.tolist() == entry["areas"] and (areas >= 5).all()
        assert len(entry["scores"]) == entry["num_objects"]
    assert report["num_objects"] > 0  # the tiny base at thresholds 0 finds some masks (about 10 per image)

    # What scripts/train.py --dataset_name <folder> does with it.
    ds = load_source(str(labelled))["train"]
    assert ds.column_names == ["image", "label", "file_name"]
    indexed = index_objects(ds, "instance")
    assert sum(indexed["num_objects"]) == report["num_objects"]
    sheet = Image.open(labelled / "contact_sheet.png")
    assert sheet.width > 2 * 192 and sheet.height > 192


@pytest.mark.slow
def test_autolabel_as_a_saved_dataset_matches_the_folder(labelled, images_dir, tmp_path):
    report = run_autolabel(_args(images_dir, tmp_path / "ds", output_format="dataset"))
    assert (tmp_path / "ds" / "dataset_info.json").is_file() and (tmp_path / "ds" / "contact_sheet.png").is_file()
    ds = load_source(str(tmp_path / "ds"))["train"]
    folder = load_source(str(labelled))["train"]
    assert ds["file_name"] == folder["file_name"]
    for i in range(len(ds)):
        assert np.array_equal(np.asarray(ds[i]["image"]), np.asarray(folder[i]["image"]))
        assert (
            mask_to_instances(ds[i]["label"], "instance") == mask_to_instances(folder[i]["label"], "instance")
        ).all()
    assert report["num_objects"] == json.loads((labelled / "autolabel.json").read_text())["num_objects"]


@pytest.mark.slow
def test_existing_output_is_kept_unless_overwrite(images_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "masks").mkdir()
    (out / "masks" / "hand_made.png").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already holds files. Pass --overwrite"):
        run_autolabel(_args(images_dir, out, max_images=1))
    assert (out / "masks" / "hand_made.png").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["masks", "notes.txt"]
    run_autolabel(_args(images_dir, out, max_images=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "my notes"  # not ours: kept
    assert not (out / "masks" / "hand_made.png").exists()  # masks/ is what autolabel writes: replaced
    assert len(list((out / "instances").iterdir())) == 1


@pytest.mark.slow
def test_overwrite_never_deletes_the_input_images(images_dir, tmp_path):
    out = tmp_path / "labels"
    shutil.copytree(images_dir, out / "images")
    with pytest.raises(ValueError, match="holds the input image"):
        run_autolabel(_args(out / "images", out, overwrite=True))
    assert len(list((out / "images").iterdir())) == 2


@pytest.mark.slow
def test_a_model_tuned_on_object_crops_refines_each_mask_on_its_crop(images_dir, tmp_path, caplog):
    import logging

    from transformers import pipeline

    from sam_hf import SamPredictor
    from sam_hf.inference.windowed import refine_on_object_crops

    model_dir = tmp_path / "crop-model"
    shutil.copytree(TINY_BASE, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "object_crop_scale": 7}))
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        report = run_autolabel(_args(images_dir, tmp_path / "out", model=str(model_dir), max_images=1, device="cpu"))
    assert "was tuned on object crops (config.json object_crop_scale 7)" in caplog.text
    assert report["settings"]["object_crop_scale"] == 7
    # The same steps by hand: the pipeline's masks, each box decoded again on its crop, then the overlap rules.
    name, entry = next(iter(report["images"].items()))
    image = Image.open(images_dir / name).convert("RGB")
    outputs = pipeline("mask-generation", model=str(model_dir), device="cpu")(
        image, points_per_crop=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    masks, _ = refine_on_object_crops(SamPredictor.from_pretrained(str(model_dir)), image, outputs["masks"], 7)
    expected, kept, _ = instance_map(masks, min_area=5)
    assert entry["masks_from_model"] == len(outputs["masks"]) and entry["masks_after_refinement"] == len(masks)
    assert entry["masks_after_refinement"] == entry["num_objects"] + sum(entry["dropped"].values())
    written = np.asarray(Image.open(tmp_path / "out" / "instances" / f"{Path(name).stem}.png"))
    np.testing.assert_array_equal(written, expected)
    assert len(kept) > 0
    # --object_crop_scale 0 keeps the pipeline's masks as they are.
    plain = run_autolabel(
        _args(images_dir, tmp_path / "plain", model=str(model_dir), max_images=1, object_crop_scale=0)
    )
    assert plain["settings"]["object_crop_scale"] is None
    assert plain["images"][name]["masks_after_refinement"] is None
    assert plain["images"][name]["masks_from_model"] == len(outputs["masks"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_format": "coco"}, "--output_format must be one of"),
        ({"object_crop_scale": 0.5}, r"--object_crop_scale must be >= 1 \(or 0: off\)"),
        ({"pred_iou_thresh": 1.5}, r"--pred_iou_thresh must be in \[0, 1\]"),
        ({"points_per_side": 0}, "--points_per_side must be >= 1"),
        ({"min_area": -1}, "--min_area must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        AutolabelArguments(model="m", images="i", output_dir=str(tmp_path), **kwargs)


@pytest.mark.slow
def test_missing_or_empty_images_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        run_autolabel(_args(tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        run_autolabel(_args(tmp_path / "empty", tmp_path / "out"))


@pytest.mark.slow
def test_images_without_objects_are_written_empty_and_warned(images_dir, tmp_path, monkeypatch, caplog):
    import logging

    import torch

    import sam_hf.apps.autolabel as autolabel

    def no_masks(image, **kwargs):
        return {"masks": [], "scores": torch.zeros(0)}

    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace())  # tuned without object crops: no refinement
    predictor = SimpleNamespace(model=model, processor=None)  # no processor: no aspect-ratio limit
    monkeypatch.setattr(autolabel, "_mask_generator", lambda args: (no_masks, predictor))
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        report = run_autolabel(_args(images_dir, tmp_path / "out"))
    assert report["num_objects"] == 0
    for name in report["images"]:
        assert not np.asarray(Image.open(tmp_path / "out" / "instances" / f"{Path(name).stem}.png")).any()
        assert f"{name}: 0 masks from the model, 0 objects kept" in caplog.text
    assert "No image got an object" in caplog.text
    with pytest.raises(ValueError, match="is empty after dropping images without objects"):
        index_objects(load_source(str(tmp_path / "out"))["train"], "instance")


def test_an_image_too_elongated_for_the_model_is_refused_before_labelling(images_dir, tmp_path):
    """The tiny base resizes the longest side to 256 px: a 1 x 600 strip (over 512:1) cannot be encoded. It is named
    from the headers before the model runs on any image."""
    folder = tmp_path / "in"
    shutil.copytree(images_dir, folder)
    Image.fromarray(np.full((1, 600, 3), 90, np.uint8)).save(folder / "strip.png")
    with pytest.raises(
        ValueError, match=r"strip\.png is 600x1 \(WxH\).*largest aspect ratio this model takes is 512:1"
    ):
        run_autolabel(_args(folder, tmp_path / "out"))
    assert not (tmp_path / "out" / "autolabel.json").exists() and not list((tmp_path / "out" / "images").iterdir())


def test_non_finite_pixels_are_refused_naming_the_file(tmp_path):
    pixels = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    pixels[0, 0] = np.nan
    (tmp_path / "in").mkdir()
    Image.fromarray(pixels, mode="F").save(tmp_path / "in" / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif: the image has 1 NaN or infinite pixel value\(s\)"):
        run_autolabel(_args(tmp_path / "in", tmp_path / "out"))
