"""Pictures of masks, prompts, predictions and training runs, drawn with matplotlib (the optional `viz` extra).

Every `plot_*` function builds a `matplotlib.figure.Figure` directly on the non-interactive Agg canvas, without
pyplot: nothing is shown and no global plotting state is touched, so the functions are safe in training scripts,
servers and tests. Save a figure with `save_figure`.

```python
from sam_hf.viz import plot_ground_truth, plot_loss_curves, save_figure

save_figure(plot_ground_truth(image, masks), "ground_truth.png")
save_figure(plot_loss_curves("runs/demo"), "runs/demo/loss_curves.png")
```

Conventions: images are `(H, W, 3)` uint8 arrays or anything `sam_hf.core.to_rgb_array` accepts (PIL images,
grayscale, 16-bit); masks are `(K, H, W)` boolean arrays, one per object; boxes are `(K, 4)` xyxy in pixels,
inclusive (the outermost object pixels, as `sam_hf.core.boxes_from_instances` returns them).

`import sam_hf` never imports this module, so sam_hf works without matplotlib; `from sam_hf import viz` needs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.images import to_rgb_array
from ..core.masks import _as_masks, boxes_from_masks
from ..core.scores import dice_per_object
from .runs import (
    _eval_key,
    _run_labels,
    _series,
    _state_path,
    has_loss_curves,
    load_trainer_state,
    metric_summary,
)

logger = logging.getLogger(__name__)


try:
    from matplotlib import colors as mcolors
    from matplotlib import patheffects
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "sam_hf.viz needs matplotlib, which is an optional extra: pip install 'sam_hf[viz]' (or pip install "
        "matplotlib)."
    ) from err


# The colour of a single mask in the original SAM notebooks.
DEFAULT_MASK_COLOR = (30 / 255, 144 / 255, 1.0)


POSITIVE_POINT_COLOR = "limegreen"


NEGATIVE_POINT_COLOR = "red"


# Objects above this count get no per-box label: the labels would hide the masks.
MAX_LABELLED_OBJECTS = 12


# On a more crowded image, the prediction panels label only this many objects: those with the lowest Dice.
CROWDED_LABELS = 5


# Pixel classes of `error_map` and their colours in `plot_base_vs_tuned`.
CORRECT, FALSE_POSITIVE, MISSED = 1, 2, 3


ERROR_COLORS = {
    CORRECT: (0.30, 0.85, 0.30),  # green
    FALSE_POSITIVE: (1.0, 0.25, 0.80),  # magenta
    MISSED: (0.25, 0.65, 1.0),  # light blue
}


ERROR_NAMES = {CORRECT: "correct", FALSE_POSITIVE: "false positive", MISSED: "missed (false negative)"}


# Box prompts in the prediction grid: white with a black edge, visible on dark and light images alike.
PROMPT_BOX_COLOR = "white"


NAME_CHARS = 28


# Relative luminance below which object colours are lightened.
MIN_LUMINANCE = 0.45


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panel_height(panel_size: float, aspect: float, title_lines: int = 1) -> float:
    """Height in inches of an image panel `panel_size` wide: the image (less layout padding) and its title."""
    return (panel_size - 0.1) * aspect + 0.15 + 0.25 * title_lines


def _as_boxes(boxes: Any, k: int | None = None, what: str = "boxes") -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
    if k is not None and len(arr) != k:
        raise ValueError(f"Expected {k} {what} (one per mask), got {len(arr)}.")
    return arr


def _short(name: str, limit: int = NAME_CHARS) -> str:
    """`name` cut to `limit` characters, keeping the window suffix `sam_hf.data.windows` adds to a tile (`@y0x128`) or
    an object crop (`#3`): it says which part of the image a panel shows."""
    if len(name) <= limit:
        return name
    cut = max(name.rfind("#"), name.rfind("@"))
    suffix = name[cut:] if cut > 0 and len(name) - cut <= limit // 2 else ""
    return name[: limit - 3 - len(suffix)] + "..." + suffix


def _image_axes(ax: Axes, image: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def object_colors(n: int, seed: int | None = 0) -> np.ndarray:
    """`n` bright, well-separated RGB colours in `[0, 1]`, shape `(n, 3)`.

    Hues follow the golden-ratio sequence from a seeded random start, so neighbouring indices get distant hues and
    the same `(n, seed)` always gives the same colours. Dark hues are lightened, so every colour reads on dark
    (fluorescence) and light (brightfield, histology) images alike.

    Args:
        n (`int`): how many colours.
        seed (`int`, *optional*, defaults to 0): seed of the starting hue; `None` starts at red.
    """
    start = 0.0 if seed is None else float(np.random.default_rng(seed).random())
    index = np.arange(n)
    hue = (start + index * 0.6180339887498949) % 1.0
    saturation = 0.85 - 0.25 * (index % 3) / 2
    rgb = mcolors.hsv_to_rgb(np.stack([hue, saturation, np.ones(n)], axis=-1).reshape(-1, 3))
    # Lighten dark hues (blues, purples) towards white so that every colour stands out on dark images too.
    luminance = rgb @ np.array([0.2126, 0.7152, 0.0722])
    lift = np.clip((MIN_LUMINANCE - luminance) / (1 - luminance), 0, 1)[:, None]
    return rgb + lift * (1 - rgb)


def _overlay(masks: np.ndarray, colors: np.ndarray, alpha: float) -> np.ndarray:
    """One RGBA layer for all masks, painted in order (later masks on top of earlier ones)."""
    k, h, w = masks.shape
    rgba = np.zeros((h, w, 4), np.float32)
    for mask, color in zip(masks, colors):
        rgba[mask, :3] = color[:3]
        rgba[mask, 3] = alpha
    return rgba


def error_map(pred_masks: Any, gt_masks: Any) -> np.ndarray:
    """Where a prediction is right and wrong, pixel by pixel, over the union of all objects.

    A pixel is `CORRECT` (1) where some object is predicted and some object is true, `FALSE_POSITIVE` (2) where
    some object is predicted but none is true, `MISSED` (3) where some object is true but none is predicted, and 0
    elsewhere. A prediction that spills into a neighbouring object therefore counts as correct here; its own
    per-object Dice (`dice_per_object`) still shows the error.

    Args:
        pred_masks: `(K, H, W)` predicted masks (or one `(H, W)` mask).
        gt_masks: `(K', H, W)` ground-truth masks of the same image (or one `(H, W)` mask).

    Returns:
        `np.ndarray` of shape `(H, W)`, dtype uint8, values in {0, 1, 2, 3}.
    """
    pred = _as_masks(pred_masks, "predicted masks")
    gt = _as_masks(gt_masks, "ground-truth masks")
    if pred.shape[1:] != gt.shape[1:]:
        raise ValueError(f"Predicted masks {pred.shape[1:]} and ground-truth masks {gt.shape[1:]} differ in (H, W).")
    predicted, true = pred.any(0), gt.any(0)
    out = np.zeros(gt.shape[1:], np.uint8)
    out[predicted & true] = CORRECT
    out[predicted & ~true] = FALSE_POSITIVE
    out[~predicted & true] = MISSED
    return out


def show_mask(mask: Any, ax: Axes, color: Any = None, alpha: float = 0.5) -> Any:
    """Draw one mask as a translucent colour layer on `ax`, aligned with an image drawn by `ax.imshow`.

    Args:
        mask: `(H, W)` boolean mask (a `(1, H, W)` array is accepted).
        ax (`matplotlib.axes.Axes`): the axes to draw on.
        color (*optional*): any matplotlib colour; defaults to the blue of the original SAM notebooks.
        alpha (`float`, *optional*, defaults to 0.5): opacity of the mask; 1 hides the image under it.

    Returns:
        The `AxesImage` of the layer.
    """
    mask = _as_masks(mask, "mask")
    if len(mask) != 1:
        raise ValueError(f"show_mask draws one mask, got {len(mask)}; loop over them or use plot_ground_truth.")
    rgb = np.asarray(mcolors.to_rgb(DEFAULT_MASK_COLOR if color is None else color))
    return ax.imshow(_overlay(mask, rgb[None], alpha), interpolation="nearest")


def show_box(
    box: Any,
    ax: Axes,
    color: Any = "lime",
    label: str | None = None,
    linewidth: float = 1.5,
    inclusive: bool = True,
) -> Rectangle:
    """Draw one xyxy box outline on `ax`, optionally with a small label at its top-left corner.

    Args:
        box: `[x0, y0, x1, y1]` in pixels.
        ax (`matplotlib.axes.Axes`): the axes to draw on.
        color (*optional*, defaults to `"lime"`): edge colour (and label background).
        label (`str`, *optional*): text drawn at the top-left corner.
        linewidth (`float`, *optional*, defaults to 1.5): edge width in points.
        inclusive (`bool`, *optional*, defaults to `True`): the corners are the outermost object pixels (as in
            `boxes_from_instances`), so the outline runs around those pixels, half a pixel outside their centres.
            With `False` the outline goes through the given coordinates, as in the original SAM notebooks.

    Returns:
        The `Rectangle` patch.
    """
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    pad = 0.5 if inclusive else 0.0
    patch = Rectangle(
        (x0 - pad, y0 - pad), x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, fill=False, edgecolor=color, linewidth=linewidth
    )
    ax.add_patch(patch)
    if label:
        # Above the top-left corner, except where that would leave the image: then right-aligned or inside.
        (xmin, xmax), (ymin, ymax) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        at_right = x0 > xmin + 0.85 * (xmax - xmin)
        at_top = y0 - pad < ymin + 0.04 * (ymax - ymin)  # image rows grow downwards
        ax.text(
            x1 + pad if at_right else x0 - pad,
            y0 - pad,
            label,
            fontsize=6,
            color="black",
            va="top" if at_top else "bottom",
            ha="right" if at_right else "left",
            clip_on=True,
            bbox={"facecolor": color, "edgecolor": "none", "alpha": 0.85, "pad": 1.0},
        )
    return patch


def show_points(points: Any, labels: Any, ax: Axes, marker_size: float = 150.0) -> None:
    """Draw point prompts as stars: positive (label 1) in green, negative (label 0) in red, edged in white.

    Args:
        points: `(..., 2)` xy pixel coordinates, e.g. `(P, 2)` or `(N, P, 2)`.
        labels: labels of the same leading shape, 1 positive and 0 negative; `None` means all positive. Other values
            (such as the `-10` that transformers uses for padding points) are skipped.
        ax (`matplotlib.axes.Axes`): the axes to draw on.
        marker_size (`float`, *optional*, defaults to 150): marker area in points squared.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    lab = np.ones(len(pts)) if labels is None else np.asarray(labels).reshape(-1)
    if len(lab) != len(pts):
        raise ValueError(f"Got {len(pts)} points but {len(lab)} point labels.")
    for value, color in ((1, POSITIVE_POINT_COLOR), (0, NEGATIVE_POINT_COLOR)):
        sel = pts[lab == value]
        if len(sel):
            ax.scatter(
                sel[:, 0],
                sel[:, 1],
                color=color,
                marker="*",
                s=marker_size,
                edgecolor="white",
                linewidth=1.0,
                zorder=3,
            )


