"""`--torch_compile` trains through `SamTrainer` to the same weights as eager mode."""

from __future__ import annotations

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file

from sam_hf.config.parser import parse_args
from sam_hf.training.run import run_training


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tiny_model_dir, nuclei_dir, tmp_path):
    def train(name, *extra):
        out = tmp_path / name
        argv = train_argv(
            tiny_model_dir, nuclei_dir, out, embedding_cache_dir=tmp_path / "cache", use_cpu=True, max_steps=3,
            learning_rate=1e-3, max_train_samples=6, eval_before_training=False, logging_steps=1, seed=5,
            dataloader_num_workers=0,
        )  # fmt: skip
        run_training(*parse_args(argv + list(extra)))
        return load_file(out / "model.safetensors")

    eager = train("eager")
    # aot_eager traces and partitions the graphs as inductor does, without generating C++ (CI has two cores).
    compiled = train("compiled", "--torch_compile", "--torch_compile_backend", "aot_eager")
    assert eager.keys() == compiled.keys()
    base = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(base[n], compiled[n]) for n in base), "the compiled run did not train"
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)
