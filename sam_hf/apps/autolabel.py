"""Auto-labelling: a folder of images -> automatic SAM masks -> a training folder (or a saved `datasets` dataset).

```bash
sam-hf autolabel --model runs/demo --images my_images --output_dir my_labels \\
    --pred_iou_thresh 0.5 --stability_score_thresh 0.8 --min_area 20
```

Each image goes through transformers' `pipeline("mask-generation")` (a grid of point prompts, SAM's three masks per
point, the predicted-IoU and stability filters, box non-maximum suppression). The masks left are filtered by area,
merged into one instance map (where masks overlap, the smaller one wins, as in `sam_hf.label_image`), and written
in the layout of `data/nuclei_demo`, which `scripts/train.py --dataset_name my_labels` reads back as it is. For a
model tuned on object crops (`--object_crop_scale`, kept in its `config.json`), each mask's box is first decoded again
on its own crop (`sam_hf.inference.refine_on_object_crops`), as the model saw its objects in training:

```text
my_labels/
  images/      the input images, copied byte for byte
  masks/       <stem>.png, 0 / 255 binary masks
  instances/   <stem>.png, 16-bit instance maps (0 = background, 1..N the objects)
  contact_sheet.png   thumbnails with the masks in colour and each image's object count
  autolabel.json      settings and per-image counts and scores
```

Masks are drawn on each image as displayed (a photo's EXIF orientation applied, see
`sam_hf.core.images.open_image`), which is how training reads the copy in `images/`.

With `--output_format dataset`, the folder is a `datasets` `save_to_disk` directory instead (columns `image`,
`label`, `file_name`), with the same contact sheet and report beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.env import default_device
from ..core.images import check_aspect_ratio, list_images, processor_longest_edge, read_image_header, read_rgb
from ..core.masks import instance_map
from ..core.windows import check_crop_scale
from ..inference.automatic import mask_generation_pipeline, trained_crop_scale
from ..inference.predictor import SamPredictor
from ..inference.windowed import refine_on_object_crops
from ..viz.overlays import contact_sheet

logger = logging.getLogger(__name__)


OUTPUT_FORMATS = ("folder", "dataset")


REPORT_FILE = "autolabel.json"


CONTACT_SHEET_FILE = "contact_sheet.png"


#: What a previous run wrote, per output format; `--overwrite` removes these (both formats' files), the contact
#: sheet and the report, and nothing else.
_WRITTEN = {
    "folder": ("images", "masks", "instances"),
    "dataset": ("data-*.arrow", "dataset_info.json", "state.json", "dataset_dict.json"),
}


@dataclass
class AutolabelArguments:
    """Inputs, filters and outputs of `sam-hf autolabel`."""

    model: str = field(metadata={"help": "A sam_hf output dir, any saved SamModel dir, or a Hub id."})
    images: str = field(metadata={"help": "A folder of images (or one image file) to label."})
    output_dir: str = field(
        metadata={"help": "Where the labels go; refused if it holds files, unless --overwrite is given."}
    )
    output_format: str = field(
        default="folder",
        metadata={
            "help": "'folder' (images/, masks/, instances/) or 'dataset' (datasets save_to_disk); both read back "
            "with --dataset_name <output_dir>.",
            "choices": list(OUTPUT_FORMATS),
        },
    )
    points_per_side: int = field(default=32, metadata={"help": "A grid of points_per_side^2 point prompts."})
    points_per_batch: int = field(default=64, metadata={"help": "Point prompts decoded at once (memory)."})
    pred_iou_thresh: float = field(
        default=0.88, metadata={"help": "Keep masks whose predicted IoU is at least this (pipeline default)."}
    )
    stability_score_thresh: float = field(
        default=0.95, metadata={"help": "Keep masks at least this stable under threshold changes (pipeline default)."}
    )
    nms_thresh: float = field(
        default=0.7, metadata={"help": "Box IoU above which the lower-scoring of two masks is dropped (NMS)."}
    )
    crops_n_layers: int = field(
        default=0, metadata={"help": "Also segment 4^k crops for k = 1..n (small objects in large images; slower)."}
    )
    object_crop_scale: float | None = field(
        default=None,
        metadata={
            "help": "Decode the box of each automatic mask again on its own square crop, this many times the box's "
            "longer side, and keep the best of overlapping results (sam_hf.inference.refine_on_object_crops). "
            "Defaults to the scale a model was tuned with (train.py --object_crop_scale, kept in its config.json); 0 "
            "turns it off."
        },
    )
    min_area: int = field(
        default=0, metadata={"help": "Drop objects with fewer pixels (after overlaps are resolved)."}
    )
    max_area_fraction: float = field(
        default=0.9, metadata={"help": "Drop masks covering more than this fraction of the image (background)."}
    )
    max_images: int | None = field(default=None, metadata={"help": "Label only the first N images (sorted)."})
    contact_sheet_images: int = field(default=24, metadata={"help": "Images shown on the contact sheet (0: none)."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace the output of a previous run in --output_dir (its images/, masks/, instances/ or "
            "dataset files, contact sheet and report); other files are kept."
        },
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; cuda if available, else cpu."})

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}.")
        for name in ("points_per_side", "points_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("pred_iou_thresh", "stability_score_thresh", "max_area_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}.")
        if not 0.0 < self.nms_thresh <= 1.0:
            raise ValueError(f"--nms_thresh must be in (0, 1], got {self.nms_thresh}.")
        for name in ("crops_n_layers", "min_area", "contact_sheet_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.object_crop_scale is not None:
            check_crop_scale(self.object_crop_scale, off=True)
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"--max_images must be >= 1, got {self.max_images}.")


def _previous_output(out: Path) -> list[Path]:
    """What an earlier run wrote to `out`, in either output format (a folder run after a dataset run leaves no
    stale dataset files behind)."""
    found = []
    for pattern in (*_WRITTEN["folder"], *_WRITTEN["dataset"], REPORT_FILE, CONTACT_SHEET_FILE):
        found += sorted(out.glob(pattern))
    return found


def _prepare_output(args: AutolabelArguments, inputs: list[Path]) -> Path:
    """Create `--output_dir`, or clear a previous run's files from it with `--overwrite`; never touch the inputs."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output_dir {out} is a file; expected a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise FileExistsError(
                f"--output_dir {out} already holds files. Pass --overwrite to replace a previous run's labels there "
                "(other files are kept), or choose another --output_dir."
            )
        previous = _previous_output(out)
        for p in previous:
            for image in inputs:
                if image.resolve() == p.resolve() or p.resolve() in image.resolve().parents:
                    raise ValueError(
                        f"--overwrite would delete {p}, which holds the input image {image}; write the labels to "
                        "another --output_dir."
                    )
        for p in previous:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if previous:
            logger.info("--overwrite: removed %s", ", ".join(str(p) for p in previous))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _mask_generator(args: AutolabelArguments) -> tuple[Any, SamPredictor]:
    """The mask-generation pipeline and a `SamPredictor` on the same model (for object-crop refinement)."""
    predictor = SamPredictor.from_pretrained(args.model, device=default_device(args.device))
    return mask_generation_pipeline(predictor), predictor


