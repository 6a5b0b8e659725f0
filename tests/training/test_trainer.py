from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file
from transformers import SamModel, SamProcessor, TrainingArguments

from sam_hf import SamDataCollator, SamDiceCELoss, SamTrainer, SamTransform, freeze_modules
from sam_hf.config.parser import parse_args
from sam_hf.data.indexing import index_objects
from sam_hf.family.modeling import freeze_unused_decoder_outputs


def _two_image_dataset() -> datasets.Dataset:
    """Image A has one object and image B three, so per-image and per-object averages differ."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for rects in ([(5, 5, 30, 25)], [(2, 2, 12, 12), (30, 40, 60, 60), (40, 5, 55, 20)]):
        img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        inst = np.zeros((64, 64), np.uint16)
        for i, (y0, x0, y1, x1) in enumerate(rects, start=1):
            inst[y0:y1, x0:x1] = i
            img[y0:y1, x0:x1] += 120
        images.append(Image.fromarray(img))
        labels.append(Image.fromarray(inst))
    ds = datasets.Dataset.from_dict({"image": images, "label": labels})
    return index_objects(ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image()))


def _one_step(
    model_dir,
    tmp_path,
    batch_size,
    accumulation,
    multimask=False,
    encoder_calls=None,
    multimask_every=1,
    point_rows=False,
):
    model = SamModel.from_pretrained(model_dir)
    if encoder_calls is not None:
        model.vision_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    processor = SamProcessor.from_pretrained(model_dir)
    freeze_modules(model)
    if not multimask:
        freeze_unused_decoder_outputs(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"ga{batch_size}x{accumulation}m{multimask and multimask_every}p{point_rows}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        seed=0,
        use_cpu=True,  # compared with a CPU reference computed by hand, also on a GPU machine
    )
    data = _two_image_dataset()
    if point_rows:
        # Image B (three objects) is a row for the point pass only: image A alone has a box loss.
        data = data.add_column("point_only", [False, True])
    transform = SamTransform(processor, train=True, point_prompts=multimask, background_points=point_rows, seed=0)
    train = data.with_transform(transform)
    trainer = SamTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=SamDataCollator(),
        processing_class=processor.image_processor,
        multimask_every=multimask_every,
    )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    trainer.train()
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == trainable, "the optimizer must see exactly the trainable parameters"
    return {n: p.detach().cpu().clone() for n, p in model.mask_decoder.named_parameters()}


def _reference_step(model_dir, per_image: bool, iou_term: bool = True):
    """One SGD step computed by hand: mean over all objects (correct) or mean of per-image means (the GA bug), of
    DiceCE plus (with `iou_term`) the squared error of the IoU head's prediction for the output mask."""
    model = SamModel.from_pretrained(model_dir)
    processor = SamProcessor.from_pretrained(model_dir)
    freeze_modules(model)
    freeze_unused_decoder_outputs(model)
    ds = _two_image_dataset().with_transform(SamTransform(processor, train=False))
    loss_fn = SamDiceCELoss()
    losses, counts = [], []
    for i in range(2):
        ex = ds[i]
        out = model(pixel_values=ex["pixel_values"][None], input_boxes=ex["input_boxes"][None], multimask_output=False)
        logits, labels = out.pred_masks[0, :, 0], ex["labels"]
        loss, n = loss_fn(logits[None], labels[None])
        if iou_term:
            # Computed independently of sam_hf.training.loss: IoU of (logit > 0) with (label > 0.5), per object.
            pred, target = logits > 0, labels > 0.5
            inter = (pred & target).flatten(1).sum(1).float()
            union = (pred | target).flatten(1).sum(1).float()
            loss = loss + ((out.iou_scores[0, :, 0] - inter / union) ** 2).mean()
        losses.append(loss)
        counts.append(n)
    if per_image:
        total = (losses[0] + losses[1]) / 2
    else:
        total = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    return {n: p.detach().clone() for n, p in model.mask_decoder.named_parameters()}


