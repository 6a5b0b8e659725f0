"""Large images as tiles: the tile grid, cut objects, training on tiles and prediction on tiles; object crops."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
from conftest import train_argv

from sam_hf.config.arguments import DataArguments
from sam_hf.core.masks import boxes_from_instances
from sam_hf.core.windows import object_window, tile_origins, tile_starts
from sam_hf.data.windows import crop_objects, tile_dataset
from sam_hf.inference.predictor import SamPrediction
from sam_hf.inference.windowed import ObjectCropPredictor, TiledPredictor, refine_on_object_crops


def test_tile_grid_ends_at_the_edges():
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    assert tile_starts(100, 50, 0) == [0, 50]
    assert tile_starts(101, 50, 0) == [0, 50, 51]
    assert tile_starts(30, 40, 10) == [0]
    assert tile_origins(60, 100, 40, 10) == [(0, 0), (0, 30), (0, 60), (20, 0), (20, 30), (20, 60)]
    with pytest.raises(ValueError, match="tile_overlap < tile_size"):
        tile_origins(10, 10, 8, 8)


def _dataset() -> datasets.Dataset:
    """A 60 x 100 image, tiles of 60 at x = 0 and 40 (overlap 20), with three objects:

    - object 1, columns 5..14 (10 px wide): whole in the first tile only;
    - object 2, columns 50..69 (20 px): in tile 0 columns 50..59 (50% visible, kept) and whole in tile 1;
    - object 3, columns 30..49 (20 px): whole in tile 0; in tile 1 columns 40..49 (50%, kept);
    - object 4, columns 90..99 (10 px): whole in tile 1 only.
    Object 5, columns 34..43 on rows 40..49: whole in tile 0; in tile 1 columns 40..43 (40%, dropped).
    """
    instances = np.zeros((60, 100), np.uint16)
    instances[10:20, 5:15] = 1
    instances[10:20, 50:70] = 2
    instances[25:35, 30:50] = 3
    instances[10:20, 90:100] = 4
    instances[40:50, 34:44] = 5
    image = np.zeros((60, 100, 3), np.uint8)
    image[instances > 0] = 200
    return datasets.Dataset.from_dict(
        {"image": [image], "label": [instances], "file_name": ["big.png"]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Image(), "file_name": datasets.Value("string")}
        ),
    )


def test_cut_objects_are_kept_or_dropped_by_their_visible_fraction(caplog):
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        tiled = tile_dataset(_dataset(), tile_size=60, tile_overlap=20, mask_type="instance")
    assert tiled["file_name"] == ["big.png@y0x0", "big.png@y0x40"]
    assert tiled["source_file_name"] == ["big.png", "big.png"]
    first, second = (np.asarray(label) for label in tiled["label"])
    assert first.shape == second.shape == (60, 60)
    # Tile 0 (x 0..59): objects 1, 2 (half), 3, 5, renumbered in id order 1..4.
    assert np.unique(first).tolist() == [0, 1, 2, 3, 4]
    assert (first == 2).sum() == 10 * 10 and (first[10:20, 50:60] == 2).all()
    # Tile 1 (x 40..99): objects 2, 3 (half), 4; object 5's 40% fragment became background.
    assert np.unique(second).tolist() == [0, 1, 2, 3]
    assert (second[40:50, 0:4] == 0).all() and (second[25:35, 0:10] == 2).all()
    np.testing.assert_array_equal(
        np.asarray(tiled["image"][1])[..., 0] > 0, np.asarray(_dataset()["label"][0])[:, 40:] > 0
    )
    assert "2 tiles of 60 px (overlap 20); objects per tile: 5 whole, 2 cut by the tile edge and kept" in caplog.text
    assert "1 fragments dropped" in caplog.text


@pytest.mark.slow
def test_training_on_tiles(tiny_model_dir, nuclei_dir, tmp_path, caplog):
    from sam_hf.config.parser import parse_args
    from sam_hf.training.run import run_training

    argv = train_argv(
        tiny_model_dir, nuclei_dir, tmp_path / "run", max_train_samples=2, max_eval_samples=1, tile_size=128,
        tile_overlap=32, eval_before_training=False,
    )  # fmt: skip
    args = parse_args(argv)
    with caplog.at_level(logging.INFO, logger="sam_hf.data.windows"):  # run_training sets the sam_hf logger's level
        run_training(*args)
    # The tiles' labels are read as instance maps; the user's arguments are left as they were given.
    assert args[1].mask_type == "auto" and args[1].label_mask_type == "instance"
    # 256 x 256 images, tiles at 0, 96 and 128 on each axis: 9 tiles per image.
    assert "Split 'train': 2 images -> 18 tiles of 128 px" in caplog.text
    assert "Split 'eval': 1 images -> " in caplog.text


class _BoxFilling:
    """Fills each box in the frame of the image it was given; records the image sizes it encoded."""

    def __init__(self):
        self.encoded = []

    def set_image(self, image):
        self.shape = np.asarray(image).shape[:2]
        self.encoded.append(self.shape)

    def predict(self, boxes=None, points=None, point_labels=None, **kwargs):
        masks = np.zeros((len(boxes), 1, *self.shape), bool)
        for i, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            masks[i, 0, y0 : y1 + 1, x0 : x1 + 1] = True
        return SamPrediction(masks, np.ones((len(boxes), 1)), np.zeros((len(boxes), 1, 4, 4)))


def _assert_boxes_filled(result, boxes, shape):
    """Each mask of a `_BoxFilling` prediction is its box, pasted back at the full image's size."""
    assert result.masks.shape == (len(boxes), 1, *shape)
    for mask, (x0, y0, x1, y1) in zip(result.masks[:, 0], boxes):
        expected = np.zeros(shape, bool)
        expected[y0 : y1 + 1, x0 : x1 + 1] = True
        np.testing.assert_array_equal(mask, expected)


