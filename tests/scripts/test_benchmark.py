"""scripts/benchmark.py runs every mode end to end at toy scale and reports what it measured.

The numbers themselves are timings and are not asserted; what is checked is that each mode finishes, that its last
line is one JSON object with the measures the docs name, and that the counts it reports match the data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tempfile

import datasets
import numpy as np
import pytest
import torch
from conftest import NUCLEI, REPO

from sam_hf import tiny_sam_config
from sam_hf.data.sources import load_source


@pytest.fixture
def benchmark(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("sam_hf_benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the script's work directories
    bars = datasets.is_progress_bar_enabled()

    def run(*argv: str) -> None:
        monkeypatch.setattr(sys, "argv", ["benchmark.py", *argv])
        module.main()

    yield run
    if bars:
        datasets.enable_progress_bars()


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _timings(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items() if k.endswith(("_s", "_ms_per_row", "_ms_per_step", "_s_per_epoch"))}


def _objects_per_image(n_images: int) -> list[int]:
    """Objects in each of the first images, counted from the instance maps themselves."""
    rows = load_source(str(NUCLEI))["train"].select(range(n_images))
    return [int(np.count_nonzero(np.unique(np.asarray(label)))) for label in rows["label"]]


def test_speed_mode_reports_every_goal_and_counts_the_epochs_objects(benchmark, capsys):
    benchmark("--config", "tiny", "--device", "cpu", "--num_images", "2", "--epochs", "2", "--uncached",
              "--max_objects_per_image", "4", "--boxes", "3", "--repeats", "1")  # fmt: skip
    result = _last_json(capsys)
    counts = _objects_per_image(2)
    assert result["objects_per_epoch"] == sum(min(n, 4) for n in counts)
    assert result["naive_steps_per_epoch"] == result["objects_per_epoch"]  # the notebook: one object per step
    assert result["k_boxes"] == min(3, max(counts))
    assert (result["device"], result["precision"], result["num_workers"]) == ("cpu", "fp32", 0)
    for key in ("steady_over_floor", "cache_over_encoder_throughput", "epoch1_over_batched_naive",
                "speedup_steady_vs_batched_naive", "uncached_over_batched_naive"):  # fmt: skip
        assert result[key] > 0, key
    timings = _timings(result)
    assert {"cache_build_s", "epoch1_s", "steady_s_per_epoch", "uncached_s_per_epoch"} <= set(timings)
    assert all(math.isfinite(v) and v > 0 for v in timings.values()), timings
    # No GPU: every busy figure is null rather than made up.
    assert all(v is None for k, v in result.items() if k.endswith("gpu_busy"))


def test_transform_passes_and_decoder_modes(benchmark, capsys):
    config = tiny_sam_config()
    grid = config.vision_config.image_size // config.vision_config.patch_size

    threads = torch.get_num_threads()
    benchmark("--config", "tiny", "--device", "cpu", "--mode", "transform", "--num_images", "2")
    result = _last_json(capsys)
    assert torch.get_num_threads() == threads  # the uncached rows are timed on one thread, then it is given back
    assert result["rows"] == 2
    assert result["embedding_shape"] == [config.vision_config.output_channels, grid, grid]
    for key in ("array_bytes", "array3d_python", "uncached_torchvision", "uncached_pil", "labels_in_boxes"):
        assert result[f"{key}_ms_per_row"] > 0, key

    benchmark("--config", "tiny", "--device", "cpu", "--mode", "passes", "--batch_size", "5", "--repeats", "1")
    result = _last_json(capsys)
    assert (result["batch_size"], result["steps"]) == (5, 8)
    assert all(result[f"{name}_ms_per_step"] > 0 for name in ("box", "box+points", "box+points+background"))

    benchmark("--config", "tiny", "--device", "cpu", "--mode", "decoder", "--repeats", "1")
    result = _last_json(capsys)
    assert all(result[f"{p}_{k}_boxes_s"] > 0 for p in ("fp32", "bf16") for k in (1, 4, 16))


def test_stream_mode_reads_a_one_file_stream_with_every_worker(benchmark, capsys):
    benchmark("--config", "tiny", "--device", "cpu", "--mode", "stream", "--num_images", "24", "--batch_size", "4",
              "--num_workers", "2", "--repeats", "1")  # fmt: skip
    result = _last_json(capsys)
    # 24 images in row groups of 10: one file, three row groups.
    assert (result["one_shard_shards"], result["resharded_shards"]) == (1, 3)
    assert result["one_shard_rows_read"] == result["resharded_rows_read"] == 24
    assert result["one_shard_rows_per_s"] > 0 and result["resharded_rows_per_s"] > 0


def test_memory_mode_reuses_the_cache_a_child_process_built(benchmark, capsys, tmp_path):
    benchmark("--config", "tiny", "--device", "cpu", "--mode", "memory", "--num_images", "2",
              "--work_dir", str(tmp_path / "work"))  # fmt: skip
    result = _last_json(capsys)
    assert result["num_images"] == 2
    assert result["peak_rss_mb"] >= result["peak_rss_mb_after_model_load"] > 0
    # The parent found the child's cache by its fingerprint instead of building a second one.
    assert len(list((tmp_path / "work" / "cache").rglob("*.arrow"))) == 1


def test_asking_for_cuda_without_it_is_refused(benchmark, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        benchmark("--device", "cuda")
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


@pytest.mark.gpu
def test_speed_and_passes_modes_on_cuda(benchmark, capsys):
    benchmark("--config", "tiny", "--device", "cuda", "--num_images", "2", "--epochs", "2", "--uncached",
              "--max_objects_per_image", "4", "--boxes", "3", "--repeats", "1", "--num_workers", "2")  # fmt: skip
    result = _last_json(capsys)
    assert (result["device"], result["precision"], result["batch_size"]) == ("cuda", "bf16", 4)
    assert all(math.isfinite(v) and v > 0 for v in _timings(result).values())
    benchmark("--config", "tiny", "--device", "cuda", "--mode", "passes", "--batch_size", "5", "--repeats", "1")
    assert _last_json(capsys)["box+points+background_ms_per_step"] > 0
