"""Pictures: the PNGs are checked for what they show (sizes, colours where the masks are), not only for existing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from conftest import REPO
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from scipy import ndimage  # noqa: E402

from sam_hf.core.masks import (  # noqa: E402
    boxes_from_instances,
    boxes_from_masks,  # noqa: E402
    mask_to_instances,
)
from sam_hf.core.scores import dice_per_object  # noqa: E402
from sam_hf.viz import plots as viz  # noqa: E402
from sam_hf.viz.runs import runs_table_markdown  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def bare_axes(image: np.ndarray, inches: float = 1.0, dpi: int = 100):
    """A figure with no margins whose single axes shows `image` exactly filling `inches * dpi` pixels square."""
    fig = Figure(figsize=(inches, inches), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image)
    ax.set_axis_off()
    return fig, ax


def save_and_read(fig, path: Path, dpi: float | None = None) -> np.ndarray:
    viz.save_figure(fig, path, dpi=dpi or fig.dpi)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)


def png_pixel(fig, ax, x: float, y: float, dpi: float | None = None) -> tuple[int, int]:
    """(row, col) in a PNG saved at `dpi` of the data point (x, y) of `ax` (after the figure was drawn)."""
    scale = (dpi or fig.dpi) / fig.dpi
    dx, dy = ax.transData.transform((x, y))
    return int((fig.bbox.height - dy) * scale), int(dx * scale)


def blend(under: np.ndarray, color, alpha: float) -> np.ndarray:
    return (1 - alpha) * np.asarray(under, np.float64) + alpha * 255 * np.asarray(color, np.float64)[:3]


def interior_pixel(mask: np.ndarray) -> tuple[int, int]:
    """(y, x) of the mask pixel farthest from the mask's edge."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(dist), dist.shape)
    return int(y), int(x)


def nuclei_example(nuclei_dir: Path, index: int = 0):
    stem = sorted(p.stem for p in (nuclei_dir / "images").iterdir())[index]
    image = np.asarray(Image.open(nuclei_dir / "images" / f"{stem}.png").convert("RGB"))
    instances = mask_to_instances(np.asarray(Image.open(nuclei_dir / "instances" / f"{stem}.png")), "instance")
    masks = instances[None] == np.arange(1, instances.max() + 1)[:, None, None]
    return stem, image, instances, masks


def write_run(path: Path, log_history: list[dict], base: dict | None = None, **state) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"log_history": log_history, **state}))
    if base is not None:
        (path / "base_eval_results.json").write_text(json.dumps(base))
    return path


def train_logs(steps_losses: list[tuple[int, float]]) -> list[dict]:
    return [{"step": s, "loss": v, "learning_rate": 1e-3, "epoch": s / 10} for s, v in steps_losses]


def eval_logs(rows: list[tuple[int, float, float]]) -> list[dict]:
    return [{"step": s, "eval_loss": loss, "eval_dice": dice, "eval_iou": dice * 0.8} for s, loss, dice in rows]


# --------------------------------------------------------------------------------------------------------------------
# Optional dependency
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sam_hf_imports_without_matplotlib():
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "import sam_hf\n"
        "try:\n"
        "    from sam_hf import viz\n"
        "except ImportError as err:\n"
        "    print('viz:', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sam_hf[viz]" in out.stdout


# --------------------------------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_show_mask_colour_exactly_where_the_mask_is(tmp_path, alpha):
    image = np.zeros((50, 50, 3), np.uint8)
    mask = np.zeros((50, 50), bool)
    mask[10:30, 20:40] = True  # rows 10..29, columns 20..39: 2x2 output pixels per image pixel
    fig, ax = bare_axes(image)
    viz.show_mask(mask, ax, color="red", alpha=alpha)
    png = save_and_read(fig, tmp_path / "mask.png")
    assert png.shape == (100, 100, 3)
    expected_red = round(255 * alpha)
    inside = png[21:59, 41:79]
    assert np.abs(inside - [expected_red, 0, 0]).max() <= 3  # 8-bit alpha compositing rounds
    outside = png.copy()
    outside[19:61, 39:81] = 0  # the mask region and a one-pixel margin of resampling
    assert outside.max() == 0
    # The same pixels through figure_to_array.
    assert np.array_equal(viz.figure_to_array(fig)[30, 60], png[30, 60])


