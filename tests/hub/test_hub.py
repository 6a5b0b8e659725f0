"""The Hub path offline: push through huggingface_hub's real client to a local endpoint, then load from the cache
that a download populated, with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO
from fake_hub import FakeHub
from huggingface_hub import ModelCard

TOKEN = "hf_samhfTestSecret0123456789abcdef"
HUB_ID = "someone/tiny-sam-nuclei"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


@pytest.fixture(scope="module")
def pushed(tiny_model_dir, nuclei_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    out, hf_home = tmp / "run", tmp / "hf_home"
    with FakeHub() as hub:
        cmd = [
            sys.executable, str(REPO / "scripts" / "train.py"),
            "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(nuclei_dir),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_train_samples", "4", "--max_eval_samples", "2", "--max_objects_per_image", "4",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
            "--push_to_hub", "--hub_model_id", HUB_ID, "--hub_token", TOKEN,
        ]  # fmt: skip
        env = _env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home))
        train = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert train.returncode == 0, train.stderr[-4000:]
        # A user with Hub access loads the model once; that populates their cache.
        load = (
            "from transformers import SamModel, SamProcessor; "
            "SamModel.from_pretrained(%r); SamProcessor.from_pretrained(%r)"
        )
        download = subprocess.run(
            [sys.executable, "-c", load % (HUB_ID, HUB_ID)], env=env, capture_output=True, text=True, timeout=300
        )
        assert download.returncode == 0, download.stderr[-4000:]
    return {"out": out, "hub": hub, "train": train, "hf_home": hf_home}


@pytest.mark.slow
def test_upload_is_exactly_the_output_folder(pushed):
    out, hub = pushed["out"], pushed["hub"]
    final = hub.commits[-1]
    assert final["repo"] == HUB_ID and final["summary"] == "End of training"
    local = {
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith("_") and not str(p.relative_to(out)).startswith("checkpoint-")
    }
    assert set(final["files"]) == local
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert final["files"][name] == (out / name).read_bytes(), name
    commits = [r for r in hub.requests if "/commit/" in r["path"]]
    assert commits and all(r["auth"] == f"Bearer {TOKEN}" for r in commits)


@pytest.mark.slow
def test_token_is_never_written_or_logged(pushed):
    out, hub, train = pushed["out"], pushed["hub"], pushed["train"]
    for name, content in hub.files.items():
        assert TOKEN.encode() not in content, f"token uploaded in {name}"
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    assert TOKEN not in train.stdout and TOKEN not in train.stderr


@pytest.mark.slow
def test_pushed_card_metadata_parses(pushed):
    card = ModelCard(pushed["hub"].files["README.md"].decode())
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "mask-generation"
    assert data.base_model and "sam" in data.tags
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert set(results) == {"dice", "iou"} and all(0 <= v <= 1 for v in results.values())
    assert "model-index" in data.to_dict()
    assert f"{results['dice']:.4f}" in card.text


@pytest.mark.slow
def test_from_pretrained_offline_from_populated_cache(pushed):
    out = pushed["out"]
    code = f"""
import torch
from safetensors.torch import load_file
from transformers import SamModel, SamProcessor, pipeline
from PIL import Image
import numpy as np
model = SamModel.from_pretrained({HUB_ID!r})
SamProcessor.from_pretrained({HUB_ID!r})
ref = load_file({str(out / "model.safetensors")!r})
state = model.state_dict()
assert all(torch.equal(state[k], v) for k, v in ref.items()), "weights differ from the pushed ones"
gen = pipeline("mask-generation", model={HUB_ID!r})
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3)).astype(np.uint8))
gen(image, points_per_crop=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
print("OK")
"""
    env = _env(HF_HOME=str(pushed["hf_home"]), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_card_metadata_for_a_hub_dataset_and_embedded_figures(tmp_path):
    from types import SimpleNamespace

    from huggingface_hub import ModelCard
    from transformers import TrainingArguments

    from sam_hf.hub.card import render_model_card

    (tmp_path / "loss_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only existence matters to the card
    args = TrainingArguments(output_dir=str(tmp_path), hub_model_id="someone/sam-nuclei", report_to="none")
    card = render_model_card(
        SimpleNamespace(args=args),
        base_model="facebook/sam-vit-base",
        dataset_name="someone/nuclei",
        metrics_before={"dice": 0.5, "iou": 0.4},
        metrics_after={"dice": 0.75, "iou": 0.6, "num_objects": 12},
    )
    card.save(tmp_path / "README.md")
    parsed = ModelCard.load(tmp_path / "README.md")
    assert parsed.data.datasets == ["someone/nuclei"] and parsed.data.base_model == "facebook/sam-vit-base"
    result = {r.metric_type: (r.metric_value, r.dataset_type) for r in parsed.data.eval_results}
    assert result == {"dice": (0.75, "someone/nuclei"), "iou": (0.6, "someone/nuclei")}
    assert "](loss_curves.png)" in parsed.text and "eval_predictions.png" not in parsed.text
    assert "| 0.5000 | 0.4000 |" in parsed.text and "| 0.7500 | 0.6000 |" in parsed.text
