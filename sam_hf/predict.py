"""`scripts/predict.py`: segment one image or a folder with box and/or point prompts and write masks, a label
image, an overlay and the scores.

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
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS, to_rgb_array
from .inference import PromptError, SamPredictor, label_image

logger = logging.getLogger(__name__)

__all__ = ["PredictArguments", "load_prompts", "overlay", "parse_coordinates", "run_prediction"]

PROMPT_KEYS = ("boxes", "points", "point_labels")


@dataclass
class PredictArguments:
    """Inputs, prompts and outputs of `scripts/predict.py`."""

    model: str = field(metadata={"help": "A sam_hf output dir, any saved SamModel dir, or a Hub id."})
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
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; defaults to the model's device."})
    chunk_size: int = field(default=64, metadata={"help": "Prompts decoded at once."})

    def __post_init__(self) -> None:
        if self.save_masks not in ("png", "label", "both"):
            raise ValueError(f"--save_masks must be 'png', 'label' or 'both', got {self.save_masks!r}.")
        if self.prompts is None and self.boxes is None and self.points is None:
            raise ValueError("Give prompts: --boxes and/or --points, or --prompts <file.json>.")
        if self.prompts is not None and (self.boxes is not None or self.points is not None):
            raise ValueError("Give prompts either on the command line (--boxes/--points) or in --prompts, not both.")
        if self.point_labels is not None and self.points is None:
            raise ValueError("--point_labels needs --points.")


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


def _palette(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 256, size=(n, 3)).astype(np.float64)


def overlay(
    image: Any,
    masks: np.ndarray,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Draw `(N, H, W)` masks in distinct colours over the image, with the box outlines and the points (positive
    green, negative red). Needs only Pillow."""
    rgb = to_rgb_array(image).astype(np.float64)
    masks = np.asarray(masks, bool)
    colours = _palette(len(masks))
    for mask, colour in zip(masks, colours):
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    out = Image.fromarray(rgb.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    if boxes is not None:
        for box, colour in zip(np.asarray(boxes).reshape(-1, 4), colours):
            draw.rectangle([float(v) for v in box], outline=tuple(int(c) for c in colour), width=1)
    if points is not None:
        points = np.asarray(points).reshape(-1, 2)
        labels = np.ones(len(points)) if point_labels is None else np.asarray(point_labels).reshape(-1)
        for (x, y), label in zip(points, labels):
            r = 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 220, 0) if label else (230, 0, 0), outline="white")
    return out


def _list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"--images {path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        return files
    raise FileNotFoundError(f"--images {path}: no such file or folder.")


def run_prediction(args: PredictArguments) -> dict[str, dict[str, Any]]:
    """Segment every image with its prompts; returns per image the scores and the files written."""
    predictor = SamPredictor.from_pretrained(args.model, device=args.device, chunk_size=args.chunk_size)
    paths = _list_images(Path(args.images))
    prompts = load_prompts(args, paths)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, Any]] = {}
    for path in tqdm(paths, desc="Predicting", unit="image"):
        try:
            image = Image.open(path)
            image.load()
        except OSError as err:
            raise ValueError(f"Could not read image {path}: {err}") from err
        try:
            predictor.set_image(image)
            prediction = predictor.predict(**prompts[path], multimask_output=args.multimask_output)
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
        if args.save_masks in ("label", "both"):
            Image.fromarray(label_image(best_masks)).save(out_dir / f"{path.stem}_labels.png")
            files.append(str(out_dir / f"{path.stem}_labels.png"))
        p = prompts[path]
        overlay(image, best_masks, p.get("boxes"), p.get("points"), p.get("point_labels")).save(
            out_dir / f"{path.stem}_overlay.png"
        )
        files.append(str(out_dir / f"{path.stem}_overlay.png"))
        entry = {
            "image": str(path),
            "size": list(predictor.original_size),
            "prompts": p,
            "scores": prediction.scores.tolist(),
            "best_mask": prediction.scores.argmax(axis=1).tolist(),
            "best_score": best_scores.tolist(),
            "mask_area": best_masks.reshape(len(best_masks), -1).sum(1).tolist(),
            "files": files,
        }
        (out_dir / f"{path.stem}.json").write_text(json.dumps(entry, indent=2) + "\n")
        report[path.name] = entry
    logger.info("Wrote predictions for %d image(s) to %s", len(paths), out_dir)
    return report