def test_show_mask_default_colour_and_shapes():
    fig, ax = bare_axes(np.zeros((10, 10, 3), np.uint8), dpi=10)
    viz.show_mask(np.ones((1, 10, 10), bool), ax, alpha=1.0)  # (1, H, W) is accepted
    pixel = viz.figure_to_array(fig)[5, 5]
    assert np.abs(pixel - np.round(255 * np.asarray(viz.DEFAULT_MASK_COLOR))).max() <= 1
    with pytest.raises(ValueError, match="one mask"):
        viz.show_mask(np.ones((2, 10, 10), bool), ax)


def test_show_box_outlines_the_object_pixels(tmp_path):
    image = np.zeros((50, 50, 3), np.uint8)
    fig, ax = bare_axes(image)
    box = (10, 12, 29, 35)  # inclusive: object pixels x 10..29, y 12..35
    patch = viz.show_box(box, ax, color=(0, 1, 0), linewidth=1.0, label="7")
    assert (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()) == (9.5, 11.5, 20.0, 24.0)
    png = save_and_read(fig, tmp_path / "box.png")
    # Left edge at x = 9.5 -> output column 20; rows well inside the box's vertical span.
    left = png[30:70, 19:22]
    assert (left[..., 1] > 150).any(axis=1).all() and left[..., 0].max() < 60
    bottom = png[70:73, 30:55]  # bottom edge at y = 35.5 -> output row 72
    assert (bottom[..., 1] > 150).any(axis=0).all()
    assert png[48, 40].max() == 0  # inside the box: the black image
    assert png[80:, :].max() == 0 and png[:, 70:].max() == 0  # outside: nothing drawn
    # The label sits above the top-left corner (rows above y = 11.5 -> output row 23).
    assert png[5:23, 15:35, 1].max() > 150
    exclusive = viz.show_box(box, ax, inclusive=False)
    assert (exclusive.get_x(), exclusive.get_width()) == (10.0, 19.0)


def test_show_points_green_positive_red_negative(tmp_path):
    image = np.zeros((100, 100, 3), np.uint8)
    fig, ax = bare_axes(image, inches=2.0)  # 2 output pixels per image pixel
    points = [[25, 25], [75, 75], [75, 20]]
    viz.show_points(points, [1, 0, -10], ax)  # -10: a padding point, not drawn
    png = save_and_read(fig, tmp_path / "points.png")
    r, g, b = png[50, 50]
    assert g > 150 and r < 100 and b < 100, (r, g, b)
    r, g, b = png[150, 150]
    assert r > 200 and g < 60 and b < 60, (r, g, b)
    assert png[40, 150].max() == 0  # the padding point
    assert png[100, 100].max() == 0  # between the points
    with pytest.raises(ValueError, match="point labels"):
        viz.show_points(points, [1, 0], ax)


def test_object_colors_are_seeded_distinct_and_bright():
    colors = viz.object_colors(40, seed=3)
    assert colors.shape == (40, 3) and colors.min() >= 0 and colors.max() <= 1
    assert np.array_equal(colors, viz.object_colors(40, seed=3))
    assert not np.array_equal(colors, viz.object_colors(40, seed=4))
    luminance = colors @ [0.2126, 0.7152, 0.0722]
    assert luminance.min() >= viz.MIN_LUMINANCE - 1e-6
    neighbours = np.abs(np.diff(colors, axis=0)).sum(1)
    assert neighbours.min() > 0.2


def test_boxes_from_masks_match_boxes_from_instances(nuclei_dir):
    _, _, instances, masks = nuclei_example(nuclei_dir)
    np.testing.assert_array_equal(boxes_from_masks(masks), boxes_from_instances(instances))
    empty = boxes_from_masks(np.zeros((1, 4, 4), bool))
    assert np.isnan(empty).all()


