"""What `run_training` refuses up front, and what must never fail a finished run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import yaml
from fake_hub import FakeHub
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file
from transformers import SamModel, Trainer, TrainingArguments

from sam_hf.config.parser import parse_args
from sam_hf.data.sources import load_source
from sam_hf.family.modeling import load_model_and_processor
from sam_hf.hub.access import check_hub_access
from sam_hf.hub.card import render_model_card
from sam_hf.training.output_dir import check_output_dir
from sam_hf.training.report import evaluate_command, training_summary
from sam_hf.training.run import run_training

TOKEN = "hf_samhfTestSecret0123456789abcdef"


def _argv(model_dir, data_dir, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_train_samples", "4",
        "--max_eval_samples", "2", "--max_objects_per_image", "4", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if run_training gets as far as loading the model (the first expensive step)."""

    def load(*args, **kwargs):
        raise AssertionError("run_training loaded the model before refusing the run")

    monkeypatch.setattr("sam_hf.training.run.load_model_and_processor", load)


def _previous_run(out: Path) -> None:
    (out / "checkpoint-600").mkdir(parents=True)
    (out / "checkpoint-600" / "trainer_state.json").write_text("{}")
    (out / "trainer_state.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "all_results.json").write_text(json.dumps({"eval_dice": 0.99, "stale_key": 1}))
    (out / "eval_results.json").write_text(json.dumps({"eval_dice": 0.99}))
    (out / "eval_predictions.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (out / "notes.txt").write_text("mine")


def test_refuses_an_output_dir_holding_a_previous_run(tiny_model_dir, nuclei_dir, tmp_path, no_loading):
    out = tmp_path / "run"
    _previous_run(out)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ValueError) as err:
        run_training(*parse_args(_argv(tiny_model_dir, nuclei_dir, out)))
    message = str(err.value)
    assert str(out) in message and "checkpoint-600" in message and "model.safetensors" in message
    assert f"--resume_from_checkpoint {out / 'checkpoint-600'}" in message and "--overwrite_output_dir" in message
    assert (
        sorted(p.name for p in out.rglob("*")) == before and (out / "model.safetensors").read_bytes() == b"old weights"
    )


def test_output_dir_check_lets_empty_missing_and_resumed_dirs_through(tmp_path):
    def args(out, **kw):
        return TrainingArguments(output_dir=str(out), report_to="none", **kw)

    check_output_dir(args(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    check_output_dir(args(tmp_path / "empty"))
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".gitignore").write_text("*")
    check_output_dir(args(tmp_path / "hidden"))
    _previous_run(tmp_path / "used")
    check_output_dir(args(tmp_path / "used", resume_from_checkpoint=str(tmp_path / "used" / "checkpoint-600")))
    assert (tmp_path / "used" / "checkpoint-600").is_dir()
    with pytest.raises(ValueError, match="pass only one of them"):
        check_output_dir(args(tmp_path / "used", resume_from_checkpoint="x"), overwrite_output_dir=True)
    # Only the process that saves deletes; the others go on without refusing.
    check_output_dir(args(tmp_path / "used"), overwrite_output_dir=True, remove_previous_run=False)
    assert (tmp_path / "used" / "checkpoint-600").is_dir()


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_previous_run(tiny_model_dir, nuclei_dir, tmp_path, caplog):
    out = tmp_path / "run"
    _previous_run(out)
    extra = ("--overwrite_output_dir", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1")
    with caplog.at_level("INFO"):
        metrics = run_training(*parse_args(_argv(tiny_model_dir, nuclei_dir, out, *extra)))
    # The run ends on its summary, after every other log line (and so after the figures' evaluation).
    last = caplog.records[-1]
    assert last.name == "sam_hf.training.report.summary" and last.levelname == "INFO"
    text = last.getMessage()
    assert f"Dice {metrics['base_eval_dice']:.3f} -> {metrics['eval_dice']:.3f}" in text
    assert f"IoU  {metrics['base_eval_iou']:.3f} -> {metrics['eval_iou']:.3f}" in text
    assert f'"fill the box" baseline Dice {metrics["base_eval_box_baseline_dice"]:.3f}' in text
    assert f"Model and model card: {out}/ (README.md)" in text
    assert f"scripts/evaluate.py --model base={tiny_model_dir} tuned={out}" in text
    # Rotation kept the new checkpoint, not the old run's later one; metrics and figures are the new run's only.
    assert not (out / "checkpoint-600").exists() and (out / "checkpoint-2").is_dir()
    assert "stale_key" not in json.loads((out / "all_results.json").read_text())
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "model.safetensors").read_bytes() != b"old weights"
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "eval_predictions.png").exists() or "eval_dice" in (out / "eval_results.json").read_text()


@pytest.mark.slow
def test_short_run_without_logged_loss_finishes_with_its_card(
    tiny_model_dir, nuclei_dir, tmp_path, monkeypatch, caplog
):
    """--max_steps 2 logs no loss: no loss figure, and a failing figure is a warning, not a failed run."""

    def broken(*args, **kwargs):
        raise RuntimeError("figure backend exploded")

    monkeypatch.setattr("sam_hf.viz.plots.plot_base_vs_tuned", broken)
    out = tmp_path / "short"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run_training(*parse_args(_argv(tiny_model_dir, nuclei_dir, out)))
    assert "train_loss" in metrics and (out / "model.safetensors").is_file()
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "mask-generation" and "loss_curves.png" not in card.text
    assert not (out / "loss_curves.png").exists()
    assert "Figures not written (RuntimeError: figure backend exploded)" in caplog.text
    # No accelerator: pinned memory is turned off instead of torch warning about it at every dataloader.
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_card_is_written_when_the_full_card_cannot_be_rendered(tmp_path, monkeypatch, caplog):
    def missing():
        raise FileNotFoundError("template gone")

    monkeypatch.setattr("sam_hf.hub.card.model_card_template", missing)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    card = render_model_card(SimpleNamespace(args=args), base_model="tiny-sam-base", dataset_name="nuclei_demo")
    assert card.data.pipeline_tag == "mask-generation" and card.data.library_name == "transformers"
    assert card.data.base_model == "tiny-sam-base" and "tiny-sam-base" in card.text
    assert "template gone" in caplog.text


def test_push_to_hub_offline_fails_before_any_work(tiny_model_dir, nuclei_dir, tmp_path, monkeypatch, no_loading):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = _argv(tiny_model_dir, nuclei_dir, tmp_path / "o", "--push_to_hub", "--hub_model_id", "someone/x")
    with pytest.raises(OSError, match=r"offline mode \(HF_HUB_OFFLINE=1\).*drop --push_to_hub"):
        run_training(*parse_args(argv))


def test_hub_check_says_what_failed(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(OSError, match="needs a Hub token.*none was found.*hf auth login.*drop --push_to_hub"):
        check_hub_access("someone/x")

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(OSError, match=r"could not reach the Hub at http://127.0.0.1:9.*drop --push_to_hub"):
        check_hub_access("someone/x", TOKEN)

    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        with pytest.raises(OSError, match="rejected the token.*hf auth login"):
            check_hub_access("someone/x", "hf_wrong")
        assert check_hub_access("someone/x", TOKEN)["name"] == "someone"
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert check_hub_access("someone/x")["name"] == "someone"
    with FakeHub(role="read") as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        with pytest.raises(OSError, match="read-only"):
            check_hub_access("someone/x", TOKEN)


@pytest.mark.parametrize("name", ["{tmp}/missing", "./missing-sam-hf", "~/missing-sam-hf", "a/b/c", "data/typo"])
def test_missing_local_dataset_path_is_not_looked_up_on_the_hub(name, tmp_path, monkeypatch):
    def hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(name.format(tmp=tmp_path))


@pytest.mark.parametrize("name", ["nuclei", "someone/nuclei"])
def test_hub_dataset_ids_still_go_to_the_hub(name, tmp_path, monkeypatch):
    calls = []
    empty = datasets.Dataset.from_dict({"image": [], "label": []})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or datasets.DatasetDict(train=empty))
    monkeypatch.chdir(tmp_path)
    load_source(name)
    assert calls and calls[0][0] == name


def test_default_output_dir_is_named_after_model_and_dataset(tmp_path):
    base = ["--model_name_or_path", "facebook/sam-vit-base", "--dataset_name", "data/nuclei_demo"]
    assert parse_args(base)[3].output_dir == str(Path("runs") / "sam-vit-base-nuclei_demo")
    for given in (["--output_dir", "x"], ["--output-dir", "x"], ["--output_dir=x"], ["--output_d", "x"]):
        assert parse_args(base + given)[3].output_dir == "x", given
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "models/tiny-sam-base", "dataset_name": "d/cells"}))
    assert parse_args([str(config)])[3].output_dir == str(Path("runs") / "tiny-sam-base-cells")
    assert parse_args([str(config), "--max_steps", "3"])[3].output_dir == str(Path("runs") / "tiny-sam-base-cells")


