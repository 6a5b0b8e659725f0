from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from sam_hf import PromptError, SamPredictor
from sam_hf.apps.predict import PredictArguments, parse_coordinates, run_prediction
from sam_hf.viz.overlays import color_labels, label_colors, overlay


@pytest.fixture(scope="module")
def image_files(nuclei_dir):
    return sorted((nuclei_dir / "images").iterdir())[:2]


@pytest.mark.slow
def test_cli_boxes_write_masks_labels_overlay(tiny_model_dir, image_files, tmp_path):
    boxes = [[10.0, 12.0, 60.0, 70.0], [100.0, 40.0, 180.0, 170.0]]
    cmd = [
        sys.executable, str(REPO / "scripts" / "predict.py"), "--model", str(tiny_model_dir),
        "--images", str(image_files[0]), "--boxes", "10,12,60,70; 100,40,180,170", "--output_dir", str(tmp_path),
        "--device", "cpu",  # compared below with the library on the CPU; the command takes cuda where present
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = image_files[0].stem
    image = Image.open(image_files[0])
    expected = SamPredictor.from_pretrained(str(tiny_model_dir))(image, boxes=boxes)
    for i in range(2):
        written = np.asarray(Image.open(tmp_path / stem / f"mask_{i:03d}.png")) > 0
        np.testing.assert_array_equal(written, expected.masks[i, 0])
    labels = np.asarray(Image.open(tmp_path / f"{stem}_labels.png"))
    assert labels.shape == (image.height, image.width)
    assert set(np.unique(labels)) <= {0, 1, 2}
    # Beside the raw label image, a viewable one: black background, each label in its overlay colour.
    colored = np.asarray(Image.open(tmp_path / f"{stem}_labels_color.png"))
    assert colored.shape == (image.height, image.width, 3) and colored.dtype == np.uint8
    assert (colored[labels == 0] == 0).all()
    for value in np.unique(labels[labels > 0]):
        assert (colored[labels == value] == label_colors(2)[value - 1]).all()
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    np.testing.assert_allclose(report["scores"], expected.scores, atol=1e-6)
    assert report["mask_area"] == expected.masks[:, 0].reshape(2, -1).sum(1).tolist()
    drawn = np.asarray(Image.open(tmp_path / f"{stem}_overlay.png").convert("RGB"))
    assert drawn.shape == (image.height, image.width, 3)


def test_overlay_colours_masks_and_marks_points():
    image = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 5:10, 5:15] = True
    out = np.asarray(overlay(image, mask, points=[[25, 15], [3, 17]], point_labels=[1, 0]))
    assert out[7, 10].sum() > 0 and out[0, 29].sum() == 0  # tinted inside, untouched far outside
    assert out[15, 25, 1] > 150 and out[15, 25, 0] < 100  # positive point green
    assert out[17, 3, 0] > 150 and out[17, 3, 1] < 100  # negative point red


def test_color_labels_distinct_colours_black_background():
    labels = np.array([[0, 1, 2], [3, 4, 0], [5, 6, 7]], np.uint16)
    out = color_labels(labels)
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    assert (out[labels == 0] == 0).all()
    colours = {tuple(out[labels == v][0]) for v in range(1, 8)}
    assert len(colours) == 7 and (0, 0, 0) not in colours
    many = label_colors(200)
    assert len({tuple(c) for c in many}) == 200
    assert many.max(1).min() >= 150  # bright enough to read on black
    assert color_labels(np.zeros((2, 2), np.uint16)).max() == 0


def test_overlay_writes_each_score_at_its_box():
    image = np.zeros((80, 120, 3), np.uint8)
    masks = np.zeros((2, 80, 120), bool)
    masks[0, 40:60, 20:40] = True
    masks[1, 40:60, 70:100] = True
    boxes = [[20, 40, 39, 59], [70, 40, 99, 59]]
    plain = np.asarray(overlay(image, masks, boxes=boxes)).astype(int)
    scored = np.asarray(overlay(image, masks, boxes=boxes, scores=[0.87, 0.42])).astype(int)
    changed = np.abs(scored - plain).max(-1) > 0
    rows, cols = np.nonzero(changed)
    assert rows.max() < 40  # above the boxes, where there is room
    assert (cols >= 20).all() and cols.min() < 40 and cols.max() >= 70  # starting at each box's left edge
    assert scored[changed].min(-1).max() > 200  # white (anti-aliased) text
    # A box at the top edge gets its score below, inside the image.
    top = np.asarray(overlay(image, masks[:1], boxes=[[20, 0, 39, 10]], scores=[0.5])).astype(int)
    rows, _ = np.nonzero(np.abs(top - np.asarray(overlay(image, masks[:1], boxes=[[20, 0, 39, 10]]))).max(-1) > 0)
    assert rows.min() > 10


