"""`scripts/predict.py`: segment one image or a folder with box and/or point prompts and write masks, a label
image (raw, and in colour for viewing), an overlay with each mask's score, and the scores. A prompt whose mask comes
back empty is logged as a warning naming the image and the prompt. Images are read as displayed (a photo's EXIF
orientation applied, see `sam_hf.core.images.open_image`): prompts are in pixels of the image as a viewer shows it.

Prompts come from the command line (one set for every image) or from a JSON file, either one set for every image or
one per image keyed by file name or stem:

```json
{"boxes": [[10, 12, 40, 44]], "points": [[[25, 30], [5, 5]]], "point_labels": [[1, 0]]}
{"img_001.png": {"boxes": [[10, 12, 40, 44], [60, 8, 90, 30]]}, "img_002": {"points": [[[25, 30]]]}}
```
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..core.env import default_device
from ..core.images import check_aspect_ratio, list_images, open_image, processor_longest_edge, read_rgb
from ..core.masks import label_image
from ..core.prompts import PromptError
from ..core.windows import check_crop_scale
from ..inference.automatic import trained_crop_scale
from ..inference.predictor import SamPredictor
from ..inference.text_prompts import DEFAULT_TEXT_MODEL
from ..inference.windowed import ObjectCropPredictor, TiledPredictor
from ..viz.overlays import color_labels, overlay

logger = logging.getLogger(__name__)


PROMPT_KEYS = ("boxes", "points", "point_labels")


@dataclass
class PredictArguments:
    """Inputs, prompts and outputs of `scripts/predict.py`."""

    model: str = field(
        metadata={
            "help": "A sam_hf output dir, any saved SAM-family model dir (SAM, SAM-HQ, SAM 2.1, SAM 3 tracker, "
            "EdgeTAM), or a Hub id."
        }
    )
    images: str = field(metadata={"help": "One image file or a folder of images."})
    output_dir: str = field(default="predictions", metadata={"help": "Where masks, overlays and scores go."})
    boxes: str | None = field(
        default=None, metadata={"help": "Boxes for every image, 'x0,y0,x1,y1;x0,y0,x1,y1' (pixels, xyxy)."}
    )
    points: str | None = field(
        default=None,
        metadata={"help": "Points of ONE prompt for every image, 'x,y;x,y' (pixels); with one box, they refine it."},
    )
    point_labels: str | None = field(
        default=None, metadata={"help": "Labels of --points, '1,0' (1 positive, 0 negative); default all 1."}
    )
    prompts: str | None = field(
        default=None, metadata={"help": "JSON file of prompts: one set for all images, or one per file name/stem."}
    )
    multimask_output: bool = field(
        default=False, metadata={"help": "Return SAM's three masks per prompt with their predicted IoU."}
    )
    save_masks: str = field(
        default="both", metadata={"help": "'png' (one PNG per mask), 'label' (one uint16 label image), or 'both'."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; cuda if available, else cpu."})
    chunk_size: int = field(default=64, metadata={"help": "Prompts decoded at once."})
    mask_input: str | None = field(
        default=None,
        metadata={
            "help": "A binary mask of the image (PNG; non-zero is the object), e.g. an earlier mask_000.png, fed to "
            "the model as the mask prompt of the one prompt it refines (with correction --points/--point_labels)."
        },
    )
    tile_size: int | None = field(
        default=None,
        metadata={"help": "Decode each prompt on the square tile of this size that holds it (large images)."},
    )
    tile_overlap: int = field(default=0, metadata={"help": "With --tile_size: overlap of neighbouring tiles, px."})
    object_crop_scale: float | None = field(
        default=None,
        metadata={
            "help": "Decode each prompt on its own square crop, this many times the longer side of its box. Defaults "
            "to the scale a model was tuned with (train.py --object_crop_scale, kept in its config.json)."
        },
    )
    text: str | None = field(
        default=None,
        metadata={"help": "A text prompt ('nucleus'): CLIPSeg's heat map gives one box per blob, SAM refines each."},
    )
    text_model: str = field(
        default=DEFAULT_TEXT_MODEL, metadata={"help": "CLIPSeg checkpoint for --text (Hub id or dir)."}
    )
    text_threshold: float = field(default=0.4, metadata={"help": "Heat-map score at which a pixel is in a blob."})
    text_min_area: int = field(default=16, metadata={"help": "Smallest blob, in pixels of CLIPSeg's 352x352 map."})

    def __post_init__(self) -> None:
        if self.save_masks not in ("png", "label", "both"):
            raise ValueError(f"--save_masks must be 'png', 'label' or 'both', got {self.save_masks!r}.")
        if self.text is not None and (self.prompts, self.boxes, self.points) != (None, None, None):
            raise ValueError("Give either --text or box/point prompts (--boxes, --points, --prompts), not both.")
        if self.prompts is None and self.boxes is None and self.points is None and self.text is None:
            raise ValueError("Give prompts: --boxes and/or --points, --prompts <file.json>, or --text.")
        if self.prompts is not None and (self.boxes is not None or self.points is not None):
            raise ValueError("Give prompts either on the command line (--boxes/--points) or in --prompts, not both.")
        if self.point_labels is not None and self.points is None:
            raise ValueError("--point_labels needs --points.")
        windows = [f"--{name}" for name in ("tile_size", "object_crop_scale") if getattr(self, name) is not None]
        if len(windows) > 1:
            raise ValueError("--tile_size and --object_crop_scale are two ways to window the image: choose one.")
        if self.mask_input is not None and windows:
            raise ValueError(f"--mask_input works on the whole image; drop {windows[0]} to use it.")
        if self.text is not None and (windows or self.mask_input is not None):
            raise ValueError(
                f"--text finds its boxes on the whole image: drop {' and '.join(windows + ['--mask_input'])}."
            )
        if self.object_crop_scale is not None:
            check_crop_scale(self.object_crop_scale)
        if self.tile_size is not None and not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"Expected 0 <= --tile_overlap < --tile_size, got {self.tile_overlap}, {self.tile_size}.")


def parse_coordinates(text: str, per_item: int, name: str) -> list[list[float]]:
    """`'1,2,3,4;5,6,7,8'` -> `[[1, 2, 3, 4], [5, 6, 7, 8]]`, checking `per_item` numbers per item."""
    items = []
    for i, part in enumerate(p for p in text.replace(" ", "").split(";") if p):
        try:
            values = [float(v) for v in part.split(",")]
        except ValueError as err:
            raise ValueError(f"--{name}: item {i} {part!r} is not a list of numbers separated by commas.") from err
        if len(values) != per_item:
            raise ValueError(f"--{name}: item {i} {part!r} has {len(values)} numbers, expected {per_item}.")
        items.append(values)
    if not items:
        raise ValueError(f"--{name} {text!r} holds no item.")
    return items


def load_prompts(args: PredictArguments, image_paths: list[Path]) -> dict[Path, dict[str, Any]]:
    """Prompts per image from the command line or the `--prompts` JSON file."""
    if args.prompts is None:
        prompts: dict[str, Any] = {}
        if args.boxes is not None:
            prompts["boxes"] = parse_coordinates(args.boxes, 4, "boxes")
        if args.points is not None:
            prompts["points"] = [parse_coordinates(args.points, 2, "points")]
            if args.point_labels is not None:
                labels = parse_coordinates(args.point_labels, len(prompts["points"][0]), "point_labels")
                prompts["point_labels"] = labels
            if len(prompts.get("boxes", [None])) != 1:
                raise ValueError("--points describe one prompt; combine them with at most one box (or use --prompts).")
        return {p: prompts for p in image_paths}
    path = Path(args.prompts)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--prompts {path}: could not read JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"--prompts {path}: expected a JSON object, got {type(data).__name__}.")
    if set(data) <= set(PROMPT_KEYS):
        return {p: data for p in image_paths}
    out = {}
    for p in image_paths:
        entry = data.get(p.name, data.get(p.stem))
        if entry is None:
            raise ValueError(f"--prompts {path} has no entry for image {p.name} (keys are file names or stems).")
        unknown = set(entry) - set(PROMPT_KEYS)
        if unknown:
            raise ValueError(f"--prompts {path}, entry {p.name}: unknown keys {sorted(unknown)}; use {PROMPT_KEYS}.")
        out[p] = entry
    return out


def _describe_prompt(prompts: dict[str, Any], i: int) -> str:
    parts = []
    for key, name in (("boxes", "box"), ("points", "points")):
        values = prompts.get(key)
        if values is not None and i < len(values):
            parts.append(f"{name} {json.dumps(np.asarray(values[i]).tolist())}")
    return ", ".join(parts) or "no prompt"


def _read_mask(path: str) -> np.ndarray:
    """The `--mask_input` mask, as displayed (EXIF applied), like the image it refines."""
    return np.asarray(open_image(path, f"--mask_input {path}").convert("L")) > 0


def run_prediction(args: PredictArguments) -> dict[str, dict[str, Any]]:
    """Segment every image with its prompts; returns per image the scores and the files written."""
    predictor = SamPredictor.from_pretrained(
        args.model, device=default_device(args.device), chunk_size=args.chunk_size
    )
    model = predictor
    crop_scale = args.object_crop_scale
    trained_scale = trained_crop_scale(model)
    if crop_scale is None and trained_scale and (args.tile_size, args.text, args.mask_input) == (None, None, None):
        crop_scale = trained_scale
        logger.info(
            "%s was tuned on object crops (config.json object_crop_scale %g): each prompt is decoded on its own crop, "
            "as in training; pass --object_crop_scale to choose another scale.",
            args.model,
            crop_scale,
        )
    if args.tile_size is not None:
        predictor = TiledPredictor(model, args.tile_size, args.tile_overlap)
    elif crop_scale is not None:
        predictor = ObjectCropPredictor(model, crop_scale)
    paths = list_images(args.images, "--images")
    prompts = load_prompts(args, paths)
    if args.mask_input is not None and len(paths) != 1:
        raise ValueError(f"--mask_input is a mask of one image, but --images {args.images} holds {len(paths)}.")
    text_prompter = None
    if args.text is not None:
        from ..inference.text_prompts import TextPrompter, heatmap_image

        text_prompter = TextPrompter.from_pretrained(
            args.text_model, device=args.device, threshold=args.text_threshold, min_area=args.text_min_area
        )
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, Any]] = {}
    # The whole image goes to the model, except with tiles (squares of --tile_size).
    longest_edge = processor_longest_edge(model.processor) if args.tile_size is None else None
    for path in tqdm(paths, desc="Predicting", unit="image"):
        image = read_rgb(path)  # as displayed (EXIF orientation applied); errors name the file
        check_aspect_ratio(*image.shape[:2], longest_edge, f"image file {path}")
        try:
            predictor.set_image(image)
            if text_prompter is not None:  # boxes from the text's heat map; `<stem>_heatmap.png` shows it
                found = text_prompter.segment(model, image, args.text, args.multimask_output)
                prompts[path] = {"text": args.text, "boxes": found.boxes.tolist(), "peaks": found.peaks.tolist()}
                heatmap_image(found.heatmap, model.original_size).save(out_dir / f"{path.stem}_heatmap.png")
                prediction = found.prediction
            else:
                extra = {}
                if args.mask_input is not None:
                    extra["mask_input"] = model.mask_input_from_mask(_read_mask(args.mask_input))
                prediction = predictor.predict(**prompts[path], multimask_output=args.multimask_output, **extra)
        except PromptError as err:
            raise PromptError(f"{path.name}: {err}") from err
        best_masks, best_scores = prediction.best()
        files = []
        if args.save_masks in ("png", "both"):
            mask_dir = out_dir / path.stem
            mask_dir.mkdir(exist_ok=True)
            for i, candidates in enumerate(prediction.masks):
                for j, mask in enumerate(candidates):
                    name = f"mask_{i:03d}.png" if len(candidates) == 1 else f"mask_{i:03d}_{j}.png"
                    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / name)
                    files.append(str(mask_dir / name))
        p = prompts[path]
        empty = [i for i, mask in enumerate(best_masks) if not mask.any()]
        for i in empty:
            logger.warning(
                "%s: prompt %d (%s) gave an empty mask (score %.2f). Prompts are in pixels of the %dx%d image; check "
                "that this one lies on an object.",
                path.name,
                i,
                _describe_prompt(p, i),
                best_scores[i],
                image.shape[1],
                image.shape[0],
            )
        if args.save_masks in ("label", "both"):
            labels = label_image(best_masks)
            Image.fromarray(labels).save(out_dir / f"{path.stem}_labels.png")
            Image.fromarray(color_labels(labels)).save(out_dir / f"{path.stem}_labels_color.png")
            files += [str(out_dir / f"{path.stem}_labels.png"), str(out_dir / f"{path.stem}_labels_color.png")]
        overlay(image, best_masks, p.get("boxes"), p.get("points"), p.get("point_labels"), scores=best_scores).save(
            out_dir / f"{path.stem}_overlay.png"
        )
        files.append(str(out_dir / f"{path.stem}_overlay.png"))
        entry = {
            "image": str(path),
            "size": list(image.shape[:2]),
            "prompts": p,
            "scores": prediction.scores.tolist(),
            "best_mask": prediction.scores.argmax(axis=1).tolist(),
            "best_score": best_scores.tolist(),
            "mask_area": best_masks.reshape(len(best_masks), -1).sum(1).tolist(),
            "empty_masks": empty,
            "files": files,
        }
        (out_dir / f"{path.stem}.json").write_text(json.dumps(entry, indent=2) + "\n")
        report[path.name] = entry
    logger.info("Wrote predictions for %d image(s) to %s", len(paths), out_dir)
    return report
