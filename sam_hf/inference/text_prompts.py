"""Text prompts: CLIPSeg finds where a phrase is, SAM draws the outlines.

SAM takes boxes and points, not words. CLIPSeg (`CLIPSegForImageSegmentation`) gives a coarse heat map of where a
phrase matches an image; thresholding it gives blobs, each blob's bounding box becomes a box prompt, and SAM
refines every box into a mask with the same `SamPredictor` as any other prompt.

```python
from PIL import Image
from sam_hf import SamPredictor
from sam_hf.inference.text_prompts import TextPrompter

predictor = SamPredictor.from_pretrained("runs/demo")
prompter = TextPrompter.from_pretrained("CIDAS/clipseg-rd64-refined", threshold=0.4)
image = Image.open("cells.png")
predictor.set_image(image)
result = prompter.segment(predictor, image, "nucleus")
result.boxes, result.prediction.masks.shape      # (K, 4) boxes from the heat map, (K, 1, H, W) SAM masks
```

What it is good at and where it fails is in docs/text-prompts.md: one box per blob means touching objects of the
phrase merge into one box (CLIPSeg's map is 352x352 over the whole image, coarser still in its features), so it
suits a few separate objects better than hundreds of touching nuclei.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ..core.images import to_rgb_array
from .predictor import SamPrediction

logger = logging.getLogger(__name__)


DEFAULT_TEXT_MODEL = "CIDAS/clipseg-rd64-refined"


#: Longest text prompt accepted (CLIP reads at most 77 tokens; longer text is a mistake, not a prompt).
MAX_TEXT_CHARS = 300


def heatmap_to_boxes(
    heatmap: np.ndarray,
    threshold: float = 0.4,
    min_area: int = 1,
    image_size: tuple[int, int] | None = None,
    max_boxes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes around the connected blobs of a heat map above a threshold.

    Args:
        heatmap (`np.ndarray`): `(h, w)` scores in [0, 1] (e.g. CLIPSeg's sigmoid output).
        threshold (`float`, *optional*, defaults to 0.4): a pixel is in a blob when its score is `>= threshold`.
        min_area (`int`, *optional*, defaults to 1): smallest blob kept, in heat-map pixels.
        image_size (`tuple[int, int]`, *optional*): `(H, W)` of the image the heat map covers (stretched over it,
            as CLIPSeg's is). Boxes are then in image pixels: heat-map pixel `i` covers image pixels
            `floor(i * W / w)` to `ceil((i + 1) * W / w) - 1`. By default, boxes are in heat-map pixels.
        max_boxes (`int`, *optional*): keep only the blobs with the highest peak score.

    Returns:
        `(boxes, peaks)`: `(K, 4)` float32 xyxy boxes, inclusive pixel coordinates (the outermost pixels, as
        `sam_hf.core.boxes_from_instances`), and `(K,)` the highest score in each blob. Blobs are 8-connected and
        come in raster order of their first pixel.

    Example:

    ```python
    >>> heat = np.zeros((8, 8)); heat[1:3, 2:5] = 0.9
    >>> heatmap_to_boxes(heat, 0.5)[0].tolist()
    [[2.0, 1.0, 4.0, 2.0]]
    ```
    """
    heat = np.asarray(heatmap, np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"Expected an (h, w) heat map, got shape {heat.shape}.")
    if not np.isfinite(heat).all():
        raise ValueError("The heat map has NaN or infinite values.")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1, got {min_area}.")
    labels, n = ndimage.label(heat >= threshold, structure=np.ones((3, 3), bool))
    slices = ndimage.find_objects(labels)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = np.asarray(ndimage.maximum(heat, labels, index=np.arange(1, n + 1)), np.float64).reshape(-1)
    keep = np.flatnonzero(areas >= min_area)
    if max_boxes is not None and len(keep) > max_boxes:
        keep = np.sort(keep[np.argsort(-peaks[keep], kind="stable")[:max_boxes]])
    boxes = np.array([[s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1] for s in (slices[k] for k in keep)])
    boxes = boxes.reshape(-1, 4).astype(np.float64)
    if image_size is not None:
        (height, width), (h, w) = image_size, heat.shape
        sx, sy = width / w, height / h
        boxes[:, 0] = np.floor(boxes[:, 0] * sx)
        boxes[:, 1] = np.floor(boxes[:, 1] * sy)
        boxes[:, 2] = np.minimum(np.ceil((boxes[:, 2] + 1) * sx) - 1, width - 1)
        boxes[:, 3] = np.minimum(np.ceil((boxes[:, 3] + 1) * sy) - 1, height - 1)
    return boxes.astype(np.float32), peaks[keep].astype(np.float32)


@dataclass
class TextSegmentation:
    """SAM masks for the blobs a text prompt lit up.

    Attributes:
        text (`str`): the prompt.
        heatmap (`np.ndarray`): `(h, w)` CLIPSeg scores in [0, 1], over the whole image (stretched to it).
        boxes (`np.ndarray`): `(K, 4)` xyxy box prompts in image pixels, one per blob.
        peaks (`np.ndarray`): `(K,)` the highest heat-map score inside each blob.
        prediction (`SamPrediction`): SAM's masks for the boxes, `(K, M, H, W)`; `K = 0` when nothing passed the
            threshold.
    """

    text: str
    heatmap: np.ndarray
    boxes: np.ndarray
    peaks: np.ndarray
    prediction: Any