def test_dice_per_object_by_hand():
    gt = np.zeros((3, 4, 4), bool)
    pred = np.zeros((3, 4, 4), bool)
    gt[0, :2] = True  # 8 pixels
    pred[0, :1] = True  # 4 pixels inside: Dice 2*4 / (4 + 8)
    gt[1, 0, 0] = True  # missed entirely: Dice 0
    # object 2: both empty scores 1 (as sam_hf.training.metrics does)
    np.testing.assert_allclose(dice_per_object(pred, gt), [8 / 12, 0.0, 1.0])


# --------------------------------------------------------------------------------------------------------------------
# Ground truth, predictions, automatic masks
# --------------------------------------------------------------------------------------------------------------------


def test_plot_ground_truth_on_demo_image(nuclei_dir, tmp_path):
    stem, image, _, masks = nuclei_example(nuclei_dir)
    fig = viz.plot_ground_truth(image, masks, title=stem)
    png = save_and_read(fig, tmp_path / "gt.png")
    width, height = fig.get_size_inches() * fig.dpi
    assert png.shape == (round(height), round(width), 3)
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 100  # not a constant picture
    plain, overlay = fig.axes
    colors = viz.object_colors(len(masks), 0)
    for k, mask in enumerate(masks):
        y, x = interior_pixel(mask)
        row, col = png_pixel(fig, overlay, x, y)
        # The image is resampled for display: bound the blend by the image's 3x3 neighbourhood.
        patch = image[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].reshape(-1, 3)
        low, high = blend(patch.min(0), colors[k], 0.5), blend(patch.max(0), colors[k], 0.5)
        assert ((png[row, col] >= low - 3) & (png[row, col] <= high + 3)).all(), (k, png[row, col], low, high)
        # The left panel shows the plain image there.
        row, col = png_pixel(fig, plain, x, y)
        assert ((png[row, col] >= patch.min(0) - 3) & (png[row, col] <= patch.max(0) + 3)).all()
    # Far from every object (and box), the overlay panel shows the plain image.
    distance = ndimage.distance_transform_edt(~masks.any(0))
    y, x = np.unravel_index(np.argmax(distance), distance.shape)
    row, col = png_pixel(fig, overlay, x, y)
    patch = image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3)
    assert ((png[row, col] >= patch.min(0) - 3) & (png[row, col] <= patch.max(0) + 3)).all()
    # One box per object, around its outermost pixels.
    boxes = boxes_from_masks(masks)
    patches = [p for p in overlay.patches if isinstance(p, Rectangle)]
    assert len(patches) == len(masks)
    for patch, box in zip(patches, boxes):
        assert patch.get_x() == box[0] - 0.5 and patch.get_y() == box[1] - 0.5
        assert patch.get_width() == box[2] - box[0] + 1 and patch.get_height() == box[3] - box[1] + 1
    assert stem in fig.get_suptitle()


def test_plot_ground_truth_inputs(nuclei_dir):
    _, image, instances, masks = nuclei_example(nuclei_dir)
    from_instance_map = viz.plot_ground_truth(image, instances, show_image=False)
    assert len(from_instance_map.axes) == 1
    assert f"{len(masks)} objects" in from_instance_map.axes[0].get_title()
    grayscale = viz.plot_ground_truth(Image.fromarray(image).convert("L"), masks, boxes=np.zeros((len(masks), 4)))
    assert len(grayscale.axes) == 2
    with pytest.raises(ValueError, match="do not match"):
        viz.plot_ground_truth(image[:100], masks)
    with pytest.raises(ValueError, match="one per mask"):
        viz.plot_ground_truth(image, masks, boxes=np.zeros((1, 4)))


def two_object_sample(name: str = "img-1") -> dict:
    image = np.full((64, 64, 3), 128, np.uint8)
    gt = np.zeros((2, 64, 64), bool)
    gt[0, 5:25, 5:25] = True
    gt[1, 35:60, 30:60] = True
    return {
        "image": image,
        "gt_masks": gt,
        "boxes": boxes_from_masks(gt),
        "points": [[[15, 15]], [[45, 47]]],
        "point_labels": [[1], [1]],
        "predictions": {"base": np.zeros_like(gt), "tuned": gt.copy()},
        "dice": {"base": [0.0, 0.0]},  # tuned: computed from the masks
        "name": name,
    }