def test_gradient_accumulation_equivalence(tiny_model_dir, tmp_path):
    base = {n: p.clone() for n, p in SamModel.from_pretrained(tiny_model_dir).mask_decoder.named_parameters()}
    big_batch = _one_step(tiny_model_dir, tmp_path, batch_size=2, accumulation=1)
    accumulated = _one_step(tiny_model_dir, tmp_path, batch_size=1, accumulation=2)
    reference = _reference_step(tiny_model_dir, per_image=False)
    wrong = _reference_step(tiny_model_dir, per_image=True)
    without_iou = _reference_step(tiny_model_dir, per_image=False, iou_term=False)
    changed = [n for n in base if not torch.equal(base[n], big_batch[n])]
    assert changed, "the step must change the decoder"
    assert any(n.startswith("iou_prediction_head.") for n in changed), "the IoU head must learn by default"
    gap = max((reference[n] - wrong[n]).abs().max().item() for n in changed)
    assert gap > 1e-4, "the test data must tell the right normalisation from the per-image one"
    gap = max((reference[n] - without_iou[n]).abs().max().item() for n in changed)
    assert gap > 1e-4, "the IoU-prediction term must count in the step"
    for n in base:
        torch.testing.assert_close(big_batch[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(accumulated[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_output_dir_layout_and_metrics(trained_run):
    out, metrics = trained_run
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "trainer_state.json",
        "loss_curves.png",
        "eval_predictions.png",
    ):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "](loss_curves.png)" in card and "](eval_predictions.png)" in card
    for key in ("eval_dice", "eval_iou", "base_eval_dice", "base_eval_iou", "eval_loss", "train_loss"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0 <= metrics["eval_dice"] <= 1 and 0 <= metrics["eval_iou"] <= metrics["eval_dice"] + 1e-9
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h["eval_dice"] for h in state["log_history"] if "eval_dice" in h]
    assert len(evals) >= 2 and state["best_metric"] == pytest.approx(max(evals))


@pytest.mark.slow
def test_frozen_modules_bit_identical_and_decoder_changed(trained_run, tiny_model_dir):
    out, _ = trained_run
    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == tuned.keys()
    for name in base:
        if name.startswith(("vision_encoder.", "prompt_encoder.", "shared_image_embedding.")):
            assert torch.equal(base[name], tuned[name]), f"frozen tensor {name} changed"
    trained = [n for n in base if n.startswith("mask_decoder.transformer.") or "output_upscaling" in n]
    assert any(not torch.equal(base[n], tuned[n]) for n in trained), "the mask decoder did not change"
    iou_head = [n for n in base if "iou_prediction_head" in n]
    assert iou_head and any(not torch.equal(base[n], tuned[n]) for n in iou_head), "the IoU head did not learn"


@pytest.mark.slow
def test_from_pretrained_round_trip_and_pipeline(trained_run, tmp_path):
    from transformers import pipeline

    out, _ = trained_run
    model = SamModel.from_pretrained(out).eval()
    model.save_pretrained(tmp_path / "again")
    again = SamModel.from_pretrained(tmp_path / "again").eval()
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 256, 256)
    boxes = torch.tensor([[[10.0, 20.0, 90.0, 120.0], [100.0, 100.0, 200.0, 180.0]]])
    with torch.no_grad():
        a = model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
        b = again(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.iou_scores, b.iou_scores)

    generator = pipeline("mask-generation", model=str(out), points_per_batch=32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3)).astype(np.uint8))
    result = generator(image, points_per_crop=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert "masks" in result and "scores" in result
    assert all(m.shape == (96, 128) for m in result["masks"])


@pytest.mark.slow
def test_model_card_parses(trained_run):
    from huggingface_hub import ModelCard

    out, metrics = trained_run
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "mask-generation" and card.data.library_name == "transformers"
    assert "vision_encoder, prompt_encoder" in card.text
    assert f"{metrics['eval_dice']:.4f}" in card.text and f"{metrics['base_eval_dice']:.4f}" in card.text
    assert "DiceCELoss" in card.text and "jittered outward by up to 5 px" in card.text
    # The card says what was trained: the IoU head on the box-prompted mask, and every 8th object point-prompted.
    loss = next(line for line in card.text.splitlines() if line.startswith("- **Loss:**"))
    assert "IoU-prediction MSE (weight 1) between the IoU head's score" in loss
    assert "for every 8th object of each image (in turn" in loss and "best-of-3" in loss
    assert "IoU head was trained" in card.text and "Every 8th object of each image was also" in card.text


def test_yaml_config_and_argument_errors(tmp_path):

    import yaml

    demo = REPO / "configs" / "demo.yaml"
    model_args, data_args, sam_args, training_args = parse_args([str(demo)])
    assert model_args.model_name_or_path == "models/tiny-sam-base"
    assert data_args.dataset_name == "data/nuclei_demo" and data_args.validation_split_percentage == 25
    assert sam_args.freeze_vision_encoder and sam_args.cache_embeddings
    assert training_args.metric_for_best_model == "dice" and training_args.load_best_model_at_end
    # Flags after the config override it; the rest of the config stays.
    _, data_args, sam_args, training_args = parse_args(
        [str(demo), "--output_dir", str(tmp_path / "o"), "--max_steps", "7", "--multimask_training"]
    )
    assert training_args.output_dir == str(tmp_path / "o") and training_args.max_steps == 7
    config = yaml.safe_load(demo.read_text())
    assert sam_args.multimask_training and sam_args.box_jitter == config["box_jitter"]
    assert data_args.validation_split_percentage == 25 and data_args.object_crop_scale == config["object_crop_scale"]
    assert training_args.load_best_model_at_end and training_args.learning_rate == config["learning_rate"]
    with pytest.raises(ValueError, match="--box_jitter must be >= 0"):
        parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--box_jitter", "-1"])
    with pytest.raises(ValueError, match="--cache_embeddings needs --freeze_vision_encoder"):
        parse_args(
            [
                "--model_name_or_path",
                "m",
                "--dataset_name",
                "d",
                "--output_dir",
                "o",
                "--freeze_vision_encoder",
                "false",
                "--cache_embeddings",
                "true",
            ]
        )


def test_gradient_accumulation_with_multimask_training(tiny_model_dir, tmp_path):
    """The point-prompted multimask terms are scaled like the box term: batch 2 == batch 1 x accumulation 2."""
    base = {n: p.clone() for n, p in SamModel.from_pretrained(tiny_model_dir).mask_decoder.named_parameters()}
    calls = []
    big_batch = _one_step(tiny_model_dir, tmp_path, batch_size=2, accumulation=1, multimask=True, encoder_calls=calls)
    assert len(calls) == 1, "the frozen encoder must run once per step, not once per decoder call"
    accumulated = _one_step(tiny_model_dir, tmp_path, batch_size=1, accumulation=2, multimask=True)
    box_only = _one_step(tiny_model_dir, tmp_path, batch_size=2, accumulation=1)
    # The IoU head learns from every candidate; a multimask token's hypernetwork only when its mask was the best of 3.
    # Without multimask training, the IoU head still learns (from the single-mask output) but the multimask MLPs not.
    for part in ("output_hypernetworks_mlps.1.", "output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3."):
        names = [n for n in base if n.startswith(part)]
        assert all(torch.equal(base[n], box_only[n]) for n in names), f"{part} changed without multimask training"
    assert any(not torch.equal(base[n], box_only[n]) for n in base if n.startswith("iou_prediction_head."))
    changed = [n for n in base if not torch.equal(base[n], big_batch[n])]
    assert any(n.startswith("iou_prediction_head.") for n in changed), "the IoU head did not learn"
    assert any(n.startswith(tuple(f"output_hypernetworks_mlps.{k}." for k in (1, 2, 3))) for n in changed)
    for n in base:
        torch.testing.assert_close(big_batch[n], accumulated[n], rtol=1e-4, atol=1e-6, msg=n)


def _iou_error(model, examples) -> float:
    """Mean |predicted IoU - actual IoU| of the single-mask output over the objects of `examples` (exact boxes)."""
    errors = []
    with torch.no_grad():
        for ex in examples:
            out = model(
                pixel_values=ex["pixel_values"][None], input_boxes=ex["input_boxes"][None], multimask_output=False
            )
            pred, target = out.pred_masks[0, :, 0] > 0, ex["labels"] > 0.5
            actual = (pred & target).flatten(1).sum(1) / (pred | target).flatten(1).sum(1).clamp(min=1)
            errors.append((out.iou_scores[0, :, 0] - actual).abs())
    return torch.cat(errors).mean().item()


def _train_few_steps(model_dir, tmp_path, iou_loss_weight: float) -> tuple[float, float, list[str]]:
    """20 steps on both images with exact boxes: IoU-prediction error before and after, and the IoU head tensors that
    changed. With `iou_loss_weight=0` the head is frozen, as box-only training used to do."""
    model = SamModel.from_pretrained(model_dir)
    processor = SamProcessor.from_pretrained(model_dir)
    freeze_modules(model)
    freeze_unused_decoder_outputs(model, train_iou_head=iou_loss_weight > 0)
    data = _two_image_dataset()
    examples = [data.with_transform(SamTransform(processor, train=False))[i] for i in range(2)]
    before = _iou_error(model.eval(), examples)
    head = {n: p.detach().clone() for n, p in model.mask_decoder.iou_prediction_head.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"iou{iou_loss_weight:g}"),
        per_device_train_batch_size=2,
        max_steps=20,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        seed=0,
        use_cpu=True,
    )
    trainer = SamTrainer(
        model=model,
        args=args,
        train_dataset=data.with_transform(SamTransform(processor, train=True, box_jitter=0, seed=0)),
        data_collator=SamDataCollator(),
        processing_class=processor.image_processor,
        iou_loss_weight=iou_loss_weight,
    )
    trainer.train()
    after = _iou_error(model.eval(), examples)
    changed = [n for n, p in model.mask_decoder.iou_prediction_head.named_parameters() if not torch.equal(head[n], p)]
    return before, after, changed


