from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, numpy_dice_iou
from transformers import SamModel, SamProcessor, TrainingArguments

from sam_hf import SamDataCollator, SamPredictor, SamTrainer, SamTransform
from sam_hf.core.masks import boxes_from_instances, mask_to_instances
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source
from sam_hf.evaluation.arguments import parse_model_specs
from sam_hf.evaluation.boxes import evaluate_models
from sam_hf.evaluation.report import summarize, to_markdown
from sam_hf.training.metrics import compute_metrics


def test_model_specs():
    assert parse_model_specs(["base=a/b", "runs/tuned/"]) == {"base": "a/b", "tuned": "runs/tuned/"}
    with pytest.raises(ValueError, match="used twice"):
        parse_model_specs(["x=a", "x=b"])


@pytest.fixture(scope="module")
def eval_images(nuclei_dir):
    ds = load_source(str(nuclei_dir))["train"].select(range(3))
    return index_objects(ds, "auto", "eval")


@pytest.mark.slow
def test_evaluation_agrees_with_independent_numpy(eval_images, tiny_model_dir, trained_run):
    tuned_dir, _ = trained_run
    predictors = {
        "base": SamPredictor.from_pretrained(str(tiny_model_dir)),
        "tuned": SamPredictor.from_pretrained(str(tuned_dir)),
    }
    result = evaluate_models(predictors, eval_images)
    objects = result["objects"]
    assert len(objects) == sum(eval_images["num_objects"])
    # Independent path: plain processor + full forward + post-processing, then NumPy Dice / IoU per object.
    for name, path in (("base", tiny_model_dir), ("tuned", tuned_dir)):
        model, processor = SamModel.from_pretrained(path).eval(), SamProcessor.from_pretrained(path)
        expected_dice, expected_iou, expected_scores, areas = [], [], [], []
        for row in eval_images:
            inst = mask_to_instances(row["label"])
            boxes = boxes_from_instances(inst)
            inputs = processor(images=row["image"].convert("RGB"), input_boxes=[boxes.tolist()], return_tensors="pt")
            with torch.no_grad():
                out = model(
                    pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False
                )
            masks = processor.post_process_masks(
                out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )
            expected_scores.extend(out.iou_scores[0, :, 0].tolist())
            for k, mask in enumerate(masks[0][:, 0].numpy()):
                d, i = numpy_dice_iou(mask, inst == k + 1)
                expected_dice.append(d)
                expected_iou.append(i)
                areas.append(int((inst == k + 1).sum()))
        got_dice = np.array([o["dice"][name] for o in objects])
        np.testing.assert_allclose(got_dice, expected_dice, atol=2e-3)  # a pixel at the threshold may flip
        np.testing.assert_allclose([o["iou"][name] for o in objects], expected_iou, atol=2e-3)
        assert [o["area"] for o in objects] == areas
        np.testing.assert_allclose([o["predicted_iou"][name] for o in objects], expected_scores, atol=1e-5)
    # Summary statistics against NumPy directly.
    summary = summarize(objects, ["base", "tuned"])
    dice = np.array([o["dice"]["tuned"] for o in objects])
    area = np.array([o["area"] for o in objects])
    m = summary["models"]["tuned"]
    assert m["dice"]["mean"] == pytest.approx(dice.mean()) and m["dice"]["median"] == pytest.approx(np.median(dice))
    small = area <= np.quantile(area, 1 / 3)
    assert m["size_terciles"]["small"]["num_objects"] == small.sum() >= 1
    assert m["size_terciles"]["small"]["dice"] == pytest.approx(dice[small].mean())
    first = [o for o in objects if o["image"] == 0]
    assert m["per_image"][0]["dice"] == pytest.approx(np.mean([o["dice"]["tuned"] for o in first]))
    assert sum(t["num_objects"] for t in m["size_terciles"].values()) == len(objects)
    predicted = np.array([o["predicted_iou"]["tuned"] for o in objects])
    actual = np.array([o["iou"]["tuned"] for o in objects])
    assert m["predicted_iou"]["mean"] == pytest.approx(predicted.mean())
    assert m["predicted_iou"]["correlation"] == pytest.approx(np.corrcoef(predicted, actual)[0, 1])
    table = to_markdown(summary)
    assert f"| tuned | {predicted.mean():.4f} | {actual.mean():.4f} |" in table
    assert f"{m['dice']['mean']:.4f}" in table and "| base |" in table