def test_plot_base_vs_tuned_grid_titles_and_colours(tmp_path):
    samples = [two_object_sample("img-1"), two_object_sample("img-2")]
    fig = viz.plot_base_vs_tuned(samples)
    assert len(fig.axes) == 6  # 2 rows x (ground truth | base | tuned)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "img-1\nground truth, 2 objects" and titles[3].startswith("img-2\n")
    assert titles[1] == "base\nmean Dice 0.000" and titles[2] == "tuned\nmean Dice 1.000"
    png = save_and_read(fig, tmp_path / "grid.png")
    gt_ax, base_ax, tuned_ax = fig.axes[:3]
    # Ground truth in the object's own colour; predictions in the colour of their error class.
    expected = {
        gt_ax: viz.object_colors(2, 0)[0],
        base_ax: viz.ERROR_COLORS[viz.MISSED],  # base predicted nothing: object 0 is missed
        tuned_ax: viz.ERROR_COLORS[viz.CORRECT],  # tuned predicted the ground truth exactly
    }
    for ax, color in expected.items():
        row, col = png_pixel(fig, ax, 8, 20)  # inside object 0, away from its point and box
        assert np.abs(png[row, col] - blend([128, 128, 128], color, 0.5)).max() <= 3, ax.get_title()
    # Point prompts are drawn in every column: green at the positive point.
    for ax in (gt_ax, base_ax, tuned_ax):
        row, col = png_pixel(fig, ax, 15, 15)
        assert png[row, col, 1] > png[row, col, 0] + 50
    # Each box is labelled with its object's Dice in the model columns only.
    assert [t.get_text() for t in tuned_ax.texts] == ["1.00", "1.00"]
    assert [t.get_text() for t in base_ax.texts] == ["0.00", "0.00"]
    assert len(gt_ax.texts) == 0
    # One legend says what the boxes, colours and numbers are.
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "box prompt", "point prompt", "correct", "false positive", "missed (false negative)", "object's Dice",
    ]  # fmt: skip


def test_error_map_and_its_colours_by_hand(tmp_path):
    gt = np.zeros((2, 40, 40), bool)
    gt[0, 5:15, 5:15] = True  # object 0: predicted shifted right by 5 columns
    gt[1, 25:35, 25:35] = True  # object 1: predicted exactly
    pred = np.zeros_like(gt)
    pred[0, 5:15, 10:20] = True
    pred[1] = gt[1]
    errors = viz.error_map(pred, gt)
    expected = np.zeros((40, 40), np.uint8)
    expected[5:15, 5:10] = viz.MISSED
    expected[5:15, 10:15] = viz.CORRECT
    expected[5:15, 15:20] = viz.FALSE_POSITIVE
    expected[25:35, 25:35] = viz.CORRECT
    np.testing.assert_array_equal(errors, expected)
    # In the drawn grid, the false-positive colour is exactly on those pixels (one pixel of resampling margin).
    image = np.zeros((40, 40, 3), np.uint8)
    sample = {"image": image, "gt_masks": gt, "predictions": {"tuned": pred}}
    fig = viz.plot_base_vs_tuned(sample, panel_size=4.0)
    png = save_and_read(fig, tmp_path / "errors.png")
    ax = fig.axes[1]
    magenta = blend([0, 0, 0], viz.ERROR_COLORS[viz.FALSE_POSITIVE], 0.5)
    for y in range(40):
        for x in range(40):
            row, col = png_pixel(fig, ax, x, y)
            is_magenta = np.abs(png[row, col] - magenta).max() <= 3
            near_fp = (np.abs(np.argwhere(expected == viz.FALSE_POSITIVE) - [y, x]).max(1) <= 1).any()
            if expected[y, x] == viz.FALSE_POSITIVE and 6 <= y <= 13 and 16 <= x <= 18:
                assert is_magenta, (y, x, png[row, col])  # inside, away from the box outline and the label
            elif not near_fp:
                assert not is_magenta, (y, x, png[row, col])
    with pytest.raises(ValueError, match="differ"):
        viz.error_map(pred, gt[:, :10])


