"""Prompted inference: one image encoding shared by any number of box and point prompts.

```python
from sam_hf import SamPredictor

predictor = SamPredictor.from_pretrained("outputs/nuclei-demo")
predictor.set_image(image)                       # PIL image or array; encoded once
result = predictor.predict(boxes=[[10, 12, 40, 44], [60, 8, 90, 30]])
result.masks.shape, result.scores.shape          # (2, 1, H, W) bool, (2, 1)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.images import encode_images, scale_coords, to_rgb_array
from ..core.prompts import PromptError, validate_prompts
from ..family.modeling import load_model_and_processor
from ..family.registry import as_levels, family_of


@dataclass
class SamPrediction:
    """Masks for `N` prompts at the original image resolution.

    Attributes:
        masks (`np.ndarray`): `(N, M, H, W)` bool, `M` = 3 with `multimask_output=True`, else 1.
        scores (`np.ndarray`): `(N, M)` float32, the model's predicted IoU of each mask.
        logits (`np.ndarray`): `(N, M, h, w)` float32 low-resolution mask logits (`h = w` = the decoder's mask size).
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """`(N, H, W)` masks and `(N,)` scores, taking the highest-scoring of the `M` candidates per prompt."""
        idx = self.scores.argmax(axis=1)
        rows = np.arange(len(idx))
        return self.masks[rows, idx], self.scores[rows, idx]


def _drop_unit_dims(arr: np.ndarray) -> np.ndarray:
    """`arr` without its leading dimensions of size 1, so that a `(1, 1, h, w)` mask reads as `(h, w)`; any other
    shape is returned as it is, for the caller to refuse."""
    return arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and all(d == 1 for d in arr.shape[:-2]) else arr


class SamPredictor:
    """Segment an image with box and/or point prompts, encoding the image once.

    Args:
        model: a SAM-family model (`SamModel`, `SamHQModel`, `Sam2Model`, `Sam3TrackerModel`, `EdgeTamModel`), e.g.
            one fine-tuned with sam_hf.
        processor: its processor (resizing, padding, normalisation).
        device (`str` or `torch.device`, *optional*): defaults to the model's device.
        chunk_size (`int`, *optional*, defaults to 64): prompts decoded and upsampled at once; bounds memory.
        mask_threshold (`float`, *optional*, defaults to 0.0): logit threshold for the binary masks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        device: str | torch.device | None = None,
        chunk_size: int = 64,
        mask_threshold: float = 0.0,
    ):
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.processor = processor
        self.family = family_of(model)
        self.family.check_processor(processor, model.config)
        self.geometry = self.family.geometry(model.config)
        self.chunk_size = chunk_size
        self.mask_threshold = mask_threshold
        self.reset_image()

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, device: str | None = None, **kwargs: Any) -> SamPredictor:
        """Load a model and processor from a directory or Hub id (see `load_model_and_processor`)."""
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir") if k in kwargs}
        model, processor = load_model_and_processor(model_name_or_path, **hub_kwargs)
        return cls(model, processor, device=device, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset_image(self) -> None:
        self.image_embeddings = None
        self.original_size: tuple[int, int] | None = None
        self.reshaped_size: tuple[int, int] | None = None

    @torch.no_grad()
    def set_image(self, image: Any) -> None:
        """Encode `image` (PIL image or `(H, W)`, `(H, W, 3|4)` array) once for the prompts that follow."""
        self.image_embeddings, self.original_size, self.reshaped_size = self.encode_batch([image])[0]

    @torch.no_grad()
    def encode_batch(
        self, images: list[Any]
    ) -> list[tuple[tuple[torch.Tensor, ...], tuple[int, int], tuple[int, int]]]:
        """Encode several images (of any sizes) in one vision-encoder call.

        Returns:
            Per image `(features, original_size, reshaped_size)`, the arguments of `set_image_embeddings`: its
            feature levels (batch dimension 1) and its `(height, width)` before and after the processor's resize.
        """
        rgbs = [np.array(to_rgb_array(image)) for image in images]  # writable copies for the processor
        inputs = encode_images(self.processor.image_processor, rgbs)
        for rgb, size in zip(rgbs, inputs["original_sizes"].tolist()):
            if tuple(size) != rgb.shape[:2]:
                raise RuntimeError(
                    f"The image processor read a {rgb.shape[0]}x{rgb.shape[1]} (HxW) image as {size[0]}x{size[1]}; it "
                    "must take (H, W, 3) channels-last input."
                )
        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        levels = self.family.encode(self.model, pixel_values)
        return [
            (
                tuple(level[i : i + 1] for level in levels),
                tuple(int(v) for v in inputs["original_sizes"][i]),
                tuple(int(v) for v in inputs["reshaped_input_sizes"][i]),
            )
            for i in range(len(rgbs))
        ]

    def set_image_embeddings(
        self, embeddings: Any, original_size: tuple[int, int], reshaped_size: tuple[int, int]
    ) -> None:
        """Use image features computed earlier (e.g. the `image_embeddings`, `original_sizes` and
        `reshaped_input_sizes` columns of `sam_hf.data.add_image_embeddings`) instead of encoding the image again.

        Args:
            embeddings: this model's image features for the image, without or with a batch dimension of 1: the
                `(C, g, g)` embedding, or the list of feature levels of SAM-HQ and SAM 2-style models
                (`sam_hf.data.read_embedding`).
            original_size (`tuple[int, int]`): `(height, width)` of the original image.
            reshaped_size (`tuple[int, int]`): `(height, width)` the processor resized it to.
        """
        levels = [torch.as_tensor(e if torch.is_tensor(e) else np.asarray(e)) for e in as_levels(embeddings)]
        levels = [e[None] if e.dim() == 3 else e for e in levels]
        self.family.check_features(levels, self.model.config)
        self.image_embeddings = tuple(e.to(self.device, self.model.dtype) for e in levels)
        self.original_size = tuple(int(v) for v in original_size)
        self.reshaped_size = tuple(int(v) for v in reshaped_size)

    def _scale(self, coords: np.ndarray) -> torch.Tensor:
        return scale_coords(coords, self.original_size, self.reshaped_size).to(self.device)

    @torch.no_grad()
    def predict(
        self,
        boxes: Any = None,
        points: Any = None,
        point_labels: Any = None,
        multimask_output: bool = False,
        mask_input: Any = None,
    ) -> SamPrediction:
        """Masks for each prompt at the original resolution.

        Args:
            boxes: `(N, 4)` xyxy pixel boxes (or one `(4,)` box).
            points: `(N, P, 2)` xy pixel points, `P` per prompt (or `(P, 2)` for one prompt).
            point_labels: `(N, P)`, 1 positive / 0 negative; defaults to all positive.
            multimask_output (`bool`, *optional*, defaults to `False`): return SAM's three candidate masks per prompt
                with their predicted IoU, as the original `SamPredictor` does; `SamPrediction.best()` picks one.
            mask_input: `(h, w)` low-resolution mask logits of an earlier prediction of the same object (one of
                `SamPrediction.logits[i]`), for one prompt: the interactive correction step, where a negative or
                positive click is added and the previous mask is fed back.

        With both boxes and points, prompt `i` is box `i` together with point set `i`.

        Example (a box, then a correction click):

        ```python
        >>> first = predictor.predict(boxes=[[10, 10, 60, 60]])
        >>> fixed = predictor.predict(
        ...     boxes=[[10, 10, 60, 60]], points=[[[30, 50]]], point_labels=[[0]], mask_input=first.logits[0, 0]
        ... )
        ```
        """
        if self.image_embeddings is None:
            raise RuntimeError("Call `set_image(image)` before `predict(...)`.")
        boxes, points, labels = validate_prompts(self.original_size, boxes, points, point_labels)
        n = len(boxes) if boxes is not None else len(points)
        dense = self._mask_prompt(mask_input, n)
        image = self.family.decoder_inputs(self.image_embeddings)
        masks, scores, logits = [], [], []
        for start in range(0, n, self.chunk_size):
            prompts = self._prompt_inputs(slice(start, start + self.chunk_size), boxes, points, labels, dense)
            chunk_masks, chunk_scores, chunk_logits = self._decode(image, prompts, multimask_output)
            masks.append(chunk_masks)
            scores.append(chunk_scores)
            logits.append(chunk_logits)
        return SamPrediction(np.concatenate(masks), np.concatenate(scores), np.concatenate(logits))

    def _prompt_inputs(
        self,
        rows: slice,
        boxes: np.ndarray | None,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        dense: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The prompt keyword arguments of the model for the prompts `rows` (validated, in original pixels), in the
        resized frame and with a batch dimension of 1 (one image)."""
        kwargs = {}
        if boxes is not None:
            kwargs["input_boxes"] = self._scale(boxes[rows])[None]
        if points is not None:
            kwargs["input_points"] = self._scale(points[rows])[None]
            kwargs["input_labels"] = torch.from_numpy(labels[rows]).to(self.device)[None]
        if dense is not None:
            kwargs["input_masks"] = dense
        return kwargs

    def _decode(
        self, image: dict[str, Any], prompts: dict[str, torch.Tensor], multimask_output: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder call on the current image: the `(N, M, H, W)` masks at the original resolution, their `(N, M)`
        predicted IoUs and `(N, M, h, w)` low-resolution logits (`SamPrediction`'s fields)."""
        out = self.model(**image, multimask_output=multimask_output, **self.family.forward_kwargs, **prompts)
        low_res = out.pred_masks[0].float()
        full = self.geometry.upscale(low_res.flatten(0, 1), self.original_size, self.reshaped_size)
        full = full.reshape(*low_res.shape[:2], *full.shape[-2:]) > self.mask_threshold
        return full.cpu().numpy(), out.iou_scores[0].float().cpu().numpy(), low_res.cpu().numpy()

    def mask_input_from_mask(self, mask: Any, logit: float = 10.0) -> np.ndarray:
        """A binary mask of the current image (what a labelling tool holds: an earlier mask, or one a person drew) as
        the `(m, m)` low-resolution logits `predict(mask_input=...)` takes.

        The mask is resized into the low-resolution frame the way the processor resizes the image (padded or
        stretched, per family member; area-weighted), and each pixel's covered fraction `f` becomes the logit
        `(2 f - 1) * logit`: `+logit` inside, `-logit` outside and in the padding.
        """
        arr = np.asarray(mask)
        if self.original_size is None:
            raise RuntimeError("Call `set_image(image)` before converting a mask of it.")
        arr = _drop_unit_dims(arr)
        if arr.shape != self.original_size:
            raise PromptError(
                f"The mask prompt is {arr.shape[0]}x{arr.shape[1]} (HxW) but the image is "
                f"{self.original_size[0]}x{self.original_size[1]}; give a mask of the same image."
            )
        side = self.geometry.mask_side
        height, width = self.geometry.label_shape(*arr.shape)
        fraction = torch.nn.functional.interpolate(
            torch.from_numpy((arr > 0).astype(np.float32))[None, None], (height, width), mode="area"
        )[0, 0].numpy()
        logits = np.full((side, side), -logit, np.float32)
        logits[:height, :width] = (2 * fraction - 1) * logit
        return logits

    def _mask_prompt(self, mask_input: Any, n_prompts: int) -> torch.Tensor | None:
        """`mask_input` as the `(1, 1, h, w)` float tensor SAM's prompt encoder embeds, after checking it."""
        if mask_input is None:
            return None
        side = self.geometry.mask_side
        arr = np.asarray(mask_input, dtype=np.float32)
        arr = _drop_unit_dims(arr)
        if arr.shape != (side, side):
            raise PromptError(
                f"mask_input must be the {side}x{side} low-resolution logits of an earlier prediction "
                f"(SamPrediction.logits[i, j]), got shape {tuple(np.shape(mask_input))}."
            )
        if not np.isfinite(arr).all():
            raise PromptError("mask_input has NaN or infinite values; expected the logits of an earlier prediction.")
        if n_prompts != 1:
            raise PromptError(
                f"mask_input refines one object: give it with one prompt, got {n_prompts}. SAM's prompt encoder "
                "applies one mask to every prompt of an image."
            )
        return torch.from_numpy(arr)[None, None].to(self.device, self.image_embeddings[0].dtype)

    def __call__(self, image: Any, **prompts: Any) -> SamPrediction:
        """`set_image(image)` then `predict(**prompts)`."""
        self.set_image(image)
        return self.predict(**prompts)