def test_max_steps_zero_is_refused(tiny_model_dir, nuclei_dir, tmp_path, no_loading):
    argv = _argv(tiny_model_dir, nuclei_dir, tmp_path / "o")
    argv[argv.index("--max_steps") + 1] = "0"
    with pytest.raises(ValueError, match=r"--max_steps must be a positive number.*or -1.*got 0"):
        run_training(*parse_args(argv))


def test_reloading_a_checkpoint_reports_no_missing_tied_buffer(tiny_model_dir, tmp_path, monkeypatch):
    """The prompt encoder's positional embedding is tied to shared_image_embedding and never saved; reloading a
    checkpoint (load_best_model_at_end, resume) must re-tie it without a "missing keys" warning, values unchanged."""
    import transformers.trainer

    model, _ = load_model_and_processor(str(tiny_model_dir))
    model.eval()
    plain = SamModel.from_pretrained(tiny_model_dir).eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved, base = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)

    logged = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda msg, *a, **k: logged.append(msg))
    Trainer._issue_warnings_after_load(SimpleNamespace(model=model), model.load_state_dict(saved, strict=False))
    assert not logged
    pos = model.prompt_encoder.shared_embedding.positional_embedding
    assert pos.data_ptr() == model.shared_image_embedding.positional_embedding.data_ptr()

    torch.manual_seed(0)
    pixels, boxes = torch.randn(1, 3, 256, 256), torch.tensor([[[10.0, 20.0, 90.0, 120.0]]])
    with torch.no_grad():
        a, b = plain(pixel_values=pixels, input_boxes=boxes), model(pixel_values=pixels, input_boxes=boxes)
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.iou_scores, b.iou_scores)