def _crop_scale_of(args: AutolabelArguments, predictor: SamPredictor) -> float | None:
    """The object-crop scale to refine with: `--object_crop_scale`, else the one the model was tuned with."""
    if args.object_crop_scale is not None:
        return args.object_crop_scale or None
    trained = trained_crop_scale(predictor)
    if trained:
        logger.info(
            "%s was tuned on object crops (config.json object_crop_scale %g): each automatic mask's box is decoded "
            "again on its own crop, as in training; --object_crop_scale 0 keeps the pipeline's masks as they are.",
            args.model,
            trained,
        )
    return trained


def _png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path)


def run_autolabel(args: AutolabelArguments) -> dict[str, Any]:
    """Label every image of `args.images` with automatic masks and write them to `args.output_dir`.

    Returns:
        The report written to `<output_dir>/autolabel.json`: the settings, and per image its size, the number of
        masks the pipeline returned, how many were dropped (too large, too small, hidden by smaller ones), the
        number of objects written and their predicted IoU scores.
    """
    inputs = list_images(args.images, "--images")
    if args.max_images is not None:
        inputs = inputs[: args.max_images]
    out = _prepare_output(args, inputs)
    generator, predictor = _mask_generator(args)
    crop_scale = _crop_scale_of(args, predictor)
    folder = args.output_format == "folder"
    if folder:
        for name in _WRITTEN["folder"]:
            (out / name).mkdir()
    rows: dict[str, list] = {"image": [], "label": [], "file_name": []}
    sheet_items, per_image = [], {}
    longest_edge = processor_longest_edge(predictor.processor)
    for path in inputs:  # from the headers, before the model runs on any image
        header = read_image_header(path)
        check_aspect_ratio(header.height, header.width, longest_edge, f"image file {path}")
    for path in tqdm(inputs, desc="Auto-labelling", unit="image"):
        # As displayed (EXIF orientation applied), as training reads the copy written below; errors name the file.
        image = read_rgb(path)
        outputs = generator(
            Image.fromarray(image),
            points_per_crop=args.points_per_side,
            points_per_batch=args.points_per_batch,
            crops_n_layers=args.crops_n_layers,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            crops_nms_thresh=args.nms_thresh,
        )
        masks = [np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m, bool) for m in outputs["masks"]]
        masks = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), bool)
        scores = np.asarray(torch.as_tensor(outputs["scores"]).float().cpu(), np.float64).reshape(-1)
        proposals = len(masks)
        if crop_scale:
            masks, scores = refine_on_object_crops(predictor, image, masks, crop_scale, args.nms_thresh)
        instances, kept, dropped = instance_map(masks, args.min_area, args.max_area_fraction)
        stem = path.stem
        entry = {
            "image": str(path),
            "size": list(image.shape[:2]),
            "masks_from_model": proposals,
            "masks_after_refinement": len(masks) if crop_scale else None,
            "dropped": dropped,
            "num_objects": len(kept),
            "scores": [round(float(s), 4) for s in scores[kept]],
            "areas": np.bincount(instances.ravel(), minlength=len(kept) + 1)[1:].tolist(),
        }
        per_image[path.name] = entry
        log = logger.info if len(kept) else logger.warning
        log(
            "%s: %d masks from the model%s, %d objects kept (dropped %d covering more than %.0f%% of the image, %d "
            "under %d px, %d hidden by smaller masks)%s",
            path.name,
            proposals,
            f" ({len(masks)} after refinement on object crops)" if crop_scale else "",
            len(kept),
            dropped["too_large"],
            100 * args.max_area_fraction,
            dropped["too_small"],
            args.min_area,
            dropped["hidden"],
            "" if len(kept) else "; lower --pred_iou_thresh / --stability_score_thresh to keep more",
        )
        if folder:
            shutil.copyfile(path, out / "images" / path.name)
            _png(((instances > 0) * 255).astype(np.uint8), out / "masks" / f"{stem}.png")
            _png(instances, out / "instances" / f"{stem}.png")
        else:
            import io

            buffer = io.BytesIO()
            Image.fromarray(instances).save(buffer, format="PNG")
            rows["image"].append({"bytes": path.read_bytes(), "path": path.name})
            rows["label"].append({"bytes": buffer.getvalue(), "path": f"{stem}.png"})
            rows["file_name"].append(stem)
        if len(sheet_items) < args.contact_sheet_images:
            sheet_items.append((stem, image, instances))
    if not folder:
        import datasets

        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.Image(), "file_name": datasets.Value("string")}
        )
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out))
    if sheet_items:
        contact_sheet(sheet_items).save(out / CONTACT_SHEET_FILE)
    total = sum(e["num_objects"] for e in per_image.values())
    settings = {**asdict(args), "object_crop_scale": crop_scale}
    report = {"settings": settings, "num_images": len(per_image), "num_objects": total, "images": per_image}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    empty = [name for name, e in per_image.items() if not e["num_objects"]]
    logger.info(
        "Wrote %d objects in %d images to %s (%s)%s",
        total,
        len(per_image),
        out,
        "images/, masks/, instances/" if folder else "a save_to_disk dataset",
        f"; {len(empty)} image(s) without any object" if empty else "",
    )
    if total == 0:
        logger.warning(
            "No image got an object: training on %s would find nothing to learn. Lower --pred_iou_thresh and "
            "--stability_score_thresh (a lightly tuned model predicts low IoU scores), or --min_area.",
            out,
        )
    return report