def test_empty_mask_is_reported_with_image_and_prompt(tiny_model_dir, image_files, tmp_path, caplog, monkeypatch):
    predict = SamPredictor.predict

    def second_mask_empty(self, *args, **kwargs):
        result = predict(self, *args, **kwargs)
        result.masks[1] = False
        return result

    monkeypatch.setattr(SamPredictor, "predict", second_mask_empty)
    args = PredictArguments(
        model=str(tiny_model_dir), images=str(image_files[0]), boxes="10,12,60,70;100,40,180,170",
        output_dir=str(tmp_path),
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="sam_hf"):
        report = run_prediction(args)
    entry = report[image_files[0].name]
    assert entry["empty_masks"] == [1] and entry["mask_area"][1] == 0
    (record,) = [r for r in caplog.records if "empty mask" in r.getMessage()]
    assert record.getMessage().startswith(f"{image_files[0].name}: prompt 1 (box [100.0, 40.0, 180.0, 170.0])")


def test_points_multimask_and_json_prompts_for_a_folder(tiny_model_dir, image_files, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in image_files:
        (folder / f.name).write_bytes(f.read_bytes())
    prompts = {
        image_files[0].name: {"points": [[[50, 60], [10, 10]]], "point_labels": [[1, 0]]},
        image_files[1].stem: {"boxes": [[5, 5, 50, 50]], "points": [[[20, 20]]]},
    }
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    args = PredictArguments(
        model=str(tiny_model_dir), images=str(folder), output_dir=str(tmp_path / "out"),
        prompts=str(tmp_path / "p.json"), multimask_output=True, device="cpu",
    )  # fmt: skip
    report = run_prediction(args)
    assert set(report) == {f.name for f in image_files}
    for f in image_files:
        entry = report[f.name]
        assert len(entry["scores"]) == 1 and len(entry["scores"][0]) == 3
        for j in range(3):
            assert (tmp_path / "out" / f.stem / f"mask_000_{j}.png").is_file()
    direct = SamPredictor.from_pretrained(str(tiny_model_dir))(
        Image.open(image_files[0]), points=[[[50, 60], [10, 10]]], point_labels=[[1, 0]], multimask_output=True
    )
    np.testing.assert_allclose(report[image_files[0].name]["scores"], direct.scores, atol=1e-6)


def test_prediction_errors_name_the_problem(tiny_model_dir, image_files, tmp_path):
    with pytest.raises(ValueError, match="item 1 '1,2,3' has 3 numbers, expected 4"):
        parse_coordinates("0,0,5,5;1,2,3", 4, "boxes")
    with pytest.raises(ValueError, match="Give prompts"):
        PredictArguments(model="m", images="i")
    with pytest.raises(ValueError, match="at most one box"):
        run_prediction(
            PredictArguments(
                model=str(tiny_model_dir),
                images=str(image_files[0]),
                boxes="0,0,5,5;1,1,9,9",
                points="3,3",
                output_dir=str(tmp_path),
            )  # fmt: skip
        )
    with pytest.raises(PromptError, match=rf"{image_files[0].name}: Box 0 lies|{image_files[0].name}: Box 0 \["):
        run_prediction(
            PredictArguments(
                model=str(tiny_model_dir), images=str(image_files[0]), boxes="0,0,999,5", output_dir=str(tmp_path)
            )
        )
    (tmp_path / "p.json").write_text(json.dumps({"other.png": {"boxes": [[0, 0, 5, 5]]}}))
    with pytest.raises(ValueError, match="no entry for image"):
        run_prediction(
            PredictArguments(
                model=str(tiny_model_dir),
                images=str(image_files[0]),
                prompts=str(tmp_path / "p.json"),
                output_dir=str(tmp_path),
            )  # fmt: skip
        )


def test_mask_input_refines_an_earlier_mask(tiny_model_dir, image_files, tmp_path):
    """predict.py run twice, as a labelling session: a box, then a negative click with the first mask fed back."""
    box = [10.0, 12.0, 60.0, 70.0]
    first = tmp_path / "first"
    run_prediction(PredictArguments(model=str(tiny_model_dir), images=str(image_files[0]), boxes="10,12,60,70",
                                    output_dir=str(first), device="cpu"))  # fmt: skip
    previous = first / image_files[0].stem / "mask_000.png"
    second = tmp_path / "second"
    args = PredictArguments(
        model=str(tiny_model_dir), images=str(image_files[0]), boxes="10,12,60,70", points="15,15",
        point_labels="0", mask_input=str(previous), output_dir=str(second), device="cpu",
    )  # fmt: skip
    report = run_prediction(args)[image_files[0].name]
    predictor = SamPredictor.from_pretrained(str(tiny_model_dir))
    predictor.set_image(Image.open(image_files[0]))
    expected = predictor.predict(
        boxes=[box],
        points=[[[15.0, 15.0]]],
        point_labels=[[0]],
        mask_input=predictor.mask_input_from_mask(np.asarray(Image.open(previous)) > 0),
    )
    written = np.asarray(Image.open(second / image_files[0].stem / "mask_000.png")) > 0
    np.testing.assert_array_equal(written, expected.masks[0, 0])
    np.testing.assert_allclose(report["scores"], expected.scores, atol=1e-6)
    with pytest.raises(ValueError, match="holds 32"):
        run_prediction(PredictArguments(model=str(tiny_model_dir), images=str(image_files[0].parent), boxes="1,1,5,5",
                                        mask_input=str(previous), output_dir=str(tmp_path / "x")))  # fmt: skip


def _decoded_on_window(model_dir, image, y0, x0, side, local_box):
    """The library's mask for `local_box` decoded on the square window at (y0, x0), pasted into the full image."""
    crop = SamPredictor.from_pretrained(str(model_dir))(image[y0 : y0 + side, x0 : x0 + side], boxes=[local_box])
    full = np.zeros(image.shape[:2], bool)
    full[y0 : y0 + side, x0 : x0 + side] = crop.masks[0, 0]
    return full


def _written_mask(out_dir, image_file):
    return np.asarray(Image.open(out_dir / image_file.stem / "mask_000.png")) > 0


def test_tiled_prediction_from_the_command_line(tiny_model_dir, image_files, tmp_path):
    """With --tile_size, a box is decoded on the 128-px tile holding it: the same mask as the library on that crop."""
    args = PredictArguments(model=str(tiny_model_dir), images=str(image_files[0]), boxes="140,150,180,190",
                            tile_size=128, tile_overlap=32, output_dir=str(tmp_path), device="cpu")  # fmt: skip
    run_prediction(args)
    image = np.asarray(Image.open(image_files[0]).convert("RGB"))
    # 256 px: tiles start at 0, 96 and 128 on each axis. The box (x 140..180, y 150..190) has a margin of 33 px in
    # the tile at (96, 96) (223 - 190) and of 12 px in the tile at (128, 128) (140 - 128): it is decoded on the first.
    expected = _decoded_on_window(tiny_model_dir, image, 96, 96, 128, [44.0, 54.0, 84.0, 94.0])
    np.testing.assert_array_equal(_written_mask(tmp_path, image_files[0]), expected)


def test_object_crop_prediction_from_the_command_line(tiny_model_dir, image_files, tmp_path):
    """With --object_crop_scale, each box is decoded on its own crop: the same mask as the library on that crop."""
    args = PredictArguments(model=str(tiny_model_dir), images=str(image_files[0]), boxes="140,150,159,169",
                            object_crop_scale=3, output_dir=str(tmp_path), device="cpu")  # fmt: skip
    run_prediction(args)
    image = np.asarray(Image.open(image_files[0]).convert("RGB"))
    # The 20 x 20 box centred on (150, 160): a 60-px crop from x = 120 and y = 130.
    expected = _decoded_on_window(tiny_model_dir, image, 130, 120, 60, [20.0, 20.0, 39.0, 39.0])
    assert expected.any() and not expected[:130].any()
    np.testing.assert_array_equal(_written_mask(tmp_path, image_files[0]), expected)
    with pytest.raises(ValueError, match="choose one"):
        PredictArguments(model="m", images="i", boxes="1,1,5,5", object_crop_scale=3, tile_size=128)


@pytest.mark.parametrize("shape", [(1, 600), (10, 20000)])
def test_an_image_too_elongated_for_the_model_is_refused_naming_the_file(tiny_model_dir, tmp_path, shape):
    """The tiny model resizes the longest side to 256 px: a short side below 1/512 of it would round to 0 px."""
    height, width = shape
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)
    args = PredictArguments(model=str(tiny_model_dir), images=str(path), boxes="0,0,5,1", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"strip\.png is {width}x{height} \(WxH\).*largest aspect ratio .* 512:1"):
        run_prediction(args)


def test_non_finite_pixels_are_refused_naming_the_file(tiny_model_dir, tmp_path):
    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    pixels[5, 7] = np.nan  # without the check, the whole image would be scaled to black
    Image.fromarray(pixels, mode="F").save(tmp_path / "float.tif")
    args = PredictArguments(
        model=str(tiny_model_dir), images=str(tmp_path / "float.tif"), boxes="1,1,30,30", output_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match=r"float\.tif: the image has 1 NaN or infinite pixel value\(s\)"):
        run_prediction(args)
    assert not (tmp_path / "float.json").exists()