def _draw_objects(
    ax: Axes,
    masks: np.ndarray,
    colors: np.ndarray,
    boxes: np.ndarray | None,
    alpha: float,
    labels: Sequence[str] | None = None,
) -> None:
    if len(masks):
        ax.imshow(_overlay(masks, colors, alpha), interpolation="nearest")
    if boxes is None:
        return
    linewidth = 1.2 if len(boxes) <= 20 else 0.8
    for i, box in enumerate(boxes):
        if np.isfinite(box).all():
            show_box(box, ax, color=colors[i], label=labels[i] if labels else None, linewidth=linewidth)


def plot_ground_truth(
    image: Any,
    masks: Any,
    boxes: Any = None,
    show_image: bool = True,
    title: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    panel_size: float = 4.5,
) -> Figure:
    """An image with its ground-truth masks, each object in its own colour, and the box of each object.

    Args:
        image: `(H, W, 3)` uint8 array, PIL image, or anything `sam_hf.core.to_rgb_array` accepts.
        masks: `(K, H, W)` boolean masks, one per object, or an `(H, W)` instance map (0 = background).
        boxes (*optional*): `(K, 4)` inclusive xyxy boxes; by default the exact box of each mask
            (`boxes_from_masks`), the box an evaluation prompt uses.
        show_image (`bool`, *optional*, defaults to `True`): put the plain image in a panel to the left.
        title (`str`, *optional*): a title above the figure, e.g. the image name.
        alpha (`float`, *optional*, defaults to 0.5): mask opacity.
        seed (`int`, *optional*, defaults to 0): seed of the object colours (`object_colors`).
        panel_size (`float`, *optional*, defaults to 4.5): width of each panel in inches.

    Returns:
        `matplotlib.figure.Figure`.
    """
    rgb = to_rgb_array(image)
    arr = np.asarray(masks)
    if arr.ndim == 2 and arr.dtype != bool:
        ids = np.unique(arr)
        ids = ids[ids != 0]
        arr = arr[None] == ids[:, None, None]
    masks = _as_masks(arr)
    if masks.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"Masks of size {masks.shape[1:]} do not match the {rgb.shape[:2]} image (H, W).")
    boxes = boxes_from_masks(masks) if boxes is None else _as_boxes(boxes, len(masks))
    colors = object_colors(len(masks), seed)
    h, w = rgb.shape[:2]
    ncols = 2 if show_image else 1
    fig = _new_figure(panel_size * ncols, _panel_height(panel_size, h / w) + (0.35 if title else 0.0))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    if show_image:
        _image_axes(axes[0], rgb, f"image ({w}x{h})")
    ax = axes[-1]
    _image_axes(ax, rgb, f"ground truth: {len(masks)} object{'s' if len(masks) != 1 else ''} and their boxes")
    labels = [str(i + 1) for i in range(len(masks))] if len(masks) <= MAX_LABELLED_OBJECTS else None
    _draw_objects(ax, masks, colors, boxes, alpha, labels)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _sample_arrays(sample: Mapping[str, Any], index: int) -> dict[str, Any]:
    where = f"sample {index}" + (f" ({sample['name']})" if sample.get("name") else "")
    for key in ("image", "gt_masks", "predictions"):
        if key not in sample:
            raise ValueError(f"{where} has no {key!r}; expected keys image, gt_masks, boxes, predictions[, dice].")
    image = to_rgb_array(sample["image"])
    gt = _as_masks(sample["gt_masks"], f"gt_masks of {where}")
    if gt.shape[1:] != image.shape[:2]:
        raise ValueError(f"{where}: gt_masks of size {gt.shape[1:]} do not match the {image.shape[:2]} image.")
    boxes = sample.get("boxes")
    boxes = boxes_from_masks(gt) if boxes is None else _as_boxes(boxes, len(gt), f"boxes of {where}")
    predictions, dice = {}, {}
    for model, pred in sample["predictions"].items():
        pred = _as_masks(pred, f"predictions[{model!r}] of {where}")
        if pred.shape != gt.shape:
            raise ValueError(f"{where}: predictions[{model!r}] has shape {pred.shape}, gt_masks {gt.shape}.")
        predictions[model] = pred
        given = (sample.get("dice") or {}).get(model)
        dice[model] = dice_per_object(pred, gt) if given is None else np.asarray(given, np.float64).reshape(-1)
        if len(dice[model]) != len(gt):
            raise ValueError(f"{where}: dice[{model!r}] has {len(dice[model])} values for {len(gt)} objects.")
    points, labels = sample.get("points"), sample.get("point_labels")
    if points is not None:
        points = np.asarray(points, np.float64)
        labels = np.ones(points.shape[:-1]) if labels is None else np.asarray(labels).reshape(points.shape[:-1])
    name = sample.get("name")
    return {
        "image": image,
        "gt": gt,
        "boxes": boxes,
        "predictions": predictions,
        "dice": dice,
        "points": points,
        "point_labels": labels,
        "name": str(name) if name is not None else None,
    }