def test_tiled_prediction_pastes_each_mask_back():
    image = np.zeros((200, 300, 3), np.uint8)
    tiled = TiledPredictor(_BoxFilling(), tile_size=128, tile_overlap=32)
    tiled.set_image(image)
    boxes = [[10, 10, 40, 40], [150, 100, 200, 150], [120, 60, 135, 70], [0, 0, 250, 190]]
    _assert_boxes_filled(tiled.predict(boxes=boxes), boxes, (200, 300))
    # Box 3 straddles x = 128: the tile starting at x = 96 holds it with the widest margin.
    assert tiled.choose_tile(np.array([120, 60, 135, 70])) == (0, 96)
    # The last box fits in no tile: decoded on the whole image.
    assert (200, 300) in tiled.predictor.encoded and tiled.choose_tile(np.array([0, 0, 250, 190])) is None
    with pytest.raises(ValueError, match="mask_input is not supported"):
        tiled.predict(boxes=boxes[:1], mask_input=np.zeros((4, 4)))


def test_object_window_by_hand():
    # A 10 x 10 box, scale 3: 30 px centred on the box's centre (15, 25).
    assert object_window([10, 20, 19, 29], 3, 100, 100) == (10, 0, 40, 30)
    # Wider than high: the longer side sets the window; rows 50..54 centre on 52.5, so the start 32.5 rounds up.
    assert object_window([40, 50, 59, 54], 2, 100, 100) == (33, 30, 73, 70)
    # At the image's corner the window moves inside the image.
    assert object_window([0, 0, 9, 9], 4, 100, 100) == (0, 0, 40, 40)
    assert object_window([90, 95, 99, 99], 4, 100, 100) == (60, 60, 100, 100)
    # Larger than the image: the whole image along both axes.
    assert object_window([5, 5, 44, 44], 2, 50, 60) == (0, 0, 50, 60)