def test_dataloader_workers_default_on_gpu_machines_only(monkeypatch, tmp_path):
    from sam_hf.config.parser import parse_args
    from sam_hf.core.env import default_dataloader_num_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_dataloader_num_workers(cuda=True) == 8 and default_dataloader_num_workers(cuda=False) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert default_dataloader_num_workers(cuda=True) == 3
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path)]
    # A GPU machine, as far as the default is concerned (TrainingArguments itself must still see no CUDA here).
    monkeypatch.setattr("sam_hf.config.parser.default_dataloader_num_workers", lambda: 8)
    assert parse_args(base)[3].dataloader_num_workers == 8
    assert parse_args(base)[3].dataloader_persistent_workers
    assert not parse_args(base + ["--dataloader_persistent_workers", "false"])[3].dataloader_persistent_workers
    assert not parse_args(base + ["--dataloader_num_workers", "0"])[3].dataloader_persistent_workers
    for explicit in (["--dataloader_num_workers", "0"], ["--dataloader-num-workers=0"], ["--dataloader_num", "0"]):
        assert parse_args(base + explicit)[3].dataloader_num_workers == 0, explicit
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\ndataset_name: d\ndataloader_num_workers: 2\n")
    assert parse_args([str(config)])[3].dataloader_num_workers == 2
    config.write_text("model_name_or_path: m\ndataset_name: d\n")
    assert parse_args([str(config)])[3].dataloader_num_workers == 8
    monkeypatch.setattr("sam_hf.config.parser.default_dataloader_num_workers", lambda: 0)
    assert parse_args(base)[3].dataloader_num_workers == 0


@pytest.mark.slow
def test_streaming_trains_without_cache_and_evaluates(tiny_model_dir, nuclei_dir, tmp_path, caplog):
    import json
    import logging

    from sam_hf.config.parser import parse_args
    from sam_hf.training.run import run_training

    out = tmp_path / "stream"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(nuclei_dir), "--output_dir", str(out)]
    argv += "--streaming --max_steps 3 --per_device_train_batch_size 2 --max_eval_samples 3".split()
    argv += "--max_objects_per_image 4 --eval_strategy no --save_strategy no --report_to none".split()
    argv += "--eval_before_training false --use_cpu --log_level info".split()
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        metrics = run_training(*parse_args(argv + ["--embedding_cache_dir", str(tmp_path / "cache")]))
    assert "training without the embedding cache" in caplog.text
    assert "the first 3 training rows are the evaluation split" in caplog.text
    assert not (tmp_path / "cache").exists(), "a stream is never cached"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert metrics["eval_samples"] == 3 and 0.0 <= metrics["eval_dice"] <= 1.0
    from transformers import SamModel

    SamModel.from_pretrained(out)
    with pytest.raises(ValueError, match="--streaming .* pass --max_steps"):
        run_training(*parse_args(argv[: argv.index("--max_steps")] + ["--output_dir", str(tmp_path / "x")]))