def _halo(linewidth: float = 2.0) -> list:
    return [patheffects.withStroke(linewidth=linewidth, foreground="black")]


def _prompt_box(ax: Axes, box: np.ndarray, linewidth: float) -> None:
    """A box prompt in `PROMPT_BOX_COLOR` with a thin black edge, around the object's outermost pixels."""
    patch = show_box(box, ax, color=PROMPT_BOX_COLOR, linewidth=linewidth)
    patch.set_path_effects([patheffects.Stroke(linewidth=linewidth + 1.0, foreground="black"), patheffects.Normal()])


def _prompts(ax: Axes, boxes: np.ndarray, points: Any, point_labels: Any, linewidth: float) -> None:
    for box in boxes:
        if np.isfinite(box).all():
            _prompt_box(ax, box, linewidth)
    if points is not None:
        show_points(points, point_labels, ax, marker_size=80.0)


def _box_label(ax: Axes, box: np.ndarray, text: str, shape: tuple[int, int], fontsize: float = 7.5) -> Any:
    """White text with a black halo at a box, kept inside the image: above the box, or below it at the top edge,
    anchored at the box side nearer the image centre so that the text runs inward."""
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    right = (x0 + x1) / 2 > w / 2
    x = min(x1 + 0.5, w - 0.5) if right else max(x0 - 0.5, -0.5)
    if y0 - 0.5 > 0.1 * h:  # room above the box
        y, va = y0 - 0.5, "bottom"
    elif y1 + 0.5 < 0.9 * h:  # the box touches the top: below it
        y, va = y1 + 0.5, "top"
    else:  # the box spans the image: inside its top edge
        y, va = max(y0 - 0.5, -0.5), "top"
    return ax.text(
        x,
        y,
        text,
        fontsize=fontsize,
        fontweight="bold",
        color="white",
        ha="right" if right else "left",
        va=va,
        clip_on=True,
        path_effects=_halo(),
    )