def test_crop_objects_gives_each_object_whole_in_its_own_crop(caplog):
    source = _dataset()
    instances = np.asarray(source["label"][0])
    image = np.asarray(source["image"][0])
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        crops = crop_objects(source, 3, mask_type="instance", split_name="eval")
    assert crops["file_name"] == [f"big.png#{k}" for k in range(1, 6)]
    assert crops["source_file_name"] == ["big.png"] * 5
    # Objects 1..5: their boxes, sides 10 / 20 / 20 / 10 / 10 px, so windows of 30 / 60 / 60 / 30 / 30 px.
    windows = [(0, 0, 30, 30), (0, 30, 60, 90), (0, 10, 60, 70), (0, 70, 30, 100), (30, 24, 60, 54)]
    for k, (row, (y0, x0, y1, x1)) in enumerate(zip(crops, windows), start=1):
        label, crop = np.asarray(row["label"]), np.asarray(row["image"])
        assert label.shape == crop.shape[:2] == (y1 - y0, x1 - x0)
        # Only this object is labelled, and all of it: the other objects in the window are background.
        np.testing.assert_array_equal(label == 1, instances[y0:y1, x0:x1] == k)
        assert (label == 1).sum() == (instances == k).sum() and set(np.unique(label)) <= {0, 1}
        np.testing.assert_array_equal(crop, image[y0:y1, x0:x1])
    assert "Split 'eval': 1 images -> 5 object crops, each 3 x the longer side" in caplog.text
    with pytest.raises(ValueError, match="object_crop_scale must be >= 1"):
        crop_objects(source, 0.5)


def test_crop_objects_background_points_and_point_prompt_rows():
    source = _dataset()
    instances = np.asarray(source["label"][0])
    crops = crop_objects(source, 3, mask_type="instance", point_scale=5, point_every=1)
    # Every object once at scale 3 for boxes, and once at scale 5 for point prompts only.
    names = [f"big.png#{k}" for k in range(1, 6)] + [f"big.png#{k}@5" for k in range(1, 6)]
    assert sorted(crops["file_name"]) == sorted(names)
    assert sum(crops["point_only"]) == 5
    boxes = {k: boxes_from_instances(instances)[k - 1] for k in range(1, 6)}
    for row in crops:
        k = int(row["file_name"].split("#")[1].split("@")[0])
        y0, x0, y1, x1 = object_window(boxes[k], 5 if row["point_only"] else 3, *instances.shape)
        assert np.asarray(row["label"]).shape == (y1 - y0, x1 - x0)
        points = np.asarray(row["background_points"]).reshape(-1, 2)
        free = int((instances[y0:y1, x0:x1] == 0).sum())
        # Up to 16 distinct pixels of the window that hold no object at all (not only not this row's object).
        assert len(points) == min(16, free) and len({tuple(p) for p in points}) == len(points)
        assert all(instances[y0 + y, x0 + x] == 0 for x, y in points)
    # One object in two: 2 or 3 of the 5, at the point scale.
    halves = crop_objects(source, 3, mask_type="instance", point_scale=5, point_every=2)
    assert sum(halves["point_only"]) in (2, 3) and len(halves) == 5 + sum(halves["point_only"])
    # Without a point scale there is no point_only column, and the crops are those of scale 3 alone.
    assert "point_only" not in crop_objects(source, 3, mask_type="instance").column_names
    with pytest.raises(ValueError, match="point_crop_every must be >= 1"):
        crop_objects(source, 3, point_scale=5, point_every=0)


def test_point_crop_and_background_arguments_reach_the_card():
    from sam_hf.config.parser import parse_args
    from sam_hf.training.report import loss_description, prompt_recipe

    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--object_crop_scale", "7", "--output_dir", "o"]
    _, data_args, sam_args, _ = parse_args(base + ["--point_crop_scale", "20", "--point_crop_every", "3"])
    assert "One object in 3 was also cut on a crop of 20 times its box" in prompt_recipe(data_args, sam_args)
    assert "(weight 0.1) one point per image on no object" in loss_description(sam_args)
    _, data_args, sam_args, _ = parse_args(base + ["--background_point_weight", "0"])
    assert "no object" not in loss_description(sam_args) and "also cut" not in prompt_recipe(data_args, sam_args)
    with pytest.raises(ValueError, match="--multimask_every 0 turns off"):
        parse_args(base + ["--point_crop_scale", "20", "--multimask_every", "0"])
    with pytest.raises(ValueError, match="background_point_weight must be >= 0"):
        parse_args(base + ["--background_point_weight", "-1"])