def test_a_one_file_stream_is_split_so_that_every_dataloader_worker_reads(nuclei_dir, tmp_path, caplog):
    """A Hub dataset in one Parquet file is one shard: datasets would stop every dataloader worker but one."""
    import logging

    import pyarrow.parquet as pq

    from sam_hf.config.arguments import DataArguments
    from sam_hf.data.streaming import reshard_for_workers, streaming_splits

    source = load_source(str(nuclei_dir))["train"]
    source.to_parquet(tmp_path / "train.parquet", batch_size=4)
    row_groups = pq.ParquetFile(tmp_path / "train.parquet").num_row_groups
    assert row_groups == -(-len(source) // 4)

    def stream():
        return datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")}, streaming=True)

    assert stream()["train"].num_shards == 1
    data_args = DataArguments(dataset_name="parquet", streaming=True, validation_split_percentage=0)
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        train, _ = streaming_splits(stream(), data_args, seed=0, num_workers=4)
    assert train.num_shards == row_groups
    assert f"has 1 shard(s) for 4 dataloader workers; split into {row_groups}" in caplog.text
    # Every row is still read once.
    assert sorted(row["file_name"] for row in train) == sorted(source["file_name"])
    # The evaluation rows carved from the stream are left out of training in every dataloader worker, and only they.
    # (IterableDataset.skip spreads over the workers: here one evaluation row was trained on and one row lost.)
    carve = DataArguments(dataset_name="parquet", streaming=True, max_eval_samples=3)
    train, eval_ds = streaming_splits(stream(), carve, seed=0, num_workers=2)
    assert train.num_shards == row_groups and len(eval_ds) == 3
    held_out = eval_ds["file_name"]
    assert held_out == source["file_name"][:3]  # the first rows of the file
    loader = torch.utils.data.DataLoader(train.select_columns(["file_name"]), batch_size=None, num_workers=2)
    assert sorted(row["file_name"] for row in loader) == sorted(source["file_name"][3:])
    # The evaluation images come back decoded, as the source's.
    np.testing.assert_array_equal(np.asarray(eval_ds[0]["image"]), np.asarray(source[0]["image"]))
    # Enough shards already, or no workers: the stream is left as it is.
    assert streaming_splits(stream(), data_args, seed=0)[0].num_shards == 1
    assert reshard_for_workers(train, 4) is train
    # A stream that cannot be split further: the workers that will idle are named.
    caplog.clear()
    two = datasets.Dataset.from_dict({"a": list(range(6))}).to_iterable_dataset(num_shards=2)
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        assert reshard_for_workers(two, 4).num_shards == 2
    assert "only 2 of the 4 dataloader workers read it" in caplog.text


def test_training_summary_by_hand():
    metrics = {
        "base_eval_dice": 0.4985, "base_eval_iou": 0.3782, "base_eval_box_baseline_dice": 0.8402,
        "base_eval_num_objects": 226, "eval_dice": 0.5521, "eval_iou": 0.4187, "eval_num_objects": 226,
    }  # fmt: skip
    text = training_summary(
        metrics,
        "runs/demo/",
        [Path("runs/demo/loss_curves.png"), Path("runs/demo/eval_predictions.png")],
        best_step=600,
        eval_images=8,
        next_command="python scripts/evaluate.py --model base=m tuned=runs/demo",
    )
    assert text.splitlines() == [
        "Training finished.",
        "Per-object scores on the 8 held-out images (226 objects), exact box prompts (best checkpoint, step 600):",
        "  Dice 0.498 -> 0.552 (+0.054)",
        "  IoU  0.378 -> 0.419 (+0.041)",
        '  "fill the box" baseline Dice 0.840',
        "Model and model card: runs/demo/ (README.md)",
        "Figures: runs/demo/loss_curves.png, runs/demo/eval_predictions.png",
        "Next, compare the base and tuned models on the same images:",
        "  python scripts/evaluate.py --model base=m tuned=runs/demo",
    ]
    # Without evaluation: only where the model is.
    # A tiled split counts tiles, not images.
    tiled = training_summary(metrics, "out", eval_images=39, eval_unit="tiles").splitlines()
    assert tiled[1].startswith("Per-object scores on the 39 held-out tiles (226 objects), exact box prompts")
    crops = training_summary(metrics, "out", eval_images=226, eval_unit="object crops").splitlines()
    assert crops[1].startswith(
        "Per-object scores on the 226 held-out objects, each on its own crop, exact box prompts"
    )
    assert training_summary({"train_loss": 0.5}, "out").splitlines() == [
        "Training finished.",
        "Model and model card: out/ (README.md)",
    ]


def test_evaluate_command_repeats_the_runs_data_flags():
    _, data_args, _, _ = parse_args(
        ["--model_name_or_path", "models/tiny-sam-base", "--dataset_name", "data/nuclei_demo", "--output_dir", "o",
         "--validation_split_percentage", "25", "--max_train_samples", "10", "--mask_type", "instance"]
    )  # fmt: skip
    command = evaluate_command("models/tiny-sam-base", "runs/demo", data_args, seed=42)
    assert command.split(" ", 1)[1] == (
        "scripts/evaluate.py --model base=models/tiny-sam-base tuned=runs/demo --dataset_name data/nuclei_demo "
        "--mask_type instance --validation_split_percentage 25 --output_dir runs/demo-eval"
    )
    assert evaluate_command("m", "runs/x/", data_args, seed=7).endswith("--seed 7 --output_dir runs/x-eval")