def test_iou_head_learns_by_default(tiny_model_dir, tmp_path):
    """Default (box-only) training teaches the IoU head the quality of the mask it outputs.

    The masks improve a lot in 20 steps (mean IoU about 0.1 -> 0.5 here), so the IoU head must follow them: a head
    frozen as before predicts about 0 and its error grows with the masks' IoU.
    """
    model = SamModel.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    freeze_unused_decoder_outputs(model)
    trainable = {n for n, p in model.mask_decoder.named_parameters() if p.requires_grad}
    assert any(n.startswith("iou_prediction_head.") for n in trainable), "the IoU head must be trainable by default"
    multimask = tuple(f"output_hypernetworks_mlps.{k}." for k in (1, 2, 3))
    assert not any(n.startswith(multimask) for n in trainable), "single-mask training never reaches these"

    before, after, changed = _train_few_steps(tiny_model_dir, tmp_path, iou_loss_weight=1.0)
    _, frozen_after, frozen_changed = _train_few_steps(tiny_model_dir, tmp_path, iou_loss_weight=0.0)
    assert changed and not frozen_changed
    assert after < before, f"IoU prediction error {before:.3f} -> {after:.3f}"
    assert after < 0.3 * frozen_after, f"error {after:.3f} with the IoU loss, {frozen_after:.3f} without"