def test_crops_and_tiles_cut_in_several_processes_are_those_of_one(monkeypatch):
    """`--preprocessing_num_workers` cuts the rows in processes: the same rows, in the same order, pixel for pixel."""
    one_image = _dataset()
    image, label = np.asarray(one_image["image"][0]), np.asarray(one_image["label"][0])
    # A second image half as bright, so that rows cannot be swapped unnoticed.
    source = datasets.Dataset.from_dict(
        {"image": [image, image // 2], "label": [label, label], "file_name": ["big.png", "other.png"]},
        features=one_image.features,
    )
    num_procs, original_map = [], datasets.Dataset.map

    def recording_map(self, *args, **kwargs):
        num_procs.append(kwargs.get("num_proc"))
        return original_map(self, *args, **kwargs)

    for cut in (
        lambda n: crop_objects(source, 3, mask_type="instance", point_scale=5, point_every=2, num_proc=n),
        lambda n: tile_dataset(source, 60, 20, mask_type="instance", num_proc=n),
    ):
        one = cut(None)
        with monkeypatch.context() as patch:
            patch.setattr(datasets.Dataset, "map", recording_map)
            two = cut(2)
        assert num_procs.pop() == 2 and not num_procs, "one map, in 2 processes"
        assert len(one) == len(two) > 2 and one.column_names == two.column_names
        for a, b in zip(one, two):
            for column in one.column_names:
                if column in ("image", "label"):
                    np.testing.assert_array_equal(np.asarray(a[column]), np.asarray(b[column]))
                else:
                    assert a[column] == b[column], column


def test_object_crop_arguments_are_checked():
    assert DataArguments(dataset_name="d", object_crop_scale=6).label_mask_type == "instance"
    assert DataArguments(dataset_name="d", object_crop_scale=6).eval_unit == "object crops"
    with pytest.raises(ValueError, match="choose one"):
        DataArguments(dataset_name="d", object_crop_scale=6, tile_size=128)
    with pytest.raises(ValueError, match="must be >= 1"):
        DataArguments(dataset_name="d", object_crop_scale=0.5)
    with pytest.raises(ValueError, match="does not work with --streaming"):
        DataArguments(dataset_name="d", object_crop_scale=6, streaming=True, max_eval_samples=1)
    with pytest.raises(ValueError, match="needs --object_crop_scale"):
        DataArguments(dataset_name="d", point_crop_scale=20)
    assert DataArguments(dataset_name="d", object_crop_scale=6, point_crop_scale=0).point_crop_scale is None
    with pytest.raises(ValueError, match="point_crop_every must be >= 1"):
        DataArguments(dataset_name="d", object_crop_scale=6, point_crop_scale=20, point_crop_every=0)


def test_object_crop_prediction_pastes_each_mask_back():
    image = np.zeros((200, 300, 3), np.uint8)
    cropping = ObjectCropPredictor(_BoxFilling(), scale=4)
    cropping.set_image(image)
    boxes = [[10, 10, 19, 19], [150, 100, 199, 149], [290, 190, 299, 199]]
    _assert_boxes_filled(cropping.predict(boxes=boxes), boxes, (200, 300))
    # Each box was decoded on its own crop: 40 px, 200 px (the image's height), 40 px against the far corner.
    assert cropping.predictor.encoded == [(40, 40), (200, 200), (40, 40)]
    with pytest.raises(ValueError, match="mask_input is not supported with object crops"):
        cropping.predict(boxes=boxes[:1], mask_input=np.zeros((4, 4)))


class _ScoredBoxFilling(_BoxFilling):
    """Fills each box; its score falls with the box's left edge in the full image (the crop's offset is undone from
    the image it was given, which records where it was cut)."""

    def predict(self, boxes=None, **kwargs):
        result = super().predict(boxes=boxes, **kwargs)
        left = np.asarray(boxes)[:, 0] + self.offset
        return SamPrediction(result.masks, (1 - left / 1000)[:, None], result.logits)


def test_refinement_on_object_crops_decodes_each_box_once_and_keeps_the_best_of_overlaps():
    image = np.zeros((100, 120, 3), np.uint8)
    image[..., 0] = np.arange(120)  # the red channel is the column: each crop says where it was cut
    predictor = _ScoredBoxFilling()
    set_image = predictor.set_image

    def set_image_and_offset(crop):
        set_image(crop)
        predictor.offset = int(np.asarray(crop)[0, 0, 0])

    predictor.set_image = set_image_and_offset
    proposals = np.zeros((6, 100, 120), bool)
    proposals[0, 10:30, 10:12] = proposals[0, 28:30, 10:30] = True  # an L: box x 10..29, y 10..29
    proposals[1, 10:30, 28:30] = proposals[1, 10:12, 10:30] = True  # another shape with the same box
    proposals[2, 11:31, 11:31] = True  # box IoU 361 / 439 = 0.82 with the first box, lower score: suppressed
    proposals[3, 40:50, 60:70] = True  # apart from the others
    # proposals[4] is empty: skipped
    proposals[5, 40:50, 80:84] = True  # box x 80..83, y 40..49; IoU 0 with the others
    masks, scores = refine_on_object_crops(predictor, image, list(proposals), scale=2)
    expected = np.zeros((3, 100, 120), bool)
    expected[0, 10:30, 10:30] = expected[1, 40:50, 60:70] = expected[2, 40:50, 80:84] = True
    np.testing.assert_array_equal(masks, expected)
    np.testing.assert_allclose(scores, [0.990, 0.940, 0.920], rtol=1e-6)
    # Four distinct boxes, each decoded once on its own crop of 2 x its longer side: 40, 40, 20 and 20 px.
    assert predictor.encoded == [(40, 40), (40, 40), (20, 20), (20, 20)]
    # Tensors are accepted too; with no proposal, nothing is decoded.
    import torch

    again, _ = refine_on_object_crops(predictor, image, [torch.from_numpy(proposals[3])], scale=2)
    np.testing.assert_array_equal(again, expected[1:2])
    none, none_scores = refine_on_object_crops(predictor, image, [np.zeros((100, 120), bool)], scale=2)
    assert none.shape == (0, 100, 120) and none_scores.shape == (0,)
    with pytest.raises(ValueError, match="must be >= 1"):
        refine_on_object_crops(predictor, image, list(proposals), scale=0.5)


@pytest.mark.slow
def test_training_on_object_crops(tiny_model_dir, nuclei_dir, tmp_path, caplog):
    from PIL import Image

    from sam_hf.config.parser import parse_args
    from sam_hf.training.run import run_training

    argv = train_argv(
        tiny_model_dir, nuclei_dir, tmp_path / "run", per_device_train_batch_size=4, max_train_samples=1,
        max_eval_samples=1, max_objects_per_image=None, object_crop_scale=6, eval_before_training=False,
        point_crop_scale=12, point_crop_every=2,
        use_cpu=True,  # its evaluation is compared with run_evaluation's, on the CPU
    )  # fmt: skip
    args = parse_args(argv)
    with caplog.at_level(logging.INFO, logger="sam_hf.data.windows"):  # run_training sets the sam_hf logger's level
        metrics = run_training(*args)
    assert args[1].mask_type == "auto" and args[1].label_mask_type == "instance"
    # The training image's objects also get point crops, one in two; evaluation gets none (checked below).
    import re

    train_objects = int(re.search(r"Split 'train': 1 images -> (\d+) object crops", caplog.text)[1])
    point_crops = int(re.search(r"Split 'train': (\d+) more crops of 12 x for the point prompts", caplog.text)[1])
    assert train_objects // 2 <= point_crops <= -(-train_objects // 2)
    assert "Split 'eval'" in caplog.text and "more crops" not in caplog.text.split("Split 'eval'")[1]
    # One crop, and one scored object, per object of the image; counted here from the instance map on disk.
    from sam_hf.evaluation.run import load_split

    eval_name = load_split(DataArguments(dataset_name=str(nuclei_dir), max_eval_samples=1), "eval", 42, None, None)[
        "file_name"
    ][0]
    stem = eval_name.rsplit(".", 1)[0]
    objects = len(np.unique(np.asarray(Image.open(nuclei_dir / "instances" / f"{stem}.png")))) - 1
    assert f"Split 'eval': 1 images -> {objects} object crops" in caplog.text
    assert metrics["eval_num_objects"] == objects
    # scripts/evaluate.py on the same crops reports them per source image.
    from sam_hf.evaluation.arguments import EvaluateArguments
    from sam_hf.evaluation.run import run_evaluation

    summary = run_evaluation(
        EvaluateArguments(model=[f"tuned={tmp_path / 'run'}"], output_dir=str(tmp_path / "eval"), automatic=True,
                          points_per_crop=4, pred_iou_thresh=0, stability_score_thresh=0, device="cpu"),
        # The training run's --point_crop_scale, given here too, changes nothing in evaluation.
        DataArguments(dataset_name=str(nuclei_dir), max_eval_samples=1, object_crop_scale=6, point_crop_scale=12),
    )  # fmt: skip
    assert summary["num_images"] == 1 and summary["num_objects"] == objects
    # Automatic masks are scored on the whole image (a crop labels one object), each refined on its own crop.
    assert summary["automatic"]["tuned"]["num_objects"] == objects
    assert summary["automatic_settings"]["object_crop_scale"] == 6
    assert "each mask decoded again on its object crop (6 x its box)" in (tmp_path / "eval" / "metrics.md").read_text()
    assert summary["models"]["tuned"]["per_image"][0]["name"] == eval_name
    # Training evaluated from float16 cached embeddings, evaluate.py runs the encoder: equal to rounding.
    assert summary["models"]["tuned"]["dice"]["mean"] == pytest.approx(metrics["eval_dice"], abs=1e-4)
    # The scale is kept in config.json, and predict.py decodes on the same crops without being told.
    import json

    from sam_hf.apps.predict import PredictArguments, run_prediction

    assert json.loads((tmp_path / "run" / "config.json").read_text())["object_crop_scale"] == 6
    image = nuclei_dir / "images" / f"{stem}.png"
    masks = {}
    for name, scale in (("default", None), ("explicit", 6.0)):
        with caplog.at_level(logging.INFO, logger="sam_hf"):
            run_prediction(PredictArguments(model=str(tmp_path / "run"), images=str(image), boxes="100,100,115,112",
                                            object_crop_scale=scale, output_dir=str(tmp_path / name)))  # fmt: skip
        masks[name] = np.asarray(Image.open(tmp_path / name / stem / "mask_000.png"))
    np.testing.assert_array_equal(masks["default"], masks["explicit"])
    assert "was tuned on object crops (config.json object_crop_scale 6)" in caplog.text
    # ... which is not what decoding on the whole image gives.
    from sam_hf.inference.predictor import SamPredictor

    whole = SamPredictor.from_pretrained(str(tmp_path / "run"))(np.asarray(Image.open(image).convert("RGB")),
                                                              boxes=[[100, 100, 115, 112]]).masks[0, 0]  # fmt: skip
    assert (whole != (masks["default"] > 0)).any()
    # A model tuned without crops has no scale: whole-image decoding, as before.
    assert "object_crop_scale" not in json.loads((tiny_model_dir / "config.json").read_text())


def test_windows_encoded_in_batches_give_the_same_masks(tiny_model_dir):
    """Crops encoded several per vision-encoder call decode as when each is encoded alone."""
    from sam_hf import SamPredictor

    predictor = SamPredictor.from_pretrained(str(tiny_model_dir))
    calls = []
    predictor.model.vision_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 220, 3), np.uint8)
    boxes = [[10, 10, 30, 25], [100, 40, 140, 90], [180, 120, 215, 145], [50, 100, 60, 112], [10, 10, 30, 25]]
    one = ObjectCropPredictor(predictor, scale=3, batch_size=1)(image, boxes=boxes)
    assert calls == [1, 1, 1, 1]  # four distinct crops; the repeated box shares its crop
    calls.clear()
    batched = ObjectCropPredictor(predictor, scale=3, batch_size=3)(image, boxes=boxes)
    assert calls == [3, 1]
    np.testing.assert_allclose(batched.logits, one.logits, atol=1e-4)
    np.testing.assert_allclose(batched.scores, one.scores, atol=1e-5)
    assert (batched.masks != one.masks).mean() < 1e-4  # only a logit at the threshold could flip
    calls.clear()
    tiled = TiledPredictor(predictor, tile_size=128, tile_overlap=32, batch_size=8)(image, boxes=boxes)
    alone = TiledPredictor(predictor, tile_size=128, tile_overlap=32, batch_size=1)(image, boxes=boxes)
    assert calls[0] > 1
    np.testing.assert_allclose(tiled.logits, alone.logits, atol=1e-4)
    assert ObjectCropPredictor(predictor, scale=3).batch_size == 1  # on a CPU
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ObjectCropPredictor(predictor, scale=3, batch_size=0)
