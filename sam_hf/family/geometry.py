"""Where pixels land: the input and low-resolution mask frames of a family member's processor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.images import resized_shape


@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels land in the model's input and in its low-resolution masks.

    Args:
        image_size: side of the square model input.
        mask_side: side of the square low-resolution masks the decoder predicts.
        pads: `True` when the processor resizes the longest side to `image_size` and pads bottom/right (SAM);
            `False` when it resizes both sides to `image_size` (SAM 2), stretching non-square images, with labels
            stretched the same way.
    """

    image_size: int
    mask_side: int
    pads: bool

    def resized(self, height: int, width: int, side: int | None = None) -> tuple[int, int]:
        """The `(H, W)` an image of `(height, width)` takes inside a square frame of `side` (default: the input)."""
        side = self.image_size if side is None else side
        return resized_shape(height, width, side) if self.pads else (side, side)

    def label_shape(self, height: int, width: int) -> tuple[int, int]:
        """The `(H, W)` of the image inside the low-resolution mask frame; the rest of the frame is padding."""
        return self.resized(height, width, self.mask_side)

    def upscale(
        self, logits: torch.Tensor, original_size: Sequence[int], reshaped_size: Sequence[int]
    ) -> torch.Tensor:
        """Low-resolution logits `(N, m, m)` -> logits `(N, H, W)` at the original resolution, as the family's
        processor post-processes masks: through the padded input frame and its crop (SAM), or straight to the
        original size (SAM 2)."""
        x = logits[:, None].float()
        if self.pads:
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
            x = x[..., : int(reshaped_size[0]), : int(reshaped_size[1])]
        x = F.interpolate(x, tuple(int(v) for v in original_size), mode="bilinear", align_corners=False)
        return x[:, 0]

    @classmethod
    def of_processor(cls, processor: Any) -> Geometry:
        """The geometry a processor (or image processor) produces, read from its configuration."""
        ip = getattr(processor, "image_processor", processor)
        if getattr(ip, "mask_pad_size", None):
            sides = {
                "size": ip.size["longest_edge"],
                "pad_size": (ip.pad_size["height"], ip.pad_size["width"]),
                "mask_size": ip.mask_size["longest_edge"],
                "mask_pad_size": (ip.mask_pad_size["height"], ip.mask_pad_size["width"]),
            }
            if (sides["size"],) * 2 != sides["pad_size"] or (sides["mask_size"],) * 2 != sides["mask_pad_size"]:
                raise ValueError(
                    f"{type(ip).__name__} resizes the longest side to `size` and pads to the square `pad_size`, and "
                    f"the same for masks: they must agree, got {sides}."
                )
            return cls(int(ip.pad_size["height"]), int(ip.mask_pad_size["height"]), pads=True)
        if ip.size["height"] != ip.size["width"] or ip.mask_size["height"] != ip.mask_size["width"]:
            raise ValueError(
                f"{type(ip).__name__} must resize to a square: got size {dict(ip.size)}, "
                f"mask_size {dict(ip.mask_size)}."
            )
        return cls(int(ip.size["height"]), int(ip.mask_size["height"]), pads=False)
