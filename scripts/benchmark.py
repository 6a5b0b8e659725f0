#!/usr/bin/env python
"""Side-by-side speed of the naive fine-tuning loop and sam_hf's cached training, on the same data, config and device.

    python scripts/benchmark.py --config tiny --num_images 16 --epochs 3
    python scripts/benchmark.py --config vit-b --num_images 6 --max_objects_per_image 8 --epochs 3 --device cpu
    python scripts/benchmark.py --config vit-b --num_images 150 --device cuda --torch_compile --uncached \\
        --dataset_name ../shared/data/dsb2018_nuclei_train_subset
    python scripts/benchmark.py --config vit-b --mode memory --num_images 64 --max_objects_per_image 8
    python scripts/benchmark.py --config vit-b --mode transform --num_images 16
    python scripts/benchmark.py --config tiny --mode passes --repeats 4
    python scripts/benchmark.py --config vit-b --mode stream --num_images 150 --batch_size 4 --repeats 2

`--device` defaults to `cuda` when a GPU is present. On CUDA the runs use bf16 autocast (`--precision`), a batch of
4 images (`--batch_size`) and `min(8, CPUs - 1)` dataloader workers (`--num_workers`); on CPUs fp32, batch 1 and no
workers, as in the figures of `docs/benchmarks.md`.

(a) naive, the public notebook recipe: a full `SamModel(pixel_values=..., input_boxes=...)` forward at every step with
    frozen encoders, Adam and DiceCE; one (image, mask, box) example per object, so every object is one step with its
    own encoder pass (CPU only by default: `--per_object_naive`). (a2) a stronger naive loop: all sampled boxes of a
    batch of images in one full forward per step (one encoder pass per image per step), on the same device, batch,
    precision and workers as sam_hf.
(b) sam_hf epoch 1, including building the embedding cache; (c) sam_hf epochs 2 and later (`SamTrainer`).
(e) encoder alone: images per second of the vision encoder at the cache's batch size, inputs already on the device;
    the cache build's throughput is compared with it.
(f) the decoder-only floor: the same epoch's batches already on the device, decoder forward + DiceCE + backward +
    optimizer step only; a steady epoch cannot be faster.
(g) with `--torch_compile`, a steady epoch with `TrainingArguments(torch_compile=True)`; with `--uncached`, an
    epoch without the cache (`--cache_embeddings false`: the encoder runs at every step, the dataloader preprocesses).
(d) inference with K boxes on one image in one call against K separate calls.

GPU busy: the share of time the GPU executed a kernel during a measured phase, sampled through NVML (`nvidia-ml-py`,
`pip install nvidia-ml-py`) every 20 ms; `null` where NVML is not available.

Every loop trains the same sampled objects per epoch. All timings come from this one run; the last line is a JSON
object with the measures and ratios.

`--mode memory` builds the embedding cache in a child process, then trains one epoch from it in this process and
reports this process's peak RSS. `--mode transform` times the cached training transform per row, with embeddings
stored as sam_hf stores them (array bytes) and as an `Array3D` column read through `datasets`' Python formatting,
and the uncached transform (image decoding and preprocessing included) on one thread, as a dataloader worker runs it.
`--mode decoder` times one decoder step for 1, 4 and 16 boxes in fp32 and bf16. `--mode passes` times a training step
of one-object crops as the recipe adds decoder passes (box only, the point pass with point-only crops, background
points); `--batch_size` crops per step, 16 by default in this mode. `--mode stream` times the training transform
through `--num_workers` dataloader workers (2 by default in this mode) from the images stored as one Parquet file and
streamed, as one shard and split per row group; best of `--repeats`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# scripts/evaluate.py shares its name with the `evaluate` library; keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import resource
import subprocess
import tempfile
import threading
import time
from contextlib import nullcontext

import datasets
import numpy as np
import torch
from transformers import (
    SamConfig,
    SamImageProcessor,
    SamImageProcessorPil,
    SamModel,
    SamProcessor,
    TrainerCallback,
    TrainingArguments,
)

from sam_hf import (
    SamDataCollator,
    SamDiceCELoss,
    SamTrainer,
    SamTransform,
    freeze_modules,
    tiny_sam_config,
    tiny_sam_processor,
)
from sam_hf.core.env import default_dataloader_num_workers
from sam_hf.core.images import resized_shape
from sam_hf.core.masks import mask_to_instances
from sam_hf.data.cache import add_image_embeddings, default_embedding_batch_size
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source
from sam_hf.data.transforms import LABEL_PAD, object_labels, resize_and_pad_masks
from sam_hf.family.modeling import freeze_unused_decoder_outputs

VIT_H = {
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "global_attn_indexes": [7, 15, 23, 31],
}


class EpochTimer(TrainerCallback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.durations: list[float] = []
        self.busy: list[float | None] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self.monitor = GpuBusy(self.device).__enter__()
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.durations.append(time.perf_counter() - self.start)
        self.monitor.__exit__()
        self.busy.append(self.monitor.value)


class GpuBusy:
    """Mean NVML utilisation (% of time a kernel ran) of the GPU while the context is open; `value` is None without
    NVML or a GPU."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval, self.samples, self.value = device, interval, [], None
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                self.nvml = pynvml
            except Exception:  # NVML missing or unusable: no busy figure, the timings still count
                self.handle = None

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(self.interval)

    def __enter__(self) -> GpuBusy:
        if self.handle is not None:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.stop.set()
            self.thread.join()
            self.value = round(float(np.mean(self.samples)), 1) if self.samples else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def build(config_name: str, seed: int, device: torch.device) -> tuple[SamModel, SamProcessor]:
    torch.manual_seed(seed)
    if config_name == "tiny":
        config = tiny_sam_config()
        processor = tiny_sam_processor(config)
    else:
        config = SamConfig(vision_config=VIT_H) if config_name == "vit-h" else SamConfig()
        processor = SamProcessor(image_processor=SamImageProcessor())
    model = SamModel(config).to(device)
    freeze_modules(model)
    freeze_unused_decoder_outputs(model, train_iou_head=False)  # every loop trains the same parameters
    return model, processor


