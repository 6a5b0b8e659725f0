#!/usr/bin/env python
"""Side-by-side speed of the naive fine-tuning loop and sam_hf's cached training, on the same data and config.

    python scripts/benchmark.py --config tiny --num_images 16 --epochs 3
    python scripts/benchmark.py --config vit-b --num_images 8 --epochs 3

(a) naive: the public notebook recipe, a full `SamModel(pixel_values=..., input_boxes=...)` forward at every step
    with frozen encoders, Adam and DiceCE; (b) sam_hf epoch 1, including building the embedding cache; (c) sam_hf
    epochs 2 and later; (d) inference with K boxes on one image in one call against K separate calls.
All timings come from this one run; the last line is a JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def naive_epoch(model, processor, ds, max_objects: int) -> float:
    """One epoch of the public recipe: the frozen encoder runs again on every image at every step."""
    loader = torch.utils.data.DataLoader(
        ds.with_transform(SamTransform(processor, train=True, box_jitter=20, max_objects_per_image=max_objects)),
        batch_size=1,
        shuffle=True,
        collate_fn=SamDataCollator(),
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = SamDiceCELoss()
    model.train()
    start = time.perf_counter()
    for batch in loader:
        out = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
        loss, _ = loss_fn(out.pred_masks[:, :, 0], batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def sam_hf_epochs(model, processor, ds, max_objects: int, epochs: int, work: str) -> tuple[float, list[float]]:
    start = time.perf_counter()
    cached = add_image_embeddings(ds, model, processor.image_processor, cache_dir=f"{work}/cache")
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
        remove_unused_columns=False,
        label_names=["labels"],
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
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 to measure steady-state epochs")

    ds = index_objects(load_source(args.dataset_name)["train"].select(range(args.num_images)))
    model, processor = build(args.config, args.seed)
    naive_s = naive_epoch(model, processor, ds, args.max_objects_per_image)
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
        "epoch1_s": round(epoch1_s, 3),
        "steady_s_per_epoch": round(steady_s, 3),
        "speedup_steady": round(naive_s / steady_s, 2),
        "speedup_epoch1": round(naive_s / epoch1_s, 3),
        "box_marginal_cost_ratio": round(marginal, 4),
        "k_boxes": k,
        "k_separate_over_shared": round(inf["k_separate_s"] / inf["k_boxes_s"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": "cpu",
        "config": args.config,
        "num_images": len(ds),
    }
    print(f"\n{'measure':<40}{'value':>14}")
    print(f"{'(a) naive epoch, s':<40}{naive_s:>14.2f}")
    print(f"{'(b) sam_hf epoch 1 incl. cache build, s':<40}{epoch1_s:>14.2f}")
    print(f"{'    of which cache build, s':<40}{cache_s:>14.2f}")
    print(f"{'(c) sam_hf steady epoch, s':<40}{steady_s:>14.2f}")
    print(f"{'(d) 1 box, s':<40}{inf['one_box_s']:>14.3f}")
    print(f"{f'(d) {k} boxes, one encoding, s':<40}{inf['k_boxes_s']:>14.3f}")
    print(f"{f'(d) {k} separate calls, s':<40}{inf['k_separate_s']:>14.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
