#!/usr/bin/env python
"""Side-by-side speed of the naive fine-tuning loop and sam_hf's cached training, on the same data and config.

    python scripts/benchmark.py --config tiny --num_images 16 --epochs 3
    python scripts/benchmark.py --config vit-b --num_images 4 --max_objects_per_image 8 --epochs 3
    python scripts/benchmark.py --config vit-b --mode memory --num_images 64 --max_objects_per_image 8

(a) naive: the public notebook recipe, a full `SamModel(pixel_values=..., input_boxes=...)` forward at every step
    with frozen encoders, Adam and DiceCE. The notebook's dataset holds one (image, mask, box) example per object,
    so every object is one step with its own encoder pass. (a') a stronger naive loop that batches all sampled boxes
    of an image into one full forward per step (one encoder pass per image per step).
(b) sam_hf epoch 1, including building the embedding cache; (c) sam_hf epochs 2 and later; (d) inference with K
boxes on one image in one call against K separate calls. Every loop trains the same sampled objects per epoch.
All timings come from this one run; the last line is a JSON object with the ratios.

`--mode memory` builds the embedding cache in a child process, then trains one epoch from it in this process and
reports this process's peak RSS: the memory of training from memory-mapped embeddings, without the encoder's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor, TrainerCallback, TrainingArguments

from sam_hf import (
    SamDataCollator,
    SamDiceCELoss,
    SamTrainer,
    SamTransform,
    freeze_modules,
    tiny_sam_config,
    tiny_sam_processor,
)
from sam_hf.cache import add_image_embeddings
from sam_hf.data import index_objects, load_source
from sam_hf.modeling import freeze_unused_decoder_outputs


class EpochTimer(TrainerCallback):
    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self.start)


def build(config_name: str, seed: int) -> tuple[SamModel, SamProcessor]:
    torch.manual_seed(seed)
    if config_name == "tiny":
        config = tiny_sam_config()
        processor = tiny_sam_processor(config)
    else:
        config = SamConfig()
        processor = SamProcessor(image_processor=SamImageProcessorPil())
    model = SamModel(config)
    freeze_modules(model)
    freeze_unused_decoder_outputs(model)
    return model, processor


def naive_epoch(model, processor, ds, max_objects: int, per_object: bool) -> tuple[float, int]:
    """One epoch of the public recipe: the frozen encoder runs again at every step.

    `per_object=True` is the notebook's layout on multi-object data, one (image, mask, box) example per object, so
    every object costs an encoder pass; `per_object=False` puts all sampled boxes of an image in one full forward.
    Returns the seconds and the number of optimizer steps.
    """
    loader = torch.utils.data.DataLoader(
        ds.with_transform(SamTransform(processor, train=True, box_jitter=20, max_objects_per_image=max_objects)),
        batch_size=1,
        shuffle=True,
        collate_fn=SamDataCollator(),
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = SamDiceCELoss()
    model.train()
    steps = 0
    start = time.perf_counter()
    for batch in loader:
        k = batch["input_boxes"].shape[1]
        for sl in [slice(i, i + 1) for i in range(k)] if per_object else [slice(0, k)]:
            out = model(
                pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"][:, sl], multimask_output=False
            )
            loss, _ = loss_fn(out.pred_masks[:, :, 0], batch["labels"][:, sl])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return time.perf_counter() - start, steps


def sam_hf_epochs(model, processor, ds, max_objects: int, epochs: int, work: str) -> tuple[float, list[float]]:
    start = time.perf_counter()
    cached = add_image_embeddings(ds, model, processor.image_processor, cache_dir=f"{work}/cache")
    if epochs == 0:
        return time.perf_counter() - start, []
    cache_s = time.perf_counter() - start
    train = cached.remove_columns("image").with_transform(
        SamTransform(processor, train=True, box_jitter=20, max_objects_per_image=max_objects)
    )
    timer = EpochTimer()
    args = TrainingArguments(
        output_dir=f"{work}/out",
        per_device_train_batch_size=1,
        num_train_epochs=epochs,
        learning_rate=1e-5,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = SamTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=SamDataCollator(),
        processing_class=processor.image_processor,
        callbacks=[timer],
    )
    trainer.train()
    return cache_s, timer.durations


def inference(model, processor, image, boxes: list[list[float]], repeats: int = 3) -> dict[str, float]:
    """Seconds for 1 box, for K boxes sharing one encoding, and for K separate full calls (best of `repeats`)."""
    model.eval()

    def run(box_list):
        enc = processor(images=image, input_boxes=[box_list], return_tensors="pt")
        with torch.no_grad():
            emb = model.get_image_embeddings(enc["pixel_values"])
            model(image_embeddings=emb, input_boxes=enc["input_boxes"], multimask_output=False)

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    one = best(lambda: run(boxes[:1]))
    many = best(lambda: run(boxes))
    separate = best(lambda: [run([b]) for b in boxes])
    return {"one_box_s": one, "k_boxes_s": many, "k_separate_s": separate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "vit-b"], default="tiny")
    parser.add_argument("--dataset_name", default="data/nuclei_demo")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max_objects_per_image", type=int, default=16)
    parser.add_argument("--boxes", type=int, default=16, help="K, boxes per image for the inference comparison")
    parser.add_argument("--repeats", type=int, default=3, help="best-of-N timing for the inference comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["speed", "memory", "build_cache", "decoder"], default="speed")
    parser.add_argument("--work_dir", default=None, help="memory mode: where the embedding cache goes")
    args = parser.parse_args()
    if args.mode == "speed" and args.epochs < 2:
        parser.error("--epochs must be >= 2 to measure steady-state epochs")

    if args.mode == "decoder":
        return decoder(args)
    ds = index_objects(load_source(args.dataset_name)["train"].select(range(args.num_images)))
    if args.mode != "speed":
        return memory(args, ds)
    model, processor = build(args.config, args.seed)
    naive_s, naive_steps = naive_epoch(model, processor, ds, args.max_objects_per_image, per_object=True)
    rss_naive = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, processor = build(args.config, args.seed)
    naive_batched_s, _ = naive_epoch(model, processor, ds, args.max_objects_per_image, per_object=False)
    model, processor = build(args.config, args.seed)
    with tempfile.TemporaryDirectory() as work:
        cache_s, epochs = sam_hf_epochs(model, processor, ds, args.max_objects_per_image, args.epochs, work)
    epoch1_s = cache_s + epochs[0]
    steady_s = sum(epochs[1:]) / len(epochs[1:])

    row = max(range(len(ds)), key=lambda i: ds[i]["num_objects"])
    image = ds[row]["image"].convert("RGB")
    boxes = ds[row]["boxes"][: args.boxes]
    k = len(boxes)
    inf = inference(model, processor, image, boxes, repeats=args.repeats)
    marginal = (inf["k_boxes_s"] - inf["one_box_s"]) / max(k - 1, 1) / inf["one_box_s"]

    result = {
        "naive_s_per_epoch": round(naive_s, 3),
        "naive_steps_per_epoch": naive_steps,
        "naive_batched_s_per_epoch": round(naive_batched_s, 3),
        "epoch1_s": round(epoch1_s, 3),
        "steady_s_per_epoch": round(steady_s, 3),
        "speedup_steady": round(naive_s / steady_s, 2),
        "speedup_epoch1": round(naive_s / epoch1_s, 3),
        "speedup_steady_vs_batched_naive": round(naive_batched_s / steady_s, 2),
        "speedup_epoch1_vs_batched_naive": round(naive_batched_s / epoch1_s, 3),
        "box_marginal_cost_ratio": round(marginal, 4),
        "k_boxes": k,
        "k_separate_over_shared": round(inf["k_separate_s"] / inf["k_boxes_s"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_after_naive": round(rss_naive, 1),
        "device": "cpu",
        "config": args.config,
        "num_images": len(ds),
    }
    print(f"\n{'measure':<40}{'value':>14}")
    print(f"{'(a) naive epoch (one object per step), s':<40}{naive_s:>14.2f}")
    print(f"{'(a2) naive epoch (one image per step), s':<40}{naive_batched_s:>14.2f}")
    print(f"{'(b) sam_hf epoch 1 incl. cache build, s':<40}{epoch1_s:>14.2f}")
    print(f"{'    of which cache build, s':<40}{cache_s:>14.2f}")
    print(f"{'(c) sam_hf steady epoch, s':<40}{steady_s:>14.2f}")
    print(f"{'(d) 1 box, s':<40}{inf['one_box_s']:>14.3f}")
    print(f"{f'(d) {k} boxes, one encoding, s':<40}{inf['k_boxes_s']:>14.3f}")
    print(f"{f'(d) {k} separate calls, s':<40}{inf['k_separate_s']:>14.3f}")
    print(json.dumps(result))


def _decoder_step(model, emb, boxes, labels, autocast: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(image_embeddings=emb, input_boxes=boxes, multimask_output=False)
    loss, _ = SamDiceCELoss()(out.pred_masks[:, :, 0].float(), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def decoder(args) -> None:
    """Seconds of one training step from a cached embedding (decoder forward + backward) for 1, 4 and 16 boxes, in
    fp32 and under CPU bf16 autocast: the whole cost of a steady-state step."""
    model, processor = build(args.config, args.seed)
    model.train()
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    channels = model.config.vision_config.output_channels
    mask = 4 * side
    gen = torch.Generator().manual_seed(args.seed)
    emb = torch.randn(1, channels, side, side, generator=gen)
    result = {"config": args.config, "device": "cpu"}
    for k in (1, 4, 16):
        boxes = torch.rand(1, k, 4, generator=gen) * model.config.vision_config.image_size / 2
        boxes[..., 2:] += boxes[..., :2]
        labels = (torch.rand(1, k, mask, mask, generator=gen) > 0.5).float()
        for name, autocast in (("fp32", False), ("bf16", True)):
            times = [_decoder_step(model, emb, boxes, labels, autocast) for _ in range(args.repeats + 1)][1:]
            result[f"{name}_{k}_boxes_s"] = round(min(times), 3)
            print(f"{f'decoder fwd+bwd, {k} boxes, {name}, s':<40}{min(times):>14.3f}")
    print(json.dumps(result))


def memory(args, ds) -> None:
    """Peak RSS of training from cached embeddings, the cache built beforehand in a child process."""
    work = args.work_dir or tempfile.mkdtemp(prefix="sam_hf_bench_")
    if args.mode == "build_cache":
        model, processor = build(args.config, args.seed)
        add_image_embeddings(ds, model, processor.image_processor, cache_dir=f"{work}/cache")
        return
    child = [sys.executable, __file__, "--mode", "build_cache", "--work_dir", work]
    child += ["--config", args.config, "--dataset_name", args.dataset_name, "--num_images", str(args.num_images)]
    child += ["--seed", str(args.seed)]
    start = time.perf_counter()
    subprocess.run(child, check=True, env=os.environ.copy())
    build_s = time.perf_counter() - start
    model, processor = build(args.config, args.seed)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cache_s, _ = sam_hf_epochs(model, processor, ds, args.max_objects_per_image, 0, work)
    _, epochs = sam_hf_epochs(model, processor, ds, args.max_objects_per_image, 1, work)
    result = {
        "num_images": len(ds),
        "cache_build_s_child_process": round(build_s, 1),
        "cache_reuse_s": round(cache_s, 2),
        "epoch_s": round(epochs[0], 2),
        "peak_rss_mb_after_model_load": round(rss_model, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": "cpu",
        "config": args.config,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
