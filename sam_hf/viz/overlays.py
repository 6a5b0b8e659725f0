"""Overlays drawn with PIL (no matplotlib): coloured labels, masks and boxes on an image, and contact sheets."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..core.images import to_rgb_array
from ..core.masks import boxes_from_masks


def label_colors(n: int) -> np.ndarray:
    """`(n, 3)` uint8 colours, distinct and bright: hues follow the golden-ratio sequence (neighbouring labels get
    distant hues), and saturation and value cycle so that hues that come close again still differ."""
    index = np.arange(n)
    hues = (0.05 + index * 0.6180339887498949) % 1.0
    saturation = 0.9 - 0.3 * ((index // 7) % 3) / 2
    value = 1.0 - 0.25 * ((index // 3) % 2)
    rgb = [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, saturation, value)]
    return np.round(np.asarray(rgb, np.float64).reshape(-1, 3) * 255).astype(np.uint8)


def color_labels(labels: np.ndarray) -> np.ndarray:
    """A viewable `(H, W, 3)` uint8 image of a label image: background (0) black, label `i` in `label_colors`'s
    colour `i - 1`, the colour the overlay gives mask `i - 1`."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"Expected an (H, W) label image, got shape {labels.shape}.")
    lut = np.concatenate([np.zeros((1, 3), np.uint8), label_colors(int(labels.max(initial=0)))])
    return lut[labels]


def _font(image_size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(10, min(image_size) // 24)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _score_text(draw: ImageDraw.ImageDraw, anchor_box: np.ndarray, text: str, size: tuple[int, int], font) -> None:
    """`text` in white with a black outline at the top-left of `anchor_box`, above it when there is room and kept
    inside the image."""
    width, height = size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=1)
    tw, th = right - left, bottom - top
    x0, y0, x1, y1 = (float(v) for v in anchor_box)
    x = min(max(x0, 0), max(width - tw, 0))
    y = y0 - th - 1 if y0 - th - 1 >= 0 else min(y1 + 1, max(height - th, 0))
    draw.text((x - left, y - top), text, fill="white", font=font, stroke_width=1, stroke_fill="black")


def overlay(
    image: Any,
    masks: np.ndarray,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    alpha: float = 0.5,
    scores: np.ndarray | None = None,
) -> Image.Image:
    """Draw `(N, H, W)` masks in distinct colours (`label_colors`) over the image, with the box outlines, the points
    (positive green, negative red) and, given `scores`, each mask's score (predicted IoU) at its box, or at the
    mask's own bounding box when it has no box. Masks and boxes are drawn by torchvision
    (`draw_segmentation_masks`, `draw_bounding_boxes`), points and text by Pillow; no matplotlib."""
    pixels = torch.from_numpy(to_rgb_array(image)).permute(2, 0, 1)
    masks = np.asarray(masks, bool).reshape(-1, *pixels.shape[1:])
    colours = [tuple(int(v) for v in c) for c in label_colors(len(masks))]
    if len(masks):
        pixels = draw_segmentation_masks(pixels, torch.from_numpy(masks), alpha=alpha, colors=colours)
    boxes = None if boxes is None else np.asarray(boxes, np.float64).reshape(-1, 4)
    if boxes is not None and len(boxes):
        pixels = draw_bounding_boxes(pixels, torch.from_numpy(boxes), colors=colours[: len(boxes)], width=1)
    out = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(out)
    if points is not None:
        points = np.asarray(points).reshape(-1, 2)
        labels = np.ones(len(points)) if point_labels is None else np.asarray(point_labels).reshape(-1)
        for (x, y), label in zip(points, labels):
            r = 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 220, 0) if label else (230, 0, 0), outline="white")
    if scores is not None:
        font = _font(out.size)
        for i, (mask, score) in enumerate(zip(masks, np.asarray(scores, np.float64).reshape(-1))):
            anchor = boxes[i] if boxes is not None and len(boxes) == len(masks) else boxes_from_masks([mask])[0]
            if np.isnan(anchor).any():  # an empty mask without a box: nowhere to write its score
                continue
            _score_text(draw, anchor, f"score {max(float(score), 0.0):.2f}", out.size, font)
    return out


def _thumbnail(image: np.ndarray, instances: np.ndarray, size: int) -> Image.Image:

    rgb = image.astype(np.float64)
    colours = color_labels(instances).astype(np.float64)
    inside = instances > 0
    rgb[inside] = 0.45 * rgb[inside] + 0.55 * colours[inside]
    # Object outlines, so touching objects stay apart.
    edge = np.zeros_like(inside)
    edge[:-1] |= instances[:-1] != instances[1:]
    edge[:, :-1] |= instances[:, :-1] != instances[:, 1:]
    rgb[edge & inside] = colours[edge & inside]
    out = Image.fromarray(rgb.round().astype(np.uint8))
    out.thumbnail((size, size), Image.Resampling.LANCZOS)
    return out


def contact_sheet(
    items: list[tuple[str, np.ndarray, np.ndarray]], thumb_size: int = 192, columns: int = 6
) -> Image.Image:
    """A grid of thumbnails, each image with its objects in colour (outlined) and a caption `name: N objects`.

    Args:
        items (`list`): `(name, (H, W, 3) uint8 image, (H, W) instance map)` per image.
        thumb_size (`int`, *optional*, defaults to 192): longest side of a thumbnail.
        columns (`int`, *optional*, defaults to 6): thumbnails per row.
    """
    if not items:
        raise ValueError("No image to put on the contact sheet.")
    columns = min(columns, len(items))
    rows = -(-len(items) // columns)
    caption, pad = 18, 6
    cell_w, cell_h = thumb_size + pad, thumb_size + caption + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for k, (name, image, instances) in enumerate(items):
        x, y = pad + (k % columns) * cell_w, pad + (k // columns) * cell_h
        thumb = _thumbnail(image, instances, thumb_size)
        sheet.paste(thumb, (x, y))
        count = int(len(np.unique(instances[instances > 0])))
        label = f"{name[:14]}{'..' if len(name) > 14 else ''}: {count} object{'s' if count != 1 else ''}"
        draw.text((x, y + thumb_size + 3), label, fill=(235, 235, 235), font=font)
    return sheet
