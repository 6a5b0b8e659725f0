"""Interactive prompting: correction clicks, the simulated user, interactive training and the click curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_argv

from sam_hf.config.arguments import parse_prompt_types
from sam_hf.core.clicks import correction_clicks, interior_point, next_click
from sam_hf.evaluation.interactive import interactive_curve
from sam_hf.inference.predictor import SamPrediction


def test_parse_prompt_types():
    assert parse_prompt_types("box, point,box") == ("box", "point")
    assert parse_prompt_types(["box+point"]) == ("box+point",)
    with pytest.raises(ValueError, match="'circle' unknown"):
        parse_prompt_types("box,circle")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_prompt_types("")


def _frame(m: int = 8) -> torch.Tensor:
    labels = torch.zeros(m, m)
    labels[2:6, 2:6] = 1.0  # the object: rows and columns 2..5
    return labels


def test_correction_click_is_positive_in_the_missed_part():
    labels = _frame()
    logits = torch.full((8, 8), -5.0)
    logits[2:6, 2:4] = 5.0  # predicted the left half: columns 4 and 5 are missed (8 px), nothing extra
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        points, positive = correction_clicks(logits[None], labels[None], input_side=64, generator=generator)
        x, y = points[0].tolist()
        # Input frame is 8x the mask frame; pixel centres land on 8 * (index + 0.5).
        col, row = x / 8 - 0.5, y / 8 - 0.5
        assert positive.tolist() == [1] and col in (4.0, 5.0) and 2 <= row <= 5 and row == int(row)


def test_correction_click_is_negative_where_the_mask_spills_over():
    labels = _frame()
    logits = torch.full((8, 8), -5.0)
    logits[2:6, 2:6] = 5.0
    logits[0:2, :] = 5.0  # 16 extra pixels above, nothing missed
    points, positive = correction_clicks(logits[None], labels[None], input_side=8)
    x, y = points[0].tolist()
    assert positive.tolist() == [0] and y - 0.5 in (0.0, 1.0)


def test_correction_click_on_an_exact_mask_or_padding():
    labels = torch.stack([_frame(), torch.full((8, 8), -100.0)])
    logits = torch.where(labels > 0.5, 5.0, -5.0)
    points, positive = correction_clicks(logits, labels, input_side=8)
    x, y = points[0].tolist()
    assert positive.tolist() == [1, 1] and 2 <= x - 0.5 <= 5 and 2 <= y - 0.5 <= 5


def test_next_click_is_the_innermost_pixel_of_the_larger_error():
    target = np.zeros((12, 20), bool)
    target[2:7, 3:8] = True  # 5 x 5 square: innermost pixel at row 4, column 5
    xy, positive = next_click(np.zeros_like(target), target)
    assert positive == 1 and xy.tolist() == [5.0, 4.0]
    spill = target.copy()
    spill[5:12, 13:20] = True  # a 7 x 7 extra block (49 px) against nothing missed: negative, at its centre
    xy, positive = next_click(spill, target)
    assert positive == 0 and xy.tolist() == [16.0, 8.0]
    assert next_click(target, target) is None
    assert interior_point(target).tolist() == [5.0, 4.0]


class _ScriptedPredictor:
    """Returns the masks of a script in turn and records the prompts it gets."""

    def __init__(self, masks: list[np.ndarray]):
        self.masks, self.calls = masks, []

    def predict(self, **prompts):
        self.calls.append(prompts)
        mask = self.masks[min(len(self.calls) - 1, len(self.masks) - 1)]
        logits = np.full((1, 1, 4, 4), float(len(self.calls)))
        return SamPrediction(mask[None, None], np.ones((1, 1)), logits)


def test_interactive_curve_follows_the_simulated_user():
    target = np.zeros((12, 20), bool)
    target[2:7, 3:8] = True
    half = target.copy()
    half[:, 6:] = False  # misses columns 6 and 7 (10 px)
    predictor = _ScriptedPredictor([half, target])
    box = np.array([3, 2, 7, 6])
    scores = interactive_curve(predictor, target, box, num_clicks=3)
    dice_half = 2 * half.sum() / (half.sum() + target.sum())
    # Exact after the first correction: the rest repeat 1.0 without asking the model again.
    assert scores == pytest.approx([dice_half, 1.0, 1.0, 1.0]) and len(predictor.calls) == 2
    first, second = predictor.calls
    assert first["mask_input"] is None and "points" not in first and first["boxes"].tolist() == [box.tolist()]
    assert second["mask_input"].tolist() == np.full((4, 4), 1.0).tolist()  # the first prediction's logits
    assert second["point_labels"].tolist() == [[1]] and second["points"][0, 0].tolist() == list(
        next_click(half, target)[0]
    )

    point_start = _ScriptedPredictor([target])
    assert interactive_curve(point_start, target, None, num_clicks=2) == [1.0, 1.0, 1.0]
    assert point_start.calls[0]["points"][0].tolist() == [[5.0, 4.0]] and "boxes" not in point_start.calls[0]


def _train(model_dir, data_dir, out, *extra):
    from sam_hf.config.parser import parse_args
    from sam_hf.training.run import run_training

    argv = train_argv(
        model_dir, data_dir, out, max_objects_per_image=3, learning_rate=1e-3, eval_before_training=False
    )
    run_training(*parse_args(argv + list(extra)))


@pytest.mark.slow
def test_interactive_training_runs_each_round_on_the_previous_logits(
    tiny_model_dir, nuclei_dir, tmp_path, monkeypatch
):
    import sam_hf.training.objective as objective_module

    calls = []
    original = objective_module.correction_clicks

    def recording(logits, labels, input_side, generator=None):
        calls.append((logits.clone(), labels.clone(), input_side))
        return original(logits, labels, input_side, generator)

    monkeypatch.setattr(objective_module, "correction_clicks", recording)
    out = tmp_path / "run"
    _train(tiny_model_dir, nuclei_dir, out, "--prompt_types", "box,point", "--num_correction_rounds", "2")
    assert len(calls) == 2 * 2  # 2 steps x 2 rounds
    for (first, labels, side), (second, labels2, _) in zip(calls[::2], calls[1::2]):
        assert side == 256 and first.shape == second.shape == labels.shape and torch.equal(labels, labels2)
        assert not torch.equal(first, second)  # round 2 clicks on round 1's prediction
    card = (out / "README.md").read_text()
    assert "2 correction round(s)" in card and "box, point" in card
    assert json.loads((out / "all_results.json").read_text())["train_loss"] > 0


@pytest.mark.slow
def test_interactive_training_with_the_encoder_unfrozen(tiny_model_dir, nuclei_dir, tmp_path):
    """Without the cache the features come from the first call (a learning encoder runs once per step)."""
    _train(
        tiny_model_dir, nuclei_dir, tmp_path / "run", "--freeze_vision_encoder", "false",
        "--prompt_types", "box+point", "--num_correction_rounds", "1", "--multimask_every", "0",
    )  # fmt: skip


def test_interactive_evaluation_encodes_each_image_once_per_encoder(tiny_model_dir, nuclei_dir):
    from sam_hf.config.arguments import DataArguments
    from sam_hf.evaluation.interactive import evaluate_interactive
    from sam_hf.evaluation.run import load_split
    from sam_hf.inference.predictor import SamPredictor

    predictors = {name: SamPredictor.from_pretrained(str(tiny_model_dir)) for name in ("a", "b")}
    calls = []
    for predictor in predictors.values():
        predictor.model.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    data = load_split(DataArguments(dataset_name=str(nuclei_dir), max_eval_samples=2), "eval", 42, None, None)
    result = evaluate_interactive(predictors, data, num_clicks=1, max_objects_per_image=2)
    assert len(calls) == 2  # two images, one shared encoder
    assert result["models"]["a"] == result["models"]["b"]


@pytest.mark.slow
def test_evaluate_interactive_curve(tiny_model_dir, nuclei_dir, tmp_path):
    from sam_hf.config.arguments import DataArguments
    from sam_hf.evaluation.arguments import EvaluateArguments
    from sam_hf.evaluation.report import to_markdown
    from sam_hf.evaluation.run import run_evaluation

    summary = run_evaluation(
        EvaluateArguments(
            model=[f"base={tiny_model_dir}"],
            output_dir=str(tmp_path),
            num_figure_images=0,
            interactive_clicks=2,
            interactive_max_objects=3,
        ),
        DataArguments(dataset_name=str(nuclei_dir), max_eval_samples=2),
    )
    inter = summary["interactive"]
    assert inter["num_clicks"] == 2 and inter["num_objects"] == 6
    for start in ("box", "point"):
        values = inter["models"]["base"][start]
        assert len(values) == 3 and all(0 <= v <= 1 for v in values)
    assert "Interactive correction (6 objects" in to_markdown(summary)
    assert (tmp_path / "interactive_curve.png").stat().st_size > 1000