def _error_layer(errors: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*errors.shape, 4), np.float32)
    for value, color in ERROR_COLORS.items():
        rgba[errors == value, :3] = color
        rgba[errors == value, 3] = alpha
    return rgba


def _grid_legend(fig: Figure, with_points: bool) -> None:
    box = Patch(facecolor="none", edgecolor=PROMPT_BOX_COLOR, linewidth=1.2, label="box prompt")
    box.set_path_effects([patheffects.Stroke(linewidth=2.5, foreground="black"), patheffects.Normal()])
    handles = [box]
    if with_points:
        handles.append(
            Line2D(
                [],
                [],
                marker="*",
                linestyle="none",
                markersize=10,
                color=POSITIVE_POINT_COLOR,
                markeredgecolor="white",
                label="point prompt",
            )  # fmt: skip
        )
    handles += [Patch(facecolor=ERROR_COLORS[v], label=ERROR_NAMES[v]) for v in (CORRECT, FALSE_POSITIVE, MISSED)]
    handles.append(
        Line2D([], [], marker="$0.85$", linestyle="none", markersize=17, color="black", label="object's Dice")
    )
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8, frameon=False)


def plot_base_vs_tuned(
    samples: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    max_objects: int | None = None,
    alpha: float = 0.5,
    panel_size: float = 3.6,
    seed: int = 0,
) -> Figure:
    """A grid of predictions against ground truth: one row per image, columns ground truth | each model.

    The first column shows the ground-truth objects, each in its own colour. Each model column shows where that
    model's masks are right and wrong (`error_map`): correct pixels in green, false positives in magenta, missed
    object pixels in light blue, so errors show without comparing panels. Every column draws the same box prompts
    (white, edged in black) and point prompts. Model columns are titled with the model's mean per-object Dice on
    the image, and objects are labelled with their Dice: all of them on images with at most
    `MAX_LABELLED_OBJECTS` (12) drawn objects, otherwise the `CROWDED_LABELS` (5) with the lowest Dice. A legend
    above the grid explains the colours. With a single model this is the "eval predictions against ground truth"
    grid.

    Args:
        samples: one dict or a list of dicts, one per image, with the keys

            - `image`: the image (see `plot_ground_truth`);
            - `gt_masks`: `(K, H, W)` ground-truth masks;
            - `boxes` (optional): `(K, 4)` inclusive xyxy box prompts, by default the exact box of each mask;
            - `points`, `point_labels` (optional): point prompts, `(K, P, 2)` and `(K, P)` or `(P, 2)` and `(P,)`;
            - `predictions`: `{model_name: (K, H, W) masks}`, columns in this order, e.g.
              `{"base": ..., "tuned": ...}` or `{"tuned": ...}`;
            - `dice` (optional): `{model_name: (K,) per-object Dice}`; computed from the masks when absent;
            - `name` (optional): the image name, shown in the first column's title.
        max_objects (`int`, *optional*): draw only the first `max_objects` objects of each image (titles still
            report the mean over all objects). `None` draws all.
        alpha (`float`, *optional*, defaults to 0.5): opacity of the ground-truth and error colours.
        panel_size (`float`, *optional*, defaults to 3.6): width of each panel in inches.
        seed (`int`, *optional*, defaults to 0): seed of the ground-truth object colours.

    Returns:
        `matplotlib.figure.Figure`.
    """
    if isinstance(samples, Mapping):
        samples = [samples]
    if not samples:
        raise ValueError("plot_base_vs_tuned needs at least one sample.")
    rows = [_sample_arrays(s, i) for i, s in enumerate(samples)]
    models: list[str] = []
    for row in rows:
        models += [m for m in row["predictions"] if m not in models]
    ncols = 1 + len(models)
    heights = [_panel_height(panel_size, r["image"].shape[0] / r["image"].shape[1], title_lines=2) for r in rows]
    fig = _new_figure(panel_size * ncols, sum(heights) + 0.4)
    axes = fig.subplots(len(rows), ncols, squeeze=False, gridspec_kw={"height_ratios": heights})
    with_points = False
    for r, row in enumerate(rows):
        k = len(row["gt"])
        n = k if max_objects is None else min(k, max_objects)
        shape = row["image"].shape[:2]
        boxes = row["boxes"][:n]
        linewidth = 1.0 if n <= 20 else 0.7
        points, point_labels = row["points"], row["point_labels"]
        if points is not None and points.ndim == 3 and len(points) == k:
            points, point_labels = points[:n], point_labels[:n]
        with_points = with_points or points is not None

        ax = axes[r, 0]
        head = _short(row["name"], 24) if row["name"] else "ground truth"
        count = f"{k} object{'s' if k != 1 else ''}" if n == k else f"{n} of {k} objects shown"
        _image_axes(ax, row["image"], f"{head}\n{'ground truth, ' if row['name'] else ''}{count}")
        if n:
            ax.imshow(_overlay(row["gt"][:n], object_colors(n, seed), alpha), interpolation="nearest")
        _prompts(ax, boxes, points, point_labels, linewidth)
        for c, model in enumerate(models, start=1):
            ax = axes[r, c]
            if model not in row["predictions"]:
                _image_axes(ax, row["image"], f"{_short(model)}\nno prediction")
                continue
            dice = row["dice"][model]
            mean = float(np.mean(dice)) if len(dice) else float("nan")
            labelled = (
                np.arange(n) if n <= MAX_LABELLED_OBJECTS else np.argsort(dice[:n], kind="stable")[:CROWDED_LABELS]
            )
            note = "" if len(labelled) == n else f" ({len(labelled)} lowest labelled)"
            _image_axes(ax, row["image"], f"{_short(model)}\nmean Dice {mean:.3f}{note}")
            ax.imshow(
                _error_layer(error_map(row["predictions"][model][:n], row["gt"][:n]), alpha), interpolation="nearest"
            )
            _prompts(ax, boxes, points, point_labels, linewidth)
            for i in labelled:
                if np.isfinite(boxes[i]).all():
                    _box_label(ax, boxes[i], f"{dice[i]:.2f}", shape)
    _grid_legend(fig, with_points)
    return fig