class TextPrompter:
    """Turn a text prompt into SAM box prompts with CLIPSeg.

    Args:
        model (`CLIPSegForImageSegmentation`): the heat-map model.
        processor (`CLIPSegProcessor`): its processor (image resizing and the CLIP tokenizer).
        device (`str` or `torch.device`, *optional*): defaults to the model's device.
        threshold (`float`, *optional*, defaults to 0.4): heat-map score at which a pixel belongs to a blob.
        min_area (`int`, *optional*, defaults to 16): smallest blob, in heat-map pixels (CLIPSeg's map is 352x352).
        max_boxes (`int`, *optional*, defaults to 64): most boxes per image, the blobs with the highest peaks.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: str | torch.device | None = None,
        threshold: float = 0.4,
        min_area: int = 16,
        max_boxes: int | None = 64,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"text threshold must be in [0, 1], got {threshold}.")
        if min_area < 1:
            raise ValueError(f"text min_area must be >= 1, got {min_area}.")
        if max_boxes is not None and max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}.")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.processor = processor
        self.threshold = threshold
        self.min_area = min_area
        self.max_boxes = max_boxes

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str = DEFAULT_TEXT_MODEL, device: str | None = None, **kwargs: Any
    ) -> TextPrompter:
        """Load a CLIPSeg checkpoint and its processor from a directory or the Hub.

        Raises:
            ValueError: when the checkpoint cannot be loaded, naming it and saying what was expected.
        """
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        try:
            processor = CLIPSegProcessor.from_pretrained(model_name_or_path)
            model = CLIPSegForImageSegmentation.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"--text_model {model_name_or_path}: could not load a CLIPSeg model and processor ({err}). Expected "
                f"a Hub id such as {DEFAULT_TEXT_MODEL} (downloaded once, then cached) or a directory written by "
                "CLIPSegForImageSegmentation.save_pretrained and CLIPSegProcessor.save_pretrained."
            ) from err
        return cls(model, processor, device=device, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def heatmap(self, image: Any, text: str) -> np.ndarray:
        """CLIPSeg's `(h, w)` heat map (sigmoid of the logits, in [0, 1]) of where `text` matches `image`.

        The processor stretches the image to its square input, so the map covers the whole image, stretched.
        """
        text = check_text(text)
        rgb = Image.fromarray(to_rgb_array(image))
        inputs = self.processor(text=[text], images=[rgb], return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        logits = self.model(**inputs).logits
        return torch.sigmoid(logits.float()).reshape(-1, *logits.shape[-2:])[0].cpu().numpy()

    def boxes(self, image: Any, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(heatmap, boxes, peaks)`: the heat map and the box of each of its blobs, in pixels of `image`."""
        heat = self.heatmap(image, text)
        size = to_rgb_array(image).shape[:2]
        boxes, peaks = heatmap_to_boxes(heat, self.threshold, self.min_area, size, self.max_boxes)
        logger.info(
            "Text %r: %d blob(s) at heat >= %.2f (peak heat %.2f)", text, len(boxes), self.threshold, heat.max()
        )
        return heat, boxes, peaks

    def segment(self, predictor: Any, image: Any, text: str, multimask_output: bool = False) -> TextSegmentation:
        """Boxes from the heat map, refined into masks by `predictor`, which must hold `image` (`set_image`).

        With no blob above the threshold, the prediction holds no mask (and a warning says so).
        """

        heat, boxes, peaks = self.boxes(image, text)
        if predictor.original_size is None or tuple(predictor.original_size) != to_rgb_array(image).shape[:2]:
            raise RuntimeError("Call predictor.set_image(image) with the same image before segment(...).")
        if len(boxes):
            prediction = predictor.predict(boxes=boxes, multimask_output=multimask_output)
        else:
            logger.warning(
                "Text %r: no heat-map pixel reaches the threshold %.2f (highest %.2f); no mask. Lower the threshold "
                "or rephrase the prompt.",
                text,
                self.threshold,
                float(heat.max()),
            )
            height, width = predictor.original_size
            m = 3 if multimask_output else 1
            side = predictor.geometry.mask_side
            prediction = SamPrediction(
                np.zeros((0, m, height, width), bool), np.zeros((0, m), np.float32), np.zeros((0, m, side, side))
            )
        return TextSegmentation(text, heat, boxes, peaks, prediction)


def check_text(text: Any) -> str:
    """A text prompt stripped of surrounding space, or a `ValueError` saying what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"The text prompt must be a non-empty string, got {text!r}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"The text prompt is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted.")
    return text.strip()


def heatmap_image(heatmap: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """The heat map as an 8-bit grayscale image, resized to `(H, W)` if given, for viewing."""
    img = Image.fromarray(np.clip(np.asarray(heatmap) * 255 + 0.5, 0, 255).astype(np.uint8))
    if size is not None:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return img