def test_gradient_accumulation_with_every_other_object_point_prompted(tiny_model_dir, tmp_path):
    """`multimask_every=2` point-prompts objects 0 and 2 of each image: still batch 2 == batch 1 x accumulation 2,
    and the point pass counts (the multimask MLPs and the update differ from the box-only step)."""
    base = {n: p.clone() for n, p in SamModel.from_pretrained(tiny_model_dir).mask_decoder.named_parameters()}
    big_batch = _one_step(tiny_model_dir, tmp_path, batch_size=2, accumulation=1, multimask=True, multimask_every=2)
    accumulated = _one_step(tiny_model_dir, tmp_path, batch_size=1, accumulation=2, multimask=True, multimask_every=2)
    every_object = _one_step(tiny_model_dir, tmp_path, batch_size=2, accumulation=1, multimask=True)
    changed = [n for n in base if not torch.equal(base[n], big_batch[n])]
    assert any(n.startswith(tuple(f"output_hypernetworks_mlps.{k}." for k in (1, 2, 3))) for n in changed)
    assert any(not torch.allclose(big_batch[n], every_object[n]) for n in changed), "the subset must matter"
    for n in base:
        torch.testing.assert_close(big_batch[n], accumulated[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_accumulation_with_point_only_rows_and_background_points(tiny_model_dir, tmp_path):
    """A micro-batch holding only a point-pass row has no box-prompted object; its point and background terms still
    count, scaled like the rest: batch 2 == batch 1 x accumulation 2."""
    base = {n: p.clone() for n, p in SamModel.from_pretrained(tiny_model_dir).mask_decoder.named_parameters()}
    big_batch = _one_step(tiny_model_dir, tmp_path, batch_size=2, accumulation=1, multimask=True, point_rows=True)
    accumulated = _one_step(tiny_model_dir, tmp_path, batch_size=1, accumulation=2, multimask=True, point_rows=True)
    plain = _one_step(tiny_model_dir, tmp_path, batch_size=2, accumulation=1, multimask=True)
    changed = [n for n in base if not torch.equal(base[n], big_batch[n])]
    assert any(not torch.allclose(big_batch[n], plain[n]) for n in changed), "point rows must change the step"
    for n in base:
        torch.testing.assert_close(big_batch[n], accumulated[n], rtol=1e-4, atol=1e-6, msg=n)


def test_point_pass_without_a_chosen_object_adds_nothing(tiny_model_dir):
    """When the cycling offset passes every object of a micro-batch, the point pass still runs (so every process
    reaches the same parameters) but adds 0 to the loss."""
    model = SamModel.from_pretrained(tiny_model_dir)
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    data = _two_image_dataset().with_transform(SamTransform(processor, train=True, point_prompts=True, seed=0))
    batch = SamDataCollator()([data[0]])  # one object
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    trainer = SamTrainer(model=model, args=args, processing_class=processor.image_processor, multimask_every=4)
    model.train()
    trainer.state.global_step = 3  # objects 3, 7, ...: none here
    calls = []
    model.mask_decoder.register_forward_hook(lambda *_: calls.append(1))
    loss = trainer.compute_loss(model, batch)
    assert len(calls) == 2, "the box pass and the (empty) point pass"
    box_only = trainer.compute_loss(
        model, {k: v for k, v in batch.items() if k not in ("input_points", "input_labels")}
    )
    torch.testing.assert_close(loss, box_only)
    loss.backward()
    assert all(p.grad is not None for p in model.mask_decoder.output_hypernetworks_mlps[1].parameters())
    trainer.state.global_step = 4  # object 0 has its turn
    assert trainer.compute_loss(model, batch) > box_only + 1e-6


def test_learning_encoder_runs_once_for_both_decoder_calls(tiny_model_dir, tmp_path):
    """With a trainable encoder and a point pass, the encoder runs once per step and both losses reach it: the
    gradients equal those of two full forwards (one per decoder call)."""
    from sam_hf.training.loss import iou_prediction_loss, multimask_loss

    model = SamModel.from_pretrained(tiny_model_dir)
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    freeze_modules(model, freeze_vision_encoder=False)
    args = TrainingArguments(output_dir=str(tmp_path / "enc"), report_to="none", use_cpu=True, save_strategy="no")
    train = _two_image_dataset().with_transform(SamTransform(processor, train=True, point_prompts=True, seed=0))
    trainer = SamTrainer(
        model=model, args=args, train_dataset=train, data_collator=SamDataCollator(), multimask_every=1
    )
    batch = SamDataCollator()([train[0], train[1]])
    calls = []
    handle = model.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    trainer.compute_loss(model, batch).backward()
    handle.remove()
    assert len(calls) == 1, "the learning encoder must run once for both decoder calls"
    shared = {n: p.grad.clone() for n, p in model.vision_encoder.named_parameters() if p.grad is not None}
    model.zero_grad()

    # The same loss with the encoder run once per decoder call.
    loss_fn = SamDiceCELoss()
    box = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    logits = box.pred_masks[:, :, 0]
    loss, n_objects = loss_fn(logits, batch["labels"])
    loss = loss + iou_prediction_loss(logits, box.iou_scores[:, :, 0], batch["labels"])
    points = model(
        pixel_values=batch["pixel_values"],
        input_points=batch["input_points"],
        input_labels=batch["input_labels"],
        multimask_output=True,
    )
    mask_sum, iou_sum, _ = multimask_loss(loss_fn, points.pred_masks, points.iou_scores, batch["labels"], "sum")
    (loss + (mask_sum + iou_sum) / n_objects).backward()
    reference = {n: p.grad for n, p in model.vision_encoder.named_parameters() if p.grad is not None}
    assert shared.keys() == reference.keys() and shared
    for name in reference:
        torch.testing.assert_close(shared[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


def _point_batch(model_dir, background: bool):
    processor = SamProcessor.from_pretrained(model_dir)
    transform = SamTransform(processor, train=True, point_prompts=True, background_points=background, seed=0)
    data = _two_image_dataset().with_transform(transform)
    return processor, SamDataCollator()([data[0], data[1]])


def test_background_point_loss_matches_a_hand_computation(tiny_model_dir):
    """The background term: per image, the mean over the three candidates of the mean softplus of their logits (the
    cross-entropy against an empty mask) plus their squared predicted IoU, summed and divided by the objects."""
    model = SamModel.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    processor, batch = _point_batch(tiny_model_dir, background=True)
    assert batch["background_labels"].tolist() == [[[1]], [[1]]]
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)

    def loss(weight):
        trainer = SamTrainer(
            model=model, args=args, processing_class=processor.image_processor, background_point_weight=weight
        )
        return trainer.compute_loss(model, batch)

    model.train()
    with torch.no_grad():
        out = model(
            pixel_values=batch["pixel_values"],
            input_points=batch["background_points"],
            input_labels=torch.ones(2, 1, 1, dtype=torch.long),
            multimask_output=True,
        )
        logits, scores = out.pred_masks[:, 0], out.iou_scores[:, 0]
        hand = (torch.nn.functional.softplus(logits).mean((-2, -1)) + scores**2).mean(1).sum() / 4  # 1 + 3 objects
        with_background, without = loss(0.5), loss(0.0)
    torch.testing.assert_close(with_background - without, 0.5 * hand, rtol=1e-4, atol=1e-6)
    # Without background points in the batch the weight changes nothing.
    _, plain = _point_batch(tiny_model_dir, background=False)
    with torch.no_grad():
        torch.testing.assert_close(
            SamTrainer(model=model, args=args, processing_class=processor.image_processor).compute_loss(model, plain),
            without,
        )


def test_point_only_rows_train_the_point_pass_and_not_the_box_output(tiny_model_dir):
    """Rows cut for the point prompts (`point_only`): no box loss, so the box output's hypernetwork (mask token 0,
    which only `multimask_output=False` uses) gets no gradient, while the multimask ones do, even at a step where
    the cycle of `multimask_every` gives no object its turn."""
    model = SamModel.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    processor, batch = _point_batch(tiny_model_dir, background=False)
    labels = batch["labels"]
    batch = {**batch, "point_only": torch.tensor([True, True]), "point_labels": labels}
    batch["labels"] = torch.full_like(labels, -100.0)
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    trainer = SamTrainer(model=model, args=args, processing_class=processor.image_processor, multimask_every=8)
    model.train()
    trainer.state.global_step = 3  # no object has its turn in the cycle: point-only rows are prompted anyway
    loss = trainer.compute_loss(model, batch)
    assert loss > 0
    loss.backward()
    hypernetworks = model.mask_decoder.output_hypernetworks_mlps
    assert all(p.grad is None or not p.grad.any() for p in hypernetworks[0].parameters())
    # Best-of-3: each object's mask loss reaches the hypernetwork of its best candidate only.
    assert any(p.grad is not None and p.grad.any() for k in (1, 2, 3) for p in hypernetworks[k].parameters())


def test_point_pass_decodes_only_the_rows_it_prompts(tiny_model_dir):
    """With a point-only row in the batch and no turn for the other row's objects, the point pass decodes that one
    row; its loss is the multimask loss of that row decoded on its own, divided by the box-prompted objects."""
    from sam_hf.training.loss import multimask_loss

    model = SamModel.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    processor, batch = _point_batch(tiny_model_dir, background=False)
    labels = batch["labels"]
    box_labels = labels.clone()
    box_labels[1] = -100.0  # row 1 (three objects) is for the point pass only; row 0 has one
    batch = {**batch, "labels": box_labels, "point_only": torch.tensor([False, True]), "point_labels": labels}
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    trainer = SamTrainer(model=model, args=args, processing_class=processor.image_processor, multimask_every=8)
    model.train()
    trainer.state.global_step = 5  # object 5 and later have their turn: none of row 0
    decoded = []
    model.mask_decoder.register_forward_hook(
        lambda module, args, kwargs, out: decoded.append(kwargs["image_embeddings"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        box_only = trainer.compute_loss(model, {k: batch[k] for k in ("pixel_values", "input_boxes", "labels")})
        out = model(
            pixel_values=batch["pixel_values"][1:],
            input_points=batch["input_points"][1:],
            input_labels=batch["input_labels"][1:],
            multimask_output=True,
        )
        mask_sum, iou_sum, _ = multimask_loss(
            SamDiceCELoss(), out.pred_masks, out.iou_scores, labels[1:], reduction="sum"
        )
    assert decoded[:2] == [2, 1], "the box pass decodes both rows, the point pass row 1 alone"
    n_box_objects = int((box_labels[0] != -100).flatten(1).any(1).sum())
    assert n_box_objects == 1  # image A has one object
    torch.testing.assert_close(loss, box_only + (mask_sum + iou_sum) / n_box_objects, rtol=1e-5, atol=1e-6)


def test_objective_computes_the_loss_without_a_trainer(tiny_model_dir):
    """`SamObjective` alone (no Trainer, no accelerate) gives the training loss of a batch: the box pass's DiceCE and
    IoU-prediction loss, plus the multimask point pass and the background points, each a sum divided by the
    box-prompted objects, computed here with one full forward per decoder call."""
    from sam_hf.family.registry import family_of
    from sam_hf.training.loss import multimask_loss
    from sam_hf.training.objective import SamObjective

    model = SamModel.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    _, batch = _point_batch(tiny_model_dir, background=True)
    family = family_of(model)
    objective = SamObjective(family, family.geometry(model.config), multimask_every=1, background_point_weight=0.5)
    model.train()
    with torch.no_grad():
        loss, n_objects, outputs = objective(model, batch, step=0)
        pixels, labels = batch["pixel_values"], batch["labels"]
        box = model(pixel_values=pixels, input_boxes=batch["input_boxes"], multimask_output=False)
        logits = box.pred_masks[:, :, 0]
        pred, target = logits > 0, labels > 0.5
        real = labels[:, :, 0, 0] != -100
        iou = (pred & target).flatten(2).sum(2).float() / (pred | target).flatten(2).sum(2).float()
        box_loss = SamDiceCELoss()(logits, labels)[0] + ((box.iou_scores[:, :, 0] - iou)[real] ** 2).mean()
        points = model(
            pixel_values=pixels,
            input_points=batch["input_points"],
            input_labels=batch["input_labels"],
            multimask_output=True,
        )
        mask_sum, iou_sum, _ = multimask_loss(SamDiceCELoss(), points.pred_masks, points.iou_scores, labels, "sum")
        empty = model(
            pixel_values=pixels,
            input_points=batch["background_points"],
            input_labels=torch.ones(2, 1, 1, dtype=torch.long),
            multimask_output=True,
        )
        bg_logits, bg_scores = empty.pred_masks[:, 0], empty.iou_scores[:, 0]
        background = (torch.nn.functional.softplus(bg_logits).mean((-2, -1)) + bg_scores**2).mean(1).sum()
    assert n_objects == 4  # 1 + 3 objects
    torch.testing.assert_close(outputs.pred_masks, box.pred_masks)
    hand = box_loss + (mask_sum + iou_sum) / 4 + 0.5 * background / 4
    torch.testing.assert_close(loss, hand, rtol=1e-4, atol=1e-6)


def test_objective_prompt_type_turns_with_the_step(tiny_model_dir):
    """`prompt_types` are taken in turn, one per training step; evaluation always prompts boxes."""
    from sam_hf.family.registry import family_of
    from sam_hf.training.objective import SamObjective

    model = SamModel.from_pretrained(tiny_model_dir)
    family = family_of(model)
    objective = SamObjective(family, family.geometry(model.config), prompt_types="box,point,box+point")
    assert [objective.prompt_kind(step, training=True) for step in range(5)] == [
        "box",
        "point",
        "box+point",
        "box",
        "point",
    ]
    assert objective.prompt_kind(1, training=False) == "box"
    with pytest.raises(ValueError, match="multimask_every must be >= 0"):
        SamObjective(family, family.geometry(model.config), multimask_every=-1)


def test_sam_arguments_flags_defaults_and_checks():
    """`SamArguments`, built from one dataclass per concern, has every flag with its default, and each group's checks
    still refuse a bad value with the flag's name."""
    argv = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]
    _, _, sam_args, _ = parse_args(argv)
    assert vars(sam_args) == {
        "box_jitter": 20.0,
        "max_objects_per_image": 16,
        "multimask_training": False,
        "multimask_every": 8,
        "prompt_types": "box",
        "num_correction_rounds": 0,
        "background_point_weight": 0.1,
        "iou_loss_weight": 1.0,
        "lambda_dice": 1.0,
        "lambda_ce": 1.0,
        "cache_embeddings": True,  # on by default with the frozen vision encoder
        "embedding_dtype": "float16",
        "embedding_batch_size": None,
        "embedding_cache_dir": None,
        "lora_rank": None,
        "lora_alpha": None,
        "lora_dropout": 0.0,
        "lora_target_modules": None,
        "lora_merge": True,
        "freeze_vision_encoder": True,
        "freeze_prompt_encoder": True,
        "early_stopping_patience": None,
        "eval_before_training": True,
        "overwrite_output_dir": False,
    }
    for flag, value in (
        ("--num_correction_rounds", "-1"),  # prompts
        ("--iou_loss_weight", "-1"),  # loss
        ("--embedding_dtype", "int8"),  # cache
        ("--lora_alpha", "2"),  # LoRA (without --lora_rank)
    ):
        with pytest.raises(ValueError, match=flag):
            parse_args([*argv, flag, value])