def plot_automatic_masks(
    image: Any,
    masks: Any,
    scores: Any = None,
    seed: int = 0,
    alpha: float = 0.6,
    show_image: bool = True,
    panel_size: float = 4.5,
) -> Figure:
    """Every mask of an automatic mask generation, in random (seeded) colours, the largest drawn first.

    Masks are sorted by area, largest first, and each is painted over the previous ones, so a small mask inside a
    large one stays visible. Colours follow that order: the largest mask gets `object_colors(n, seed)[0]`.

    ```python
    generator = pipeline("mask-generation", model="runs/demo")
    out = generator(image, points_per_batch=64)
    fig = plot_automatic_masks(image, out["masks"], out["scores"])
    ```

    Args:
        image: the image (see `plot_ground_truth`).
        masks: `(N, H, W)` boolean masks or a list of `(H, W)` masks (tensors work), or the pipeline's whole output
            dict, whose `masks` and `scores` are then used.
        scores (*optional*): `(N,)` predicted IoU of each mask, reported in the title.
        seed (`int`, *optional*, defaults to 0): seed of the colours.
        alpha (`float`, *optional*, defaults to 0.6): mask opacity.
        show_image (`bool`, *optional*, defaults to `True`): put the plain image in a panel to the left.
        panel_size (`float`, *optional*, defaults to 4.5): width of each panel in inches.

    Returns:
        `matplotlib.figure.Figure`.
    """
    if isinstance(masks, Mapping):
        scores = masks.get("scores") if scores is None else scores
        masks = masks["masks"]
    rgb = to_rgb_array(image)
    masks = _as_masks(masks) if len(masks) else np.zeros((0, *rgb.shape[:2]), bool)
    if masks.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"Masks of size {masks.shape[1:]} do not match the {rgb.shape[:2]} image (H, W).")
    order = np.argsort(-masks.sum(axis=(1, 2)), kind="stable")
    h, w = rgb.shape[:2]
    ncols = 2 if show_image else 1
    fig = _new_figure(panel_size * ncols, _panel_height(panel_size, h / w, title_lines=2 if scores is not None else 1))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    if show_image:
        _image_axes(axes[0], rgb, f"image ({w}x{h})")
    title = f"{len(masks)} mask{'s' if len(masks) != 1 else ''}, largest drawn first"
    if scores is not None and len(masks):
        s = np.asarray(scores, np.float64).reshape(-1)
        title += f"\npredicted IoU {s.min():.2f} to {s.max():.2f}"
    _image_axes(axes[-1], rgb, title)
    _draw_objects(axes[-1], masks[order], object_colors(len(masks), seed), None, alpha)
    return fig