def naive_epoch(model, processor, ds, args, per_object: bool) -> tuple[float, int, float | None]:
    """One epoch of the public recipe: the frozen encoder runs again at every step.

    `per_object=True` is the notebook's layout on multi-object data, one (image, mask, box) example per object, so
    every object costs an encoder pass; `per_object=False` puts all sampled boxes of a batch of images in one full
    forward. Returns the seconds, the number of optimizer steps and the GPU busy share.
    """
    device = args.device
    loader = torch.utils.data.DataLoader(
        ds.with_transform(
            SamTransform(processor, train=True, box_jitter=20, max_objects_per_image=args.max_objects_per_image)
        ),
        batch_size=1 if per_object else args.batch_size,
        shuffle=True,
        collate_fn=SamDataCollator(),
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = SamDiceCELoss()
    model.train()
    steps = 0
    _sync(device)
    start = time.perf_counter()
    with GpuBusy(device) as busy:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            k = batch["input_boxes"].shape[1]
            for sl in [slice(i, i + 1) for i in range(k)] if per_object else [slice(0, k)]:
                with _autocast(device, args.precision):
                    out = model(
                        pixel_values=batch["pixel_values"],
                        input_boxes=batch["input_boxes"][:, sl],
                        multimask_output=False,
                    )
                loss, _ = loss_fn(out.pred_masks[:, :, 0].float(), batch["labels"][:, sl])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
        _sync(device)
    return time.perf_counter() - start, steps, busy.value


def training_args(args, work: str, epochs: int, **overrides) -> TrainingArguments:
    return TrainingArguments(
        output_dir=f"{work}/out",
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=epochs,
        learning_rate=1e-5,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=args.device.type == "cuda",
        use_cpu=args.device.type == "cpu",
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        seed=args.seed,
        **overrides,
    )


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def cache(model, processor, ds, args, work: str) -> tuple[datasets.Dataset, float, float | None]:
    """Build (or find) the embedding cache; seconds and GPU busy share."""
    _sync(args.device)
    start = time.perf_counter()
    with GpuBusy(args.device) as busy:
        cached = add_image_embeddings(
            ds,
            model,
            processor.image_processor,
            cache_dir=f"{work}/cache",
            device=args.device,
            batch_size=args.embedding_batch_size,
            num_workers=args.num_workers,
            autocast_dtype=autocast_dtype(args.precision),
        )
        _sync(args.device)
    return cached, time.perf_counter() - start, busy.value


def sam_hf_epochs(model, processor, train: datasets.Dataset, args, work: str, epochs: int, **overrides) -> EpochTimer:
    """`SamTrainer` epochs on `train` (cached or not); per-epoch seconds and GPU busy."""
    timer = EpochTimer(args.device)
    trainer = SamTrainer(
        model=model,
        args=training_args(args, work, epochs, **overrides),
        train_dataset=train.with_transform(
            SamTransform(processor, train=True, box_jitter=20, max_objects_per_image=args.max_objects_per_image)
        ),
        data_collator=SamDataCollator(),
        processing_class=processor.image_processor,
        callbacks=[timer],
        iou_loss_weight=0.0,  # the naive loops' loss: DiceCE on the box-prompted mask
    )
    trainer.train()
    return timer


def encoder_throughput(model, args, batches: int = 5) -> float:
    """Images per second of the vision encoder alone, inputs already on the device, after one warm-up call."""
    size = model.config.vision_config.image_size
    batch = args.embedding_batch_size or default_embedding_batch_size(args.device)
    pixels = torch.randn(batch, 3, size, size, device=args.device)
    model.eval()
    with torch.no_grad(), _autocast(args.device, args.precision):
        model.get_image_embeddings(pixels)
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(batches):
            model.get_image_embeddings(pixels)
        _sync(args.device)
    return batch * batches / (time.perf_counter() - start)


def decoder_floor(model, processor, cached: datasets.Dataset, args) -> tuple[float, float | None]:
    """Seconds of one epoch of decoder steps on batches already on the device: the floor of a steady epoch."""
    loader = torch.utils.data.DataLoader(
        cached.with_transform(
            SamTransform(processor, train=True, box_jitter=20, max_objects_per_image=args.max_objects_per_image)
        ),
        batch_size=args.batch_size,
        collate_fn=SamDataCollator(),
    )
    batches = [
        {k: batch[k].to(args.device) for k in ("image_embeddings", "input_boxes", "labels")} for batch in loader
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = SamDiceCELoss()
    model.train()

    def epoch() -> None:
        for batch in batches:
            with _autocast(args.device, args.precision):
                out = model(
                    image_embeddings=batch["image_embeddings"],
                    input_boxes=batch["input_boxes"],
                    multimask_output=False,
                )
            loss, _ = loss_fn(out.pred_masks[:, :, 0].float(), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    epoch()  # warm-up: allocator, kernels
    _sync(args.device)
    start = time.perf_counter()
    with GpuBusy(args.device) as busy:
        epoch()
        _sync(args.device)
    return time.perf_counter() - start, busy.value


def inference(model, processor, image, boxes: list[list[float]], device, repeats: int = 3) -> dict[str, float]:
    """Seconds for 1 box, for K boxes sharing one encoding, and for K separate full calls (best of `repeats`)."""
    model.eval()

    def run(box_list):
        enc = processor(images=image, input_boxes=[box_list], return_tensors="pt")
        with torch.no_grad():
            emb = model.get_image_embeddings(enc["pixel_values"].to(device))
            model(image_embeddings=emb, input_boxes=enc["input_boxes"].to(device), multimask_output=False)
        _sync(device)

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


def speed(args, ds) -> None:
    work = tempfile.mkdtemp(prefix="sam_hf_bench_")
    result: dict = {"device": str(args.device), "device_name": device_name(args.device), "config": args.config}
    result |= {
        "num_images": len(ds),
        "objects_per_epoch": int(sum(min(n, args.max_objects_per_image) for n in ds["num_objects"])),
    }
    result |= {"batch_size": args.batch_size, "precision": args.precision, "num_workers": args.num_workers}

    if args.per_object_naive:
        model, processor = build(args.config, args.seed, args.device)
        naive_s, naive_steps, _ = naive_epoch(model, processor, ds, args, per_object=True)
        result |= {"naive_s_per_epoch": round(naive_s, 3), "naive_steps_per_epoch": naive_steps}
    model, processor = build(args.config, args.seed, args.device)
    naive_epoch(model, processor, ds.select(range(min(len(ds), args.batch_size))), args, per_object=False)  # warm-up
    naive_batched_s, _, naive_busy = naive_epoch(model, processor, ds, args, per_object=False)
    result |= {"naive_batched_s_per_epoch": round(naive_batched_s, 3), "naive_batched_gpu_busy": naive_busy}

    model, processor = build(args.config, args.seed, args.device)
    encoder_ips = encoder_throughput(model, args)
    cached, cache_s, cache_busy = cache(model, processor, ds, args, work)
    train = cached.remove_columns("image")
    timer = sam_hf_epochs(model, processor, train, args, work, args.epochs)
    epoch1_s = cache_s + timer.durations[0]
    steady_s = float(np.mean(timer.durations[1:]))
    steady_busy = [b for b in timer.busy[1:] if b is not None]
    floor_s, floor_busy = decoder_floor(model, processor, train, args)
    result |= {
        "encoder_images_per_s": round(encoder_ips, 2),
        "cache_build_s": round(cache_s, 3),
        "cache_images_per_s": round(len(ds) / cache_s, 2),
        "cache_over_encoder_throughput": round(len(ds) / cache_s / encoder_ips, 3),
        "cache_gpu_busy": cache_busy,
        "epoch1_s": round(epoch1_s, 3),
        "steady_s_per_epoch": round(steady_s, 3),
        "steady_gpu_busy": round(float(np.mean(steady_busy)), 1) if steady_busy else None,
        "decoder_floor_s_per_epoch": round(floor_s, 3),
        "decoder_floor_gpu_busy": floor_busy,
        "steady_over_floor": round(steady_s / floor_s, 2),
        "speedup_steady_vs_batched_naive": round(naive_batched_s / steady_s, 2),
        "epoch1_over_batched_naive": round(epoch1_s / naive_batched_s, 3),
    }
    if args.per_object_naive:
        result |= {
            "speedup_steady": round(result["naive_s_per_epoch"] / steady_s, 2),
            "speedup_epoch1": round(result["naive_s_per_epoch"] / epoch1_s, 3),
        }
    if args.torch_compile:
        model, processor = build(args.config, args.seed, args.device)
        compiled = sam_hf_epochs(model, processor, train, args, work, args.epochs, torch_compile=True)
        compiled_s = float(np.mean(compiled.durations[1:]))
        busy = [b for b in compiled.busy[1:] if b is not None]
        result |= {
            "compiled_first_epoch_s": round(compiled.durations[0], 3),
            "compiled_steady_s_per_epoch": round(compiled_s, 3),
            "compiled_steady_gpu_busy": round(float(np.mean(busy)), 1) if busy else None,
            "compile_speedup_steady": round(steady_s / compiled_s, 2),
        }
    if args.uncached:
        model, processor = build(args.config, args.seed, args.device)
        uncached = sam_hf_epochs(model, processor, ds, args, work, 2)
        result |= {
            "uncached_s_per_epoch": round(uncached.durations[-1], 3),
            "uncached_gpu_busy": uncached.busy[-1],
            "uncached_over_batched_naive": round(uncached.durations[-1] / naive_batched_s, 3),
        }

    row = max(range(len(ds)), key=lambda i: ds[i]["num_objects"])
    image = ds[row]["image"].convert("RGB")
    boxes = ds[row]["boxes"][: args.boxes]
    inf = inference(model, processor, image, boxes, args.device, repeats=args.repeats)
    k = len(boxes)
    result |= {
        "box_marginal_cost_ratio": round((inf["k_boxes_s"] - inf["one_box_s"]) / max(k - 1, 1) / inf["one_box_s"], 4),
        "k_boxes": k,
        "k_separate_over_shared": round(inf["k_separate_s"] / inf["k_boxes_s"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"\n{'measure':<52}{'value':>14}")
    for key, value in result.items():
        print(f"{key:<52}{value!s:>14}")
    print(json.dumps(result))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _decoder_step(model, emb, boxes, labels, autocast: bool, device) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(image_embeddings=emb, input_boxes=boxes, multimask_output=False)
    loss, _ = SamDiceCELoss()(out.pred_masks[:, :, 0].float(), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def decoder(args) -> None:
    """Seconds of one training step from a cached embedding (decoder forward + backward) for 1, 4 and 16 boxes, in
    fp32 and under bf16 autocast: the whole cost of a steady-state step."""
    model, processor = build(args.config, args.seed, args.device)
    model.train()
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    channels = model.config.vision_config.output_channels
    mask = 4 * side
    gen = torch.Generator().manual_seed(args.seed)
    emb = torch.randn(1, channels, side, side, generator=gen).to(args.device)
    result = {"config": args.config, "device": str(args.device), "device_name": device_name(args.device)}
    for k in (1, 4, 16):
        boxes = torch.rand(1, k, 4, generator=gen) * model.config.vision_config.image_size / 2
        boxes[..., 2:] += boxes[..., :2]
        labels = (torch.rand(1, k, mask, mask, generator=gen) > 0.5).float()
        boxes, labels = boxes.to(args.device), labels.to(args.device)
        for name, autocast in (("fp32", False), ("bf16", True)):
            times = [_decoder_step(model, emb, boxes, labels, autocast, args.device) for _ in range(args.repeats + 1)]
            result[f"{name}_{k}_boxes_s"] = round(min(times[1:]), 4)
            print(f"{f'decoder fwd+bwd, {k} boxes, {name}, s':<40}{min(times[1:]):>14.4f}")
    print(json.dumps(result))


def passes(args) -> None:
    """Milliseconds of one `SamTrainer` training step (`compute_loss` and backward) on a batch of one-object crops from
    cached embeddings, as the recipe adds decoder passes: box prompts only; then the multimask point pass (every 8th
    object in turn, and one row in 5 point-only, as `--point_crop_scale` with `--point_crop_every 4` gives); then the
    background points (the demo's recipe). Random embeddings and labels of the config's shapes: the cost depends on
    the shapes only."""
    model, _ = build(args.config, args.seed, args.device)
    model.mask_decoder.requires_grad_(True)  # the point pass trains every mask token and the IoU head
    model.train()
    vision = model.config.vision_config
    side, b = vision.image_size // vision.patch_size, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    centres = torch.rand(b, 1, 2, generator=gen) * vision.image_size * 0.5 + vision.image_size * 0.25
    targets = (torch.rand(b, 1, 4 * side, 4 * side, generator=gen) > 0.5).float()
    point_only = torch.arange(b) % 5 == 0
    batch = {
        "image_embeddings": torch.randn(b, vision.output_channels, side, side, generator=gen),
        "input_boxes": torch.cat([centres - vision.image_size / 8, centres + vision.image_size / 8], dim=-1),
        "input_points": centres[:, :, None],
        "input_labels": torch.ones(b, 1, 1, dtype=torch.long),
        "labels": targets.masked_fill(point_only[:, None, None, None], LABEL_PAD),
        "point_labels": targets,
        "point_only": point_only,
        "background_points": torch.rand(b, 1, 1, 2, generator=gen) * vision.image_size,
        "background_labels": torch.ones(b, 1, 1, dtype=torch.long),
    }
    batch = {k: v.to(args.device) for k, v in batch.items()}
    box_only = ("labels", "input_boxes", "image_embeddings")
    recipes = {
        "box": (0, {k: v for k, v in batch.items() if k in box_only}),
        "box+points": (8, {k: v for k, v in batch.items() if not k.startswith("background")}),
        "box+points+background": (8, batch),
    }
    work = tempfile.mkdtemp(prefix="sam_hf_bench_")
    result = {"config": args.config, "device": str(args.device), "device_name": device_name(args.device)}
    result.update({"batch_size": b, "precision": args.precision, "steps": args.repeats * 8})
    for name, (every, inputs) in recipes.items():
        trainer = SamTrainer(model=model, args=training_args(args, work, 1), multimask_every=every)

        def step(i: int, trainer=trainer, inputs=inputs) -> None:
            trainer.state.global_step = i  # the point pass's turn cycles with the step
            with _autocast(args.device, args.precision):
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
            model.zero_grad(set_to_none=True)

        for i in range(8):  # warm-up: one full cycle of turns
            step(i)
        _sync(args.device)
        start = time.perf_counter()
        for i in range(args.repeats * 8):
            step(i)
        _sync(args.device)
        result[f"{name}_ms_per_step"] = round((time.perf_counter() - start) / (args.repeats * 8) * 1000, 2)
        print(f"{f'{name}, ms per step':<40}{result[f'{name}_ms_per_step']:>14.2f}")
    print(json.dumps(result))


def transform(args, ds) -> None:
    """Milliseconds per row of the cached training transform: embeddings as array bytes (sam_hf's cache) against the
    same embeddings in an `Array3D` column read through `datasets`' Python formatting."""
    model, processor = build(args.config, args.seed, torch.device("cpu"))
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    shape = (vision.output_channels, grid, grid)
    work = tempfile.mkdtemp(prefix="sam_hf_bench_")
    rng = np.random.default_rng(args.seed)
    # Random embeddings of the right shape: the encoder's values do not change what reading them costs.
    emb = rng.standard_normal((len(ds), *shape)).astype(np.float16)
    sizes = [(im.height, im.width) for im in ds["image"]]
    side = processor.image_processor.size["longest_edge"]
    columns = {
        "image_embeddings": list(emb),
        "original_sizes": [list(s) for s in sizes],
        "reshaped_input_sizes": [list(resized_shape(*s, side)) for s in sizes],
    }
    features = datasets.Features(
        {
            "image_embeddings": datasets.Array3D(shape, "float16"),
            "original_sizes": datasets.List(datasets.Value("int32"), length=2),
            "reshaped_input_sizes": datasets.List(datasets.Value("int32"), length=2),
        }
    )
    array3d = datasets.Dataset.from_dict(columns, features=features).save_to_disk(f"{work}/array3d")
    array3d = datasets.concatenate_datasets([ds.flatten_indices(), datasets.load_from_disk(f"{work}/array3d")], axis=1)

    position = [0]

    def same_random_embeddings(pixel_values):  # the real cache format, filled with the embeddings above
        start = position[0]
        position[0] += len(pixel_values)
        return torch.from_numpy(emb[start : position[0]].astype(np.float32))

    model.get_image_embeddings = same_random_embeddings
    cached = add_image_embeddings(ds, model, processor.image_processor, cache_dir=f"{work}/cache")
    results = {"config": args.config, "rows": len(ds), "embedding_shape": list(shape)}

    def ms_per_row(table: datasets.Dataset, proc: SamProcessor, key: str, label: str) -> None:
        rows = table.with_transform(
            SamTransform(proc, train=True, box_jitter=20, max_objects_per_image=args.max_objects_per_image)
        )
        rows[0]  # warm-up
        start = time.perf_counter()
        for i in range(len(rows)):
            rows[i]
        results[key] = round((time.perf_counter() - start) / len(rows) * 1000, 2)
        print(f"{f'{label}, ms per row':<52}{results[key]:>14}")

    for name, table in (("array_bytes", cached), ("array3d_python", array3d)):
        ms_per_row(table.remove_columns("image"), processor, f"{name}_ms_per_row", f"cached transform, {name}")
    results["speedup"] = round(results["array3d_python_ms_per_row"] / results["array_bytes_ms_per_row"], 1)
    # Without the cache (`--cache_embeddings false`, or a trained encoder) a row decodes and preprocesses its image:
    # timed with one thread, as a DataLoader worker runs it, with the torchvision-backed processor (what
    # `facebook/sam-*` checkpoints load) and the PIL one, at the config's input size.
    ip = processor.image_processor
    sizes = {k: getattr(ip, k) for k in ("size", "pad_size", "mask_size", "mask_pad_size")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, backend in (("torchvision", SamImageProcessor), ("pil", SamImageProcessorPil)):
            backend_processor = SamProcessor(image_processor=backend(**sizes))
            ms_per_row(ds, backend_processor, f"uncached_{name}_ms_per_row", f"uncached transform, {name} processor")
    finally:
        torch.set_num_threads(threads)
    # Labels of the sampled objects, the two ways, on the same rows and objects.
    edge, pad = ip.mask_size["longest_edge"], ip.mask_pad_size["height"]
    rows = []
    for row in ds:
        instances = mask_to_instances(row["label"])
        k = min(args.max_objects_per_image, len(row["boxes"]))
        rows.append((instances, np.asarray(row["boxes"], np.float32)[:k], np.arange(1, k + 1)))
    for name, labels in (
        (
            "labels_in_boxes",
            lambda inst, boxes, ids: object_labels(inst, boxes, ids, resized_shape(*inst.shape, edge), pad),
        ),
        (
            "labels_full_frame",
            lambda inst, boxes, ids: resize_and_pad_masks(
                torch.from_numpy(inst)[None] == torch.from_numpy(ids)[:, None, None], edge, pad
            ),
        ),
    ):
        labels(*rows[0])
        start = time.perf_counter()
        for row in rows:
            labels(*row)
        results[f"{name}_ms_per_row"] = round((time.perf_counter() - start) / len(rows) * 1000, 2)
        print(f"{f'{name}, ms per row':<52}{results[f'{name}_ms_per_row']:>14}")
    print(json.dumps(results))


def stream(args, ds) -> None:
    """Rows per second of the training transform through the dataloader from a stream stored as one Parquet file
    (row groups of 10): as one shard (the workers but one stopped by datasets) against `reshard_for_workers`."""
    from sam_hf.data.streaming import reshard_for_workers

    work = tempfile.mkdtemp(prefix="sam_hf_bench_")
    ds.remove_columns([c for c in ds.column_names if c not in ("image", "label")]).to_parquet(
        f"{work}/train.parquet", batch_size=10
    )
    _, processor = build(args.config, args.seed, torch.device("cpu"))
    transform = SamTransform(processor, train=True, box_jitter=20, max_objects_per_image=args.max_objects_per_image)
    workers = args.num_workers or 2
    result = {"config": args.config, "rows": len(ds), "num_workers": workers, "batch_size": args.batch_size}
    for _ in range(args.repeats):
        for name in ("one_shard", "resharded"):
            rows = datasets.load_dataset("parquet", data_files={"train": f"{work}/train.parquet"}, streaming=True)
            rows = rows["train"]
            if name == "resharded":
                rows = reshard_for_workers(rows, workers)
            rows = index_objects(rows)
            rows = rows.map(transform, batched=True, batch_size=16, remove_columns=rows.column_names)
            loader = torch.utils.data.DataLoader(
                rows, batch_size=args.batch_size, num_workers=workers, collate_fn=SamDataCollator()
            )
            start, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["input_boxes"])
            rate = n / (time.perf_counter() - start)
            result[f"{name}_shards"], result[f"{name}_rows_read"] = rows.num_shards, n
            result[f"{name}_rows_per_s"] = max(result.get(f"{name}_rows_per_s", 0.0), round(rate, 1))
            print(f"{f'{name} ({rows.num_shards} shards), rows/s':<52}{rate:>14.1f}")
    print(json.dumps(result))


def memory(args, ds) -> None:
    """Peak RSS of training from cached embeddings, the cache built beforehand in a child process."""
    work = args.work_dir or tempfile.mkdtemp(prefix="sam_hf_bench_")
    if args.mode == "build_cache":
        model, processor = build(args.config, args.seed, args.device)
        cache(model, processor, ds, args, work)
        return
    child = [sys.executable, __file__, "--mode", "build_cache", "--work_dir", work, "--device", str(args.device)]
    child += ["--config", args.config, "--dataset_name", args.dataset_name, "--num_images", str(args.num_images)]
    child += ["--seed", str(args.seed), "--precision", args.precision]
    start = time.perf_counter()
    subprocess.run(child, check=True, env=os.environ.copy())
    build_s = time.perf_counter() - start
    model, processor = build(args.config, args.seed, args.device)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cached, cache_s, _ = cache(model, processor, ds, args, work)
    timer = sam_hf_epochs(model, processor, cached.remove_columns("image"), args, work, 1)
    result = {
        "num_images": len(ds),
        "cache_build_s_child_process": round(build_s, 1),
        "cache_reuse_s": round(cache_s, 2),
        "epoch_s": round(timer.durations[0], 2),
        "peak_rss_mb_after_model_load": round(rss_model, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(args.device),
        "config": args.config,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "vit-b", "vit-h"], default="tiny")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="bf16 on CUDA, else fp32")
    parser.add_argument("--batch_size", type=int, default=None, help="images per step; 4 on CUDA, else 1")
    parser.add_argument("--num_workers", type=int, default=None, help="dataloader workers; min(8, CPUs-1) on CUDA")
    parser.add_argument("--embedding_batch_size", type=int, default=None, help="images per encoder call (cache)")
    parser.add_argument("--dataset_name", default="data/nuclei_demo")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max_objects_per_image", type=int, default=16)
    parser.add_argument("--per_object_naive", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the notebook's one-object-per-step loop (default: on CPU only)")  # fmt: skip
    parser.add_argument("--torch_compile", action="store_true", help="also time steady epochs under torch.compile")
    parser.add_argument("--uncached", action="store_true", help="also time an epoch without the embedding cache")
    parser.add_argument("--boxes", type=int, default=16, help="K, boxes per image for the inference comparison")
    parser.add_argument("--repeats", type=int, default=3, help="best of N (inference, decoder); passes: 8-step cycles")
    parser.add_argument("--seed", type=int, default=0)
    modes = ["speed", "memory", "build_cache", "decoder", "transform", "passes", "stream"]
    parser.add_argument("--mode", choices=modes, default="speed")
    parser.add_argument("--work_dir", default=None, help="memory mode: where the embedding cache goes")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.batch_size = args.batch_size or (16 if args.mode == "passes" else 4 if cuda else 1)
    args.num_workers = args.num_workers if args.num_workers is not None else default_dataloader_num_workers(cuda)
    args.per_object_naive = (not cuda) if args.per_object_naive is None else args.per_object_naive
    if args.mode == "speed" and args.epochs < 2:
        parser.error("--epochs must be >= 2 to measure steady-state epochs")
    datasets.disable_progress_bars()

    if args.mode == "decoder":
        return decoder(args)
    if args.mode == "passes":
        return passes(args)
    ds = index_objects(load_source(args.dataset_name)["train"].select(range(args.num_images)))
    if args.mode == "transform":
        return transform(args, ds)
    if args.mode == "stream":
        return stream(args, ds)
    if args.mode == "speed":
        return speed(args, ds)
    return memory(args, ds)


if __name__ == "__main__":
    main()