def test_shared_encoding_and_seeded_jitter(eval_images, tiny_model_dir):
    a, b = SamPredictor.from_pretrained(str(tiny_model_dir)), SamPredictor.from_pretrained(str(tiny_model_dir))
    calls = {"a": 0, "b": 0}
    for name, p in (("a", a), ("b", b)):
        p.model.vision_encoder.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    exact = evaluate_models({"a": a, "b": b}, eval_images)["objects"]
    assert calls == {"a": len(eval_images), "b": 0}, "identical encoders must share one encoding per image"
    assert all(o["dice"]["a"] == o["dice"]["b"] for o in exact)
    j1 = evaluate_models({"a": a}, eval_images, box_jitter=6, jitter_seed=3)["objects"]
    j2 = evaluate_models({"a": a}, eval_images, box_jitter=6, jitter_seed=3)["objects"]
    assert [o["dice"]["a"] for o in j1] == [o["dice"]["a"] for o in j2]
    assert [o["dice"]["a"] for o in j1] != [o["dice"]["a"] for o in exact]


@pytest.mark.slow
def test_trainer_evaluation_counts_each_object_once(eval_images, trained_run, tmp_path):
    """In-training eval (batched, objects padded to the batch maximum) equals the per-image evaluation."""
    tuned_dir, _ = trained_run
    model, processor = SamModel.from_pretrained(tuned_dir), SamProcessor.from_pretrained(tuned_dir)
    counts = eval_images["num_objects"]
    assert len(set(counts)) > 1  # unequal counts: the collator pads
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none", use_cpu=True)
    trainer = SamTrainer(
        model=model,
        args=args,
        eval_dataset=eval_images.with_transform(SamTransform(processor, train=False, with_instances=True)),
        data_collator=SamDataCollator(),
        processing_class=processor.image_processor,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    independent = evaluate_models({"t": SamPredictor(model, processor)}, eval_images)["objects"]
    assert metrics["eval_num_objects"] == sum(counts)
    assert metrics["eval_dice"] == pytest.approx(np.mean([o["dice"]["t"] for o in independent]), abs=1e-3)


@pytest.mark.slow
def test_evaluate_script_writes_json_and_markdown(tiny_model_dir, trained_run, nuclei_dir, tmp_path):
    tuned_dir, _ = trained_run
    out = tmp_path / "eval"
    cmd = [
        sys.executable, str(REPO / "scripts" / "evaluate.py"),
        "--model", f"base={tiny_model_dir}", f"tuned={tuned_dir}",
        "--dataset_name", str(nuclei_dir), "--validation_split_percentage", "25", "--max_eval_samples", "2",
        "--output_dir", str(out), "--num_figure_images", "0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_images"] == 2 and set(summary["models"]) == {"base", "tuned"}
    assert summary["boxes"] == "exact"
    for m in summary["models"].values():
        assert f"{m['dice']['mean']:.4f}" in (out / "metrics.md").read_text()
    lines = (out / "per_object.jsonl").read_text().splitlines()
    assert len(lines) == summary["num_objects"]
    assert "| tuned |" in proc.stdout


def test_automatic_mask_evaluation_against_numpy(eval_images, tiny_model_dir):
    from transformers import pipeline

    from sam_hf.evaluation.automatic import evaluate_automatic

    subset = eval_images.select(range(1))
    settings = {"points_per_crop": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    got = evaluate_automatic({"m": str(tiny_model_dir)}, subset, **settings)["m"]
    generator = pipeline("mask-generation", model=str(tiny_model_dir))
    row = subset[0]
    result = generator(row["image"].convert("RGB"), **settings)
    inst = mask_to_instances(row["label"])
    best = []
    for k in range(1, inst.max() + 1):
        ious = [numpy_dice_iou(np.asarray(m, bool), inst == k)[1] for m in result["masks"]]
        best.append(max(ious))
    matched = sum(
        any(numpy_dice_iou(np.asarray(m, bool), inst == k)[1] >= 0.5 for k in range(1, inst.max() + 1))
        for m in result["masks"]
    )
    # AP from the pipeline's scores: masks in descending score each claim the free object they overlap most.
    from sam_hf.core.scores import average_precision

    scores = np.asarray(result["scores"], np.float64).reshape(-1)
    free, hits = set(range(1, inst.max() + 1)), []
    for j in np.argsort(-scores, kind="stable"):
        ious = {k: numpy_dice_iou(np.asarray(result["masks"][j], bool), inst == k)[1] for k in free}
        k = max(ious, key=ious.get, default=None)
        hits.append(k is not None and ious[k] >= 0.5)
        if hits[-1]:
            free.discard(k)
    assert got["num_masks"] == len(result["masks"]) > 0 and got["num_objects"] == inst.max()
    assert got["mean_best_iou"] == pytest.approx(np.mean(best), abs=1e-6)
    assert got["recall@0.5"] == pytest.approx(np.mean(np.array(best) >= 0.5))
    assert got["precision@0.5"] == pytest.approx(matched / len(result["masks"]))
    assert got["ap@0.5"] == pytest.approx(average_precision(np.sort(scores)[::-1], hits, inst.max()))


def test_cached_embeddings_give_the_same_scores(eval_images, tiny_model_dir, tmp_path):
    from sam_hf.data.cache import add_image_embeddings

    predictor = SamPredictor.from_pretrained(str(tiny_model_dir))
    cached = add_image_embeddings(
        eval_images, predictor.model, predictor.processor.image_processor, dtype="float32", cache_dir=str(tmp_path)
    )
    from_images = evaluate_models({"m": predictor}, eval_images)["objects"]
    from_cache = evaluate_models({"m": predictor}, cached, use_cached_embeddings=True)["objects"]
    np.testing.assert_allclose([o["dice"]["m"] for o in from_cache], [o["dice"]["m"] for o in from_images], atol=1e-3)
    with pytest.raises(ValueError, match="image_embeddings"):
        evaluate_models({"m": predictor}, eval_images, use_cached_embeddings=True)
    with pytest.raises(ValueError, match="shape"):
        predictor.set_image_embeddings(np.zeros((3, 4, 4)), (10, 10), (10, 10))


class _BoxFillingPredictor(SamPredictor):
    """A predictor whose mask for a box is the filled box (a known, model-free answer); it records the prompts it
    was asked to decode at once."""

    def __init__(self, model_dir, chunk_size):
        model, processor = SamModel.from_pretrained(model_dir), SamProcessor.from_pretrained(model_dir)
        super().__init__(model, processor, chunk_size=chunk_size)
        self.calls: list[np.ndarray] = []

    def set_image(self, image):  # only the size matters here
        self.original_size = tuple(np.asarray(image).shape[:2])
        self.image_embeddings = torch.zeros(1)

    def predict(self, boxes=None, **_):
        from sam_hf.inference.predictor import SamPrediction

        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        self.calls.append(boxes)
        h, w = self.original_size
        masks = np.zeros((len(boxes), 1, h, w), bool)
        for k, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            masks[k, 0, y0 : y1 + 1, x0 : x1 + 1] = True
        return SamPrediction(masks, np.ones((len(boxes), 1), np.float32), np.zeros((len(boxes), 1, 2, 2)))


def _instance_dataset(instances: np.ndarray):
    import datasets
    from PIL import Image

    image = Image.fromarray(np.zeros((*instances.shape, 3), np.uint8))
    ds = datasets.Dataset.from_dict({"image": [image], "label": [Image.fromarray(instances)]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())
    return index_objects(ds, "instance", "eval")


def test_chunked_evaluation_matches_the_dense_computation(tiny_model_dir):
    """Per-object scores from chunks and crops equal Dice/IoU of full (K, H, W) masks computed densely."""
    rng = np.random.default_rng(0)
    instances = rng.integers(0, 12, (40, 30)).astype(np.uint8)  # 11 scattered objects with overlapping boxes
    instances[instances == 7] = 0  # an id gap: ids are renumbered 1..10
    ds = _instance_dataset(instances)
    predictor = _BoxFillingPredictor(str(tiny_model_dir), chunk_size=3)
    objects = evaluate_models({"m": predictor}, ds, mask_type="instance", box_jitter=4, jitter_seed=1)["objects"]
    assert [len(c) for c in predictor.calls] == [3, 3, 3, 1]
    inst = mask_to_instances(instances, "instance")
    k = int(inst.max())
    assert k == 10 and len(objects) == k
    gt = inst[None] == np.arange(1, k + 1)[:, None, None]  # dense: (K, H, W)
    pred = np.zeros_like(gt)
    for i, (x0, y0, x1, y1) in enumerate(np.round(np.concatenate(predictor.calls)).astype(int)):
        pred[i, y0 : y1 + 1, x0 : x1 + 1] = True
    expected = [numpy_dice_iou(p, g) for p, g in zip(pred, gt)]
    np.testing.assert_allclose([o["dice"]["m"] for o in objects], [e[0] for e in expected], rtol=1e-12)
    np.testing.assert_allclose([o["iou"]["m"] for o in objects], [e[1] for e in expected], rtol=1e-12)
    assert 0.05 < np.mean([e[0] for e in expected]) < 0.9  # a case where cropping mistakes would show


def test_evaluation_memory_does_not_grow_with_objects(tiny_model_dir):
    """10,000 one-pixel objects in a 200x200 mask: (K, H, W) masks would need 400 MB per array; the chunked
    evaluation stays within a few chunks of H x W."""
    import tracemalloc

    instances = np.zeros((200, 200), np.uint16)
    instances[::2, ::2] = np.arange(1, 10_001).reshape(100, 100)
    ds = _instance_dataset(instances)
    predictor = _BoxFillingPredictor(str(tiny_model_dir), chunk_size=64)
    tracemalloc.start()
    try:
        objects = evaluate_models({"m": predictor}, ds, mask_type="instance", num_figure_images=1)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Figure: 2 x 256 x 40,000 = 20 MB; chunks: 64 x 40,000 = 2.6 MB. Dense would be >= 2 x 400 MB.
    assert peak < 60 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert max(len(c) for c in predictor.calls) == 64 and sum(len(c) for c in predictor.calls) == 10_000
    assert len(objects["objects"]) == 10_000
    assert all(o["dice"]["m"] == 1.0 for o in objects["objects"])  # exact boxes of one-pixel objects
    sample = objects["figure_samples"][0]
    assert sample["gt_masks"].shape == sample["predictions"]["m"].shape == (256, 200, 200)
    assert len(sample["dice"]["m"]) == 256


def test_automatic_matching_through_the_instance_map_matches_dense_iou():
    from sam_hf.core.scores import match_masks

    rng = np.random.default_rng(3)
    instances = np.zeros((30, 40), np.int32)
    for k in range(1, 9):
        y, x = rng.integers(0, 25), rng.integers(0, 35)
        instances[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = k
    present = np.unique(instances[instances > 0])
    instances = np.searchsorted(present, instances) * (instances > 0) + (instances > 0)  # ids 1..N, no gaps
    n = int(instances.max())
    generated = [rng.random((30, 40)) < 0.1, instances == 2, (instances == 3) | (instances == 4), np.zeros((30, 40))]
    # Dense reference: IoU of every (mask, object) pair from full (K, H, W) masks.
    iou = np.array(
        [[numpy_dice_iou(np.asarray(g, bool), instances == k)[1] for k in range(1, n + 1)] for g in generated]
    )
    iou[~np.array([np.asarray(g, bool).any() for g in generated])] = 0.0  # an empty mask matches nothing
    best, matched, count, hits = match_masks(generated, instances, n)
    np.testing.assert_allclose(best, iou.max(0))
    assert matched == int((iou.max(1) >= 0.5).sum()) and count == 4
    # One to one, by score: of two masks on object 2 only the higher-scoring one is a true positive.
    generated = [instances == 2, instances == 3, instances == 2, np.zeros((30, 40))]
    _, matched, _, hits = match_masks(generated, instances, n, scores=[0.2, 0.5, 0.9, 0.95])
    assert hits.tolist() == [False, True, True, False] and matched == 3
    _, _, _, hits = match_masks(generated, instances, n)  # no scores: the order given
    assert hits.tolist() == [True, True, False, False]


def test_average_precision_by_hand():
    from sam_hf.core.scores import average_precision

    # Ranked: hit, miss, hit, miss over 3 objects. Precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3; the best
    # precision at or beyond each recall level: 1 for the 34 levels 0..0.33, 2/3 for the 33 levels 0.34..0.66, and 0
    # for the 34 levels 0.67..1 that no ranking reaches.
    expected = (34 * 1 + 33 * 2 / 3) / 101
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 3) == pytest.approx(expected)
    assert average_precision([0.6, 0.8, 0.9, 0.7], [0, 0, 1, 1], 3) == pytest.approx(expected)  # any input order
    assert average_precision([0.9, 0.8], [1, 1], 2) == 1.0
    assert average_precision([0.9, 0.8], [0, 1], 1) == pytest.approx(0.5)
    assert average_precision([], [], 4) == 0.0 and average_precision([0.5], [0], 0) == 0.0
