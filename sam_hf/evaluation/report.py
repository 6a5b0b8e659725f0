"""The evaluation summary: per-model statistics, size terciles and the markdown report."""

from __future__ import annotations

from typing import Any

import numpy as np

TERCILES = ("small", "medium", "large")


def summarize(objects: list[dict[str, Any]], model_names: list[str]) -> dict[str, Any]:
    """Mean / median / count per model, per-image means, and size terciles (edges from ground-truth areas)."""
    areas = np.array([o["area"] for o in objects], np.float64)
    edges = np.quantile(areas, [1 / 3, 2 / 3]).tolist()
    # Tercile by area: small <= q1 < medium <= q2 < large.
    tercile = np.digitize(areas, edges, right=True)
    images = sorted({o["image"] for o in objects})
    summary: dict[str, Any] = {
        "num_images": len(images),
        "num_objects": len(objects),
        "size_tercile_edges_px": edges,
        "models": {},
    }
    for m in model_names:
        dice = np.array([o["dice"][m] for o in objects])
        iou = np.array([o["iou"][m] for o in objects])
        image_of = np.array([o["image"] for o in objects])
        per_image = [
            {
                "image": int(i),
                "name": next(o["name"] for o in objects if o["image"] == i),
                "num_objects": int((image_of == i).sum()),
                "dice": float(dice[image_of == i].mean()),
                "iou": float(iou[image_of == i].mean()),
            }
            for i in images
        ]
        terciles = {}
        for t, label in enumerate(TERCILES):
            sel = tercile == t
            terciles[label] = {
                "num_objects": int(sel.sum()),
                "area_px": [float(areas[sel].min()), float(areas[sel].max())] if sel.any() else None,
                "dice": float(dice[sel].mean()) if sel.any() else None,
                "iou": float(iou[sel].mean()) if sel.any() else None,
            }
        predicted = np.array([o["predicted_iou"][m] for o in objects])
        summary["models"][m] = {
            "num_objects": len(objects),
            "dice": {"mean": float(dice.mean()), "median": float(np.median(dice))},
            "iou": {"mean": float(iou.mean()), "median": float(np.median(iou))},
            "predicted_iou": {"mean": float(predicted.mean()), "correlation": _correlation(predicted, iou)},
            "per_image_mean": {
                "dice": float(np.mean([p["dice"] for p in per_image])),
                "iou": float(np.mean([p["iou"] for p in per_image])),
            },
            "size_terciles": terciles,
            "per_image": per_image,
        }
    return summary


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two samples; `None` where it is undefined (fewer than 2 values, or a constant)."""
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def to_markdown(summary: dict[str, Any]) -> str:
    """Markdown tables of a `summarize` result."""
    models = summary["models"]
    lines = [
        f"Evaluated on {summary['num_images']} images, {summary['num_objects']} objects.",
        "",
        "| model | objects | mean Dice | median Dice | mean IoU | median IoU | per-image mean Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | {m['num_objects']} | {m['dice']['mean']:.4f} | {m['dice']['median']:.4f} | "
            f"{m['iou']['mean']:.4f} | {m['iou']['median']:.4f} | {m['per_image_mean']['dice']:.4f} |"
        )
    lines += [
        "",
        "Predicted IoU (the model's `iou_scores` for its box-prompted mask) against the actual IoU, per object:",
        "",
        "| model | mean predicted IoU | mean actual IoU | correlation |",
        "|---|---|---|---|",
    ]
    for name, m in models.items():
        corr = m["predicted_iou"]["correlation"]
        lines.append(
            f"| {name} | {m['predicted_iou']['mean']:.4f} | {m['iou']['mean']:.4f} | "
            f"{'-' if corr is None else f'{corr:.3f}'} |"
        )
    first = next(iter(models.values()))["size_terciles"]
    heads = [
        f"{t} ({v['area_px'][0]:g}-{v['area_px'][1]:g} px, n={v['num_objects']})" if v["area_px"] else f"{t} (n=0)"
        for t, v in first.items()
    ]
    lines += ["", "Mean Dice by object-size tercile:", "", "| model | " + " | ".join(heads) + " |"]
    lines.append("|---|" + "---|" * len(heads))
    for name, m in models.items():
        cells = [f"{v['dice']:.4f}" if v["dice"] is not None else "-" for v in m["size_terciles"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per-image mean Dice:", "", "| image | objects | " + " | ".join(models) + " |"]
    lines.append("|---|---|" + "---|" * len(models))
    per_image = {name: m["per_image"] for name, m in models.items()}
    for j, row in enumerate(next(iter(per_image.values()))):
        cells = [f"{per_image[name][j]['dice']:.4f}" for name in models]
        lines.append(f"| {row['name']} | {row['num_objects']} | " + " | ".join(cells) + " |")
    if "automatic" in summary:
        st = summary["automatic_settings"]
        extras = "".join(
            [
                f", crops_n_layers {st['crops_n_layers']}" if st.get("crops_n_layers") else "",
                f", each mask decoded again on its object crop ({st['object_crop_scale']:g} x its box)"
                if st.get("object_crop_scale")
                else "",
            ]
        )
        lines += [
            "",
            f"Automatic mask generation (pipeline('mask-generation'), {st['points_per_crop']}x{st['points_per_crop']} "
            f"points, pred_iou_thresh {st['pred_iou_thresh']}, "
            f"stability_score_thresh {st['stability_score_thresh']}{extras}):",
            "",
            "| model | masks | mean best IoU per object | recall@0.5 | precision@0.5 | AP@0.5 |",
            "|---|---|---|---|---|---|",
        ]
        for name, a in summary["automatic"].items():
            lines.append(
                f"| {name} | {a['num_masks']} | {a['mean_best_iou']:.4f} | {a['recall@0.5']:.4f} | "
                f"{a['precision@0.5']:.4f} | {a['ap@0.5']:.4f} |"
            )
    if "interactive" in summary:
        inter = summary["interactive"]
        clicks = range(inter["num_clicks"] + 1)
        lines += [
            "",
            f"Interactive correction ({inter['num_objects']} objects, at most {inter['max_objects_per_image']} per "
            "image): mean Dice after the first prompt and each correction click.",
            "",
            "| model | first prompt | " + " | ".join(f"{c} click{'s' if c != 1 else ''}" for c in clicks) + " |",
            "|---|---|" + "---|" * len(clicks),
        ]
        for name, by_start in inter["models"].items():
            for start, values in by_start.items():
                lines.append(f"| {name} | {start} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines) + "\n"
