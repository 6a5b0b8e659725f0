"""The served model: its predictor, its object-crop scale, and what every endpoint needs from it."""

from __future__ import annotations

import logging
import time

from ...core.env import default_device
from ...core.images import processor_longest_edge
from ...inference.automatic import trained_crop_scale
from ...inference.predictor import SamPredictor
from .jobs import _Jobs
from .requests import _DecodedImage
from .settings import _CHUNK_ELEMENTS, ServeSettings, _check_mask_pixels

logger = logging.getLogger(__name__)


class _LoadedModel:
    """A SAM checkpoint loaded once, with the jobs that run its calls one at a time.

    Args:
        model (`str`): a directory written by `save_pretrained` or a Hub id.
        settings (`ServeSettings`): limits and device.
    """

    def __init__(self, model: str, settings: ServeSettings):
        start = time.perf_counter()
        self.model_id = model
        self.settings = settings
        self.predictor = SamPredictor.from_pretrained(model, device=default_device(settings.device))
        # Images too elongated for the processor's input are refused (422) from their header.
        self.longest_edge = processor_longest_edge(self.predictor.processor)
        given = settings.object_crop_scale
        self.crop_scale = (given or None) if given is not None else trained_crop_scale(self.predictor)
        if settings.object_crop_scale:
            logger.info(
                "Box prompts are decoded on object crops of %g x the box (--object-crop-scale), and automatic masks "
                "refined on them.",
                self.crop_scale,
            )
        elif self.crop_scale:
            logger.info(
                "%s was tuned on object crops (config.json object_crop_scale %g): box prompts are decoded on crops of "
                "that scale and automatic masks refined on them, as in training; --object-crop-scale 0 decodes on the "
                "whole image.",
                model,
                self.crop_scale,
            )
        self.jobs = _Jobs(settings)
        logger.info("Loaded %s on %s in %.1f s.", model, self.device, time.perf_counter() - start)

    @property
    def device(self) -> str:
        return str(self.predictor.device)

    def image(self, data: bytes) -> _DecodedImage:
        """The uploaded image, its size read from the header (400, 413 or 422 for one the server refuses)."""
        return _DecodedImage(data, self.settings.max_image_pixels, self.longest_edge)

    def check_mask_pixels(self, count: int, image: _DecodedImage, what: str) -> None:
        """413 when `count` masks of `image` exceed `max_mask_pixels`."""
        _check_mask_pixels(self.settings, count, image.width, image.height, what)

    def chunk_size(self, masks_per_prompt: int, image: _DecodedImage) -> int:
        """Prompts decoded at once, so that the float32 logits up-sampled together stay under `_CHUNK_ELEMENTS`;
        chunking does not change the masks."""
        side = max(image.height * image.width, self.predictor.geometry.image_size**2)
        return max(1, min(64, _CHUNK_ELEMENTS // (masks_per_prompt * side)))