def test_plot_base_vs_tuned_labels_few_objects_inside_the_axes():
    # 15 objects, more than MAX_LABELLED_OBJECTS: only the 5 with the lowest Dice are labelled, inside the axes,
    # including objects touching the top, left and right edges.
    image = np.full((60, 150, 3), 40, np.uint8)
    gt = np.zeros((15, 60, 150), bool)
    for i in range(15):
        x = i * 10
        gt[i, 0 if i % 2 else 50 : 10 if i % 2 else 60, x : x + 8] = True
    dice = np.linspace(1.0, 0.3, 15)  # the last five are the lowest
    sample = {"image": image, "gt_masks": gt, "predictions": {"tuned": gt}, "dice": {"tuned": dice}}
    fig = viz.plot_base_vs_tuned(sample)
    ax = fig.axes[1]
    assert "(5 lowest labelled)" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{d:.2f}" for d in dice[-5:])
    fig.canvas.draw()
    inside = ax.get_window_extent()
    for text in ax.texts:
        box = text.get_window_extent()
        assert inside.x0 - 1 <= box.x0 and box.x1 <= inside.x1 + 1, text.get_text()
        assert inside.y0 - 1 <= box.y0 and box.y1 <= inside.y1 + 1, text.get_text()


def test_plot_base_vs_tuned_single_model_and_max_objects(tmp_path):
    sample = two_object_sample()
    sample["predictions"] = {"tuned": sample["predictions"]["tuned"]}
    del sample["dice"]
    fig = viz.plot_base_vs_tuned(sample, max_objects=1)
    assert len(fig.axes) == 2
    assert "1 of 2 objects shown" in fig.axes[0].get_title()
    assert fig.axes[1].get_title() == "tuned\nmean Dice 1.000"  # the mean is over all objects
    png = save_and_read(fig, tmp_path / "single.png")
    row, col = png_pixel(fig, fig.axes[1], 50, 50)  # inside object 1, which is not drawn
    assert np.abs(png[row, col] - 128).max() <= 3
    bad = two_object_sample()
    bad["predictions"]["base"] = bad["predictions"]["base"][:1]
    with pytest.raises(ValueError, match="base"):
        viz.plot_base_vs_tuned([bad])
    with pytest.raises(ValueError, match="gt_masks"):
        viz.plot_base_vs_tuned([{"image": sample["image"], "predictions": {}}])


def test_plot_automatic_masks_draws_largest_first(tmp_path):
    import torch

    image = np.zeros((100, 100, 3), np.uint8)
    small = np.zeros((100, 100), bool)
    small[40:60, 40:60] = True
    large = np.zeros((100, 100), bool)
    large[10:90, 10:90] = True
    # Pipeline-style output, smallest first: the small mask must still end up on top.
    output = {"masks": [torch.from_numpy(small), torch.from_numpy(large)], "scores": torch.tensor([0.9, 0.8])}
    fig = viz.plot_automatic_masks(image, output, alpha=1.0)
    assert "2 masks" in fig.axes[1].get_title() and "0.80 to 0.90" in fig.axes[1].get_title()
    png = save_and_read(fig, tmp_path / "auto.png")
    large_color, small_color = viz.object_colors(2, 0) * 255  # colours follow the area order
    ax = fig.axes[1]
    row, col = png_pixel(fig, ax, 50, 50)
    assert np.abs(png[row, col] - small_color).max() <= 2
    row, col = png_pixel(fig, ax, 20, 20)
    assert np.abs(png[row, col] - large_color).max() <= 2
    row, col = png_pixel(fig, ax, 5, 5)
    assert png[row, col].max() <= 2
    empty = viz.plot_automatic_masks(image, [], show_image=False)
    assert "0 masks" in empty.axes[0].get_title()


# --------------------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------------------


