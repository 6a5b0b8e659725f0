"""Train a tiny CLIPSeg offline, so that text prompts can be tried without the Hub.

    .venv/bin/python scripts/train_tiny_clipseg.py --output_dir runs/tiny-clipseg

`CIDAS/clipseg-rd64-refined` (150M parameters, trained on PhraseCut) is the model to use for real text prompts; it
cannot be downloaded offline. This script trains a 0.3M-parameter CLIPSeg from scratch on the 24 training images of
the demo split of `data/nuclei_demo` (seed 42, 25% held out, as `configs/demo.yaml`), with the single phrase
"nucleus" and the nuclei masks as targets: it learns where nuclei are, not language (every phrase gives about the
same map). Its tokenizer knows single letters only. The 1,000 default steps took 37 minutes on 2 CPU cores shared
with other jobs (about 2 s a step). After 400 steps the map is noisier: its boxes give SAM masks for 4 of the 11
nuclei of the example in docs/text-prompts.md (IoU >= 0.5), against 8 after 1,000.
"""

from __future__ import annotations

import sys
from pathlib import Path

# scripts/evaluate.py shares its name with the `evaluate` library; keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import logging

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)

from sam_hf.core.images import to_rgb_array
from sam_hf.core.masks import mask_to_instances
from sam_hf.data.sources import load_source, split_source

logger = logging.getLogger(__name__)
SIZE = 128


def tiny_clipseg(seed: int) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = ViTImageProcessor(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    config = CLIPSegConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=SIZE
        )
        | {"patch_size": 8},
        projection_dim=32,
        extract_layers=[1, 2, 3],
        reduce_dim=32,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    torch.manual_seed(seed)
    return CLIPSegForImageSegmentation(config), CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


def crops(images: list[np.ndarray], masks: list[np.ndarray], n: int, rng: np.random.Generator):
    """`n` random square crops (half to all of the shorter side), flipped at random, stretched to SIZE."""
    xs, ys = [], []
    for _ in range(n):
        k = rng.integers(len(images))
        image, mask = images[k], masks[k]
        h, w = mask.shape
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        y0, x0 = rng.integers(h - side + 1), rng.integers(w - side + 1)
        img = torch.from_numpy(image[y0 : y0 + side, x0 : x0 + side]).permute(2, 0, 1).float() / 255
        msk = torch.from_numpy(mask[y0 : y0 + side, x0 : x0 + side]).float()[None]
        if rng.random() < 0.5:
            img, msk = img.flip(-1), msk.flip(-1)
        xs.append(F.interpolate(img[None], (SIZE, SIZE), mode="bilinear", antialias=True)[0])
        ys.append(F.interpolate(msk[None], (SIZE, SIZE), mode="bilinear", antialias=True)[0, 0])
    return (torch.stack(xs) - 0.5) / 0.5, torch.stack(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="runs/tiny-clipseg")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)

    train, _ = split_source(load_source("data/nuclei_demo"), validation_split_percentage=25, seed=args.seed)
    images = [to_rgb_array(row["image"]) for row in train]
    masks = [(mask_to_instances(row["label"]) > 0).astype(np.uint8) for row in train]
    model, processor = tiny_clipseg(args.seed)
    text = processor.tokenizer(["nucleus"], return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.steps)
    rng = np.random.default_rng(args.seed)
    model.train()
    for step in range(1, args.steps + 1):
        pixels, target = crops(images, masks, args.batch_size, rng)
        logits = model(
            pixel_values=pixels,
            input_ids=text["input_ids"].expand(len(pixels), -1),
            attention_mask=text["attention_mask"].expand(len(pixels), -1),
        ).logits.reshape(target.shape)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == 1:
            logger.info("step %d: loss %.4f", step, loss.item())
    out = Path(args.output_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("Saved the tiny CLIPSeg (%d parameters) to %s", sum(p.numel() for p in model.parameters()), out)


if __name__ == "__main__":
    main()
