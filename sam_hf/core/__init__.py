"""The bottom layer: small functions on images, masks, boxes, prompts and scores. It imports nothing from sam_hf."""

from __future__ import annotations

from .clicks import correction_clicks, next_click
from .env import default_dataloader_num_workers, default_device
from .images import encode_images, scale_coords, to_rgb_array
from .masks import (
    boxes_from_instances,
    boxes_from_masks,
    check_lossless_mask,
    instance_map,
    label_image,
    mask_to_instances,
)
from .prompts import PromptError, validate_prompts
from .rle import decode_rle, encode_rle, polygons_to_mask, rle_counts_to_string, rle_string_to_counts
from .scores import average_precision, dice_per_object, match_masks, object_stats, scores_from_stats
from .windows import object_window, tile_origins

__all__ = [
    "average_precision",
    "PromptError",
    "boxes_from_instances",
    "boxes_from_masks",
    "check_lossless_mask",
    "correction_clicks",
    "decode_rle",
    "default_dataloader_num_workers",
    "default_device",
    "dice_per_object",
    "encode_images",
    "encode_rle",
    "instance_map",
    "label_image",
    "mask_to_instances",
    "match_masks",
    "next_click",
    "object_stats",
    "object_window",
    "polygons_to_mask",
    "rle_counts_to_string",
    "rle_string_to_counts",
    "scale_coords",
    "scores_from_stats",
    "tile_origins",
    "to_rgb_array",
    "validate_prompts",
]