def test_plot_loss_curves_from_hand_written_state(tmp_path):
    logs = train_logs([(10, 1.2), (20, 0.9), (30, 0.8), (40, 0.7)])
    logs.insert(2, eval_logs([(20, 0.85, 0.50)])[0])
    logs.append(eval_logs([(40, 0.75, 0.62)])[0])
    logs.append({"step": 40, "train_loss": 0.9, "train_runtime": 3.0})  # the end-of-training summary: not a point
    base = {"base_eval_loss": 1.1, "base_eval_dice": 0.3, "base_eval_iou": 0.2, "base_eval_box_baseline_dice": 0.84}
    run = write_run(tmp_path / "my-run", logs, base=base, best_global_step=40)
    fig = viz.plot_loss_curves(run)
    assert fig.get_suptitle() == "my-run"
    loss_ax, eval_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.lines}
    np.testing.assert_array_equal(lines["train loss"].get_xdata(), [10, 20, 30, 40])
    np.testing.assert_array_equal(lines["train loss"].get_ydata(), [1.2, 0.9, 0.8, 0.7])
    np.testing.assert_array_equal(lines["eval loss"].get_ydata(), [0.85, 0.75])
    np.testing.assert_array_equal(lines["base model eval loss"].get_xydata(), [[0, 1.1]])
    lines = {line.get_label(): line for line in eval_ax.lines}
    np.testing.assert_array_equal(lines["eval Dice"].get_xdata(), [20, 40])
    np.testing.assert_array_equal(lines["eval Dice"].get_ydata(), [0.50, 0.62])
    assert "base model Dice" in lines and "best checkpoint (step 40)" in lines
    # The filled-box baseline is a horizontal reference, and the score axis shows all of [0, 1].
    baseline = lines['"fill the box" baseline Dice (0.840)']
    assert set(baseline.get_ydata()) == {0.84}
    assert eval_ax.get_ylim() == (0.0, 1.0)
    png = save_and_read(fig, tmp_path / "loss.png", dpi=80)
    width, height = fig.get_size_inches() * 80
    assert png.shape == (round(height), round(width), 3)
    assert png.std() > 10
    # Train loss in blue somewhere on the loss panel.
    assert ((png[..., 2] > 150) & (png[..., 0] < 100)).sum() > 50
    # The same from the trainer_state.json path and from the loaded dict.
    assert len(viz.plot_loss_curves(run / "trainer_state.json").axes) == 2
    assert len(viz.plot_loss_curves(json.loads((run / "trainer_state.json").read_text())).axes) == 2


def test_plot_loss_curves_without_eval_and_from_checkpoints(tmp_path):
    run = tmp_path / "no-eval"
    for step in (5, 10):  # an interrupted run: only checkpoints hold a trainer state
        write_run(run / f"checkpoint-{step}", train_logs([(s, 1.0 / s) for s in range(1, step + 1)]))
    fig = viz.plot_loss_curves(run)
    assert len(fig.axes) == 1
    assert fig.get_suptitle() == "no-eval"
    (line,) = [line for line in fig.axes[0].lines if line.get_label() == "train loss"]
    assert len(line.get_xdata()) == 10  # the latest checkpoint
    with pytest.raises(ValueError, match="nothing to plot"):
        viz.plot_loss_curves({"log_history": []})
    with pytest.raises(FileNotFoundError):
        viz.plot_loss_curves(tmp_path / "missing")


@pytest.fixture
def three_runs(tmp_path):
    # run a: Dice 0.50, 0.72, 0.70 -> best 0.72 at step 200, final 0.70; eval loss best 0.60 at step 200
    a = write_run(tmp_path / "lr-1e-3", eval_logs([(100, 0.90, 0.50), (200, 0.60, 0.72), (300, 0.65, 0.70)]))
    # run b: Dice 0.65, 0.60, 0.65 -> a tie: the earliest step (100) wins; eval loss best 0.55 at step 300
    b = write_run(tmp_path / "lr-1e-4", eval_logs([(100, 0.80, 0.65), (200, 0.70, 0.60), (300, 0.55, 0.65)]))
    c = write_run(tmp_path / "no-eval", train_logs([(1, 1.0), (2, 0.5)]))
    return a, b, c