def _style(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def plot_interactive_curve(interactive: Mapping[str, Any], title: str | None = None) -> Figure:
    """Mean Dice against correction clicks, one line per model and first prompt (box: solid, point: dashed).

    Args:
        interactive: the `interactive` entry of `scripts/evaluate.py`'s `metrics.json`
            (`sam_hf.evaluation.interactive.evaluate_interactive`).
        title (`str`, *optional*): figure title.
    """
    models = interactive["models"]
    clicks = np.arange(interactive["num_clicks"] + 1)
    fig = _new_figure(8.5, 3.8)
    ax = fig.subplots()
    colors = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red")
    for (name, by_start), color in zip(models.items(), colors * (len(models) // len(colors) + 1)):
        for start, style in (("box", "o-"), ("point", "s--")):
            if start in by_start:
                ax.plot(
                    clicks, by_start[start], style, color=color, markersize=4, label=f"{name}, first prompt: {start}"
                )
    ax.set_title(title or f"interactive correction ({interactive['num_objects']} objects)", fontsize=10)
    ax.set_xlabel("correction clicks after the first prompt")
    ax.set_ylabel("mean Dice")
    ax.set_xticks(clicks)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    # Beside the panel, where it can hide no curve wherever the scores lie.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def plot_loss_curves(trainer_state: str | os.PathLike | Mapping[str, Any], title: str | None = None) -> Figure:
    """Train and eval loss against step, and eval Dice (and IoU) on a second panel, from a run's trainer state.

    The base model's evaluation before training (`base_eval_results.json`, when the run has one) is drawn at step 0
    as a hollow marker, the score of predicting each filled box (`base_eval_box_baseline_dice`) as a dashed
    horizontal line, and the best checkpoint (`best_global_step`) as a dotted vertical line. The score axis runs
    from 0 to 1. A run without evaluation entries gets the loss panel only.

    Args:
        trainer_state: an output directory, a `trainer_state.json` path, or a loaded state dict (see
            `load_trainer_state`).
        title (`str`, *optional*): figure title; defaults to the output directory's name when given a path.

    Returns:
        `matplotlib.figure.Figure`.
    """
    if title is None and not isinstance(trainer_state, Mapping):
        path = _state_path(trainer_state)
        title = (path.parent.parent if path.parent.name.startswith("checkpoint-") else path.parent).name
    state = load_trainer_state(trainer_state)
    if not has_loss_curves(state):
        raise ValueError("The trainer state logs no loss and no evaluation: nothing to plot.")
    base = state.get("_base_eval") or {}
    train_steps, train_loss = _series(state, "loss")
    eval_steps, eval_loss = _series(state, "eval_loss")
    scores = {name: _series(state, f"eval_{name}") for name in ("dice", "iou")}
    scores = {name: series for name, series in scores.items() if len(series[0])}
    best_step = state.get("best_global_step")

    fig = _new_figure(12.0 if scores else 5.5, 3.8)
    axes = fig.subplots(1, 2 if scores else 1, squeeze=False)[0]
    ax = axes[0]
    if len(train_steps):
        ax.plot(train_steps, train_loss, color="tab:blue", linewidth=1.2, alpha=0.85, label="train loss")
    if len(eval_steps):
        ax.plot(eval_steps, eval_loss, "o-", color="tab:orange", markersize=4, label="eval loss")
    if base.get("base_eval_loss") is not None:
        ax.plot([0], [base["base_eval_loss"]], "o", mfc="none", color="tab:orange", label="base model eval loss")
    _style(ax, "loss", "loss")
    ax.legend(fontsize=8)
    if scores:
        ax = axes[1]
        for (name, (steps, values)), color, marker in zip(scores.items(), ("tab:green", "tab:purple"), "os"):
            label = {"dice": "Dice", "iou": "IoU"}[name]
            ax.plot(steps, values, f"{marker}-", color=color, markersize=4, label=f"eval {label}")
            if base.get(f"base_eval_{name}") is not None:
                ax.plot([0], [base[f"base_eval_{name}"]], marker, mfc="none", color=color, label=f"base model {label}")
        baseline = base.get("base_eval_box_baseline_dice")
        if baseline is not None and "dice" in scores:
            ax.axhline(
                baseline,
                color="tab:green",
                linestyle="--",
                linewidth=1.0,
                label=f'"fill the box" baseline Dice ({baseline:.3f})',
            )
        if best_step is not None:
            ax.axvline(
                best_step, color="gray", linestyle=":", linewidth=1.2, label=f"best checkpoint (step {best_step})"
            )
        _style(ax, "evaluation (per-object, exact boxes)", "score")
        ax.set_ylim(0, 1)  # Dice and IoU lie in [0, 1]: a zoomed axis would make small changes look large
        # Beside the panel, where it can hide no curve wherever the scores lie.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def compare_runs(
    run_dirs: Sequence[str | os.PathLike],
    metric: str = "eval_dice",
    labels: Sequence[str] | None = None,
    greater_is_better: bool | None = None,
) -> tuple[Figure, list[dict[str, Any]]]:
    """Several runs on one figure (eval loss and `metric` against step) and a table of each run's best value.

    This is how to choose between hyperparameter settings: give the output directories of the runs to compare.

    Args:
        run_dirs: output directories (or `trainer_state.json` paths) of the runs.
        metric (`str`, *optional*, defaults to `"eval_dice"`): the metric of the second panel and of the table; the
            `eval_` prefix may be left out.
        labels (*optional*): one name per run for the legend and table; defaults to the directory names.
        greater_is_better (`bool`, *optional*): see `metric_summary`; by default lower is better only for losses.

    Returns:
        `(figure, rows)`: rows are dicts with `run`, `metric`, `best`, `best_step`, `final`, `final_step` and
        `num_evals`, in the order of `run_dirs` (see `runs_table_markdown`). The best point of each run is starred.
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory.")
    key = _eval_key(metric)
    names = _run_labels(run_dirs, labels)
    states = [load_trainer_state(run) for run in run_dirs]
    panels = ["eval_loss", key] if key != "eval_loss" else ["eval_loss"]
    fig = _new_figure(5.0 * len(panels) + 1.0, 3.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rows = []
    for i, (name, state) in enumerate(zip(names, states)):
        color = f"C{i % 10}"
        summary = metric_summary(state, key, greater_is_better)
        rows.append({"run": name, **summary})
        for ax, panel in zip(axes, panels):
            steps, values = _series(state, panel)
            if len(steps):
                ax.plot(steps, values, "o-", color=color, markersize=3, linewidth=1.2, label=name)
        if summary["best"] is not None:
            ax = axes[panels.index(key)]
            ax.plot([summary["best_step"]], [summary["best"]], "*", color=color, markersize=13, markeredgecolor="k")
    for ax, panel in zip(axes, panels):
        _style(ax, panel + (" (best starred)" if panel == key else ""), panel.removeprefix("eval_"))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {panel} logged", ha="center", va="center", transform=ax.transAxes)
    missing = [row["run"] for row in rows if row["best"] is None]
    if missing:
        logger.warning("No %s logged in run(s): %s", key, ", ".join(missing))
    return fig, rows


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float = 150) -> Path:
    """Write `fig` to `path` (format from the suffix, e.g. `.png`, `.svg`, `.pdf`), creating parent directories.

    The whole canvas is written, at `figure size x dpi` pixels; no tight cropping, so image coordinates map to
    file pixels predictably.

    Args:
        fig (`matplotlib.figure.Figure`): the figure.
        path (`str` or `os.PathLike`): where to write it.
        dpi (`float`, *optional*, defaults to 150): resolution of raster formats.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    logger.info("Wrote %s", path)
    return path


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render `fig` at its own dpi and return the pixels as an `(H, W, 3)` uint8 array (e.g. for TensorBoard).

    Args:
        fig (`matplotlib.figure.Figure`): the figure.
    """
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