def test_compare_runs_table_by_hand(three_runs):
    fig, rows = viz.compare_runs(three_runs)
    assert [row["run"] for row in rows] == ["lr-1e-3", "lr-1e-4", "no-eval"]
    assert rows[0] == {
        "run": "lr-1e-3",
        "metric": "eval_dice",
        "best": 0.72,
        "best_step": 200,
        "final": 0.70,
        "final_step": 300,
        "num_evals": 3,
    }
    assert (rows[1]["best"], rows[1]["best_step"], rows[1]["final"]) == (0.65, 100, 0.65)
    assert (rows[2]["best"], rows[2]["best_step"], rows[2]["final"], rows[2]["num_evals"]) == (None, None, None, 0)
    assert runs_table_markdown(rows) == (
        "| run | best eval_dice | step of best | final eval_dice |\n"
        "|---|---|---|---|\n"
        "| lr-1e-3 | **0.7200** | 200 | 0.7000 |\n"
        "| lr-1e-4 | 0.6500 | 100 | 0.6500 |\n"
        "| no-eval | n/a | n/a | n/a |\n"
    )
    loss_ax, dice_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["lr-1e-3", "lr-1e-4"]
    stars = [line for line in dice_ax.lines if line.get_marker() == "*"]
    assert [tuple(s.get_xydata()[0]) for s in stars] == [(200, 0.72), (100, 0.65)]

    # Lower is better for a loss; "loss" without the eval_ prefix means eval_loss.
    _, rows = viz.compare_runs(three_runs[:2], metric="loss", labels=["a", "b"])
    assert [(r["run"], r["metric"], r["best"], r["best_step"], r["final"]) for r in rows] == [
        ("a", "eval_loss", 0.60, 200, 0.65),
        ("b", "eval_loss", 0.55, 300, 0.55),
    ]
    assert "| b | **0.5500** | 300 | 0.5500 |" in runs_table_markdown(rows)
    with pytest.raises(ValueError, match="labels"):
        viz.compare_runs(three_runs, labels=["only-one"])


@pytest.mark.slow
def test_compare_runs_script_end_to_end(three_runs, tmp_path):
    output = tmp_path / "out" / "comparison.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "compare_runs.py"), *map(str, three_runs[:2])]
    cmd += ["--output", str(output), "--metric", "eval_dice", "--dpi", "50"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| lr-1e-3 | **0.7200** | 200 | 0.7000 |" in out.stdout
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert table.splitlines()[0] == "| run | best eval_dice | step of best | final eval_dice |"
    with Image.open(output) as im:
        png = np.asarray(im.convert("RGB")).astype(np.int32)
    assert png.shape == (round(3.9 * 50), round(11.0 * 50), 3)
    assert png.std() > 10
    # Both runs' colours (matplotlib's C0 blue and C1 orange) are in the picture.
    assert (np.abs(png - [31, 119, 180]).max(-1) < 30).sum() > 20
    assert (np.abs(png - [255, 127, 14]).max(-1) < 30).sum() > 20


@pytest.mark.slow
def test_plots_of_a_real_run(trained_run, tmp_path):
    out, metrics = trained_run
    fig = viz.plot_loss_curves(out)
    assert len(fig.axes) == 2
    lines = {line.get_label(): line for line in fig.axes[1].lines}
    assert lines["eval Dice"].get_xdata().tolist() == [3, 6]
    assert lines["base model Dice"].get_ydata()[0] == pytest.approx(metrics["base_eval_dice"])
    viz.save_figure(fig, tmp_path / "loss_curves.png")
    _, rows = viz.compare_runs([out], labels=["demo"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert rows[0]["best"] == pytest.approx(state["best_metric"])
    assert rows[0]["best_step"] == state["best_global_step"]


def test_panel_names_keep_the_window_they_show():
    stem = "fe80a2cf3c93dafad8c364fdd1646b0ba4db056cdb7bdb81474f957064812bba"
    assert viz._short(f"{stem}#12", 24) == "fe80a2cf3c93dafad8...#12"
    assert viz._short(f"{stem}@y0x128", 24) == "fe80a2cf3c93da...@y0x128"
    assert viz._short(stem, 24) == "fe80a2cf3c93dafad8c36..."
    assert viz._short("short#1", 24) == "short#1"
