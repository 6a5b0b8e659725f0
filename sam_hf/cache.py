"""Image-embedding cache: run the frozen vision encoder once per image, keep the result memory-mapped on disk.

The cache is an Arrow file in the datasets cache, named by a fingerprint of everything the embedding depends on:
the vision encoder's weights, the image processor's configuration, the storage dtype and every image's bytes. A
changed weight or image gives another fingerprint, so a stale cache is never read. Only the image side is cached;
prompts (box jitter, object sampling) are drawn fresh at every step by `SamTransform`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import SamModel

from .data import to_rgb_array

logger = logging.getLogger(__name__)

__all__ = ["add_image_embeddings", "embedding_fingerprint", "weights_fingerprint"]

CACHE_FORMAT = "sam_hf-embeddings-v1"
DTYPES = {"float16": np.float16, "float32": np.float32}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the names and exact bytes of every tensor in `module.state_dict()`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _image_bytes(entry: dict) -> bytes:
    if entry.get("bytes") is not None:
        return entry["bytes"]
    return Path(entry["path"]).read_bytes()


def embedding_fingerprint(ds: datasets.Dataset, model: SamModel, image_processor, dtype: str) -> str:
    """Fingerprint of the embeddings of `ds`: encoder weights, processor config, dtype and image bytes."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(weights_fingerprint(model.vision_encoder).encode())
    digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    digest.update(dtype.encode())
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for entry in raw["image"]:
        digest.update(hashlib.sha256(_image_bytes(entry)).digest())
    return digest.hexdigest()[:32]


def add_image_embeddings(
    ds: datasets.Dataset,
    model: SamModel,
    image_processor,
    split_name: str = "train",
    dtype: str = "float16",
    batch_size: int = 1,
    cache_dir: str | None = None,
    device: torch.device | str = "cpu",
) -> datasets.Dataset:
    """Add `image_embeddings`, `original_sizes` and `reshaped_input_sizes` columns from a memory-mapped cache.

    Builds the cache on first use (a batched `datasets.map` through `SamModel.get_image_embeddings`) and reads it
    back memory-mapped afterwards. Under accelerate, call it inside `main_process_first()` so that the main process
    builds the file and the others read it.

    Args:
        ds (`datasets.Dataset`): rows with an `image` column.
        model (`SamModel`): its vision encoder makes the embeddings; it is not modified.
        image_processor: the model's image processor (resizing, normalisation, padding).
        split_name (`str`): for logs and progress bars.
        dtype (`str`, *optional*, defaults to `"float16"`): storage dtype, `"float16"` or `"float32"`.
        batch_size (`int`, *optional*, defaults to 1): images per encoder call. On CPUs one image at a time is both
            faster and far lighter: ViT-B's global attention over 4,096 tokens needs about 0.8 GB per image and layer.
        cache_dir (`str`, *optional*): where cache files live; defaults to `<datasets cache>/sam_hf/embeddings`.
        device: where the encoder runs.
    """
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    fingerprint = embedding_fingerprint(ds, model, image_processor, dtype)
    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "sam_hf" / "embeddings"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{fingerprint}.arrow"
    if path.is_file():
        logger.info("Split %r: reusing cached image embeddings %s", split_name, path)
        cached = datasets.Dataset.from_file(str(path))
    else:
        cached = _build(ds, model, image_processor, split_name, dtype, batch_size, path, fingerprint, device)
    if len(cached) != len(ds):
        raise ValueError(f"Embedding cache {path} has {len(cached)} rows but split {split_name!r} has {len(ds)}.")
    return datasets.concatenate_datasets([ds, cached], axis=1)


def _build(ds, model, image_processor, split_name, dtype, batch_size, path, fingerprint, device):
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    channels = model.config.vision_config.output_channels
    features = datasets.Features(
        {
            "image_embeddings": datasets.Array3D((channels, grid, grid), dtype),
            "original_sizes": datasets.List(datasets.Value("int32"), length=2),
            "reshaped_input_sizes": datasets.List(datasets.Value("int32"), length=2),
        }
    )
    was_training, original_device = model.training, next(model.parameters()).device
    model.eval().to(device)

    def _embed(batch: dict[str, list]) -> dict[str, list]:
        enc = image_processor(images=[to_rgb_array(im) for im in batch["image"]], return_tensors="pt")
        with torch.no_grad():
            emb = model.get_image_embeddings(enc["pixel_values"].to(device))
        return {
            "image_embeddings": emb.float().cpu().numpy().astype(DTYPES[dtype]),
            "original_sizes": np.asarray(enc["original_sizes"]).tolist(),
            "reshaped_input_sizes": np.asarray(enc["reshaped_input_sizes"]).tolist(),
        }

    try:
        cached = ds.select_columns(["image"]).map(
            _embed,
            batched=True,
            batch_size=batch_size,
            remove_columns=["image"],
            features=features,
            cache_file_name=str(path),
            new_fingerprint=fingerprint,
            desc=f"Caching image embeddings ({split_name})",
        )
    finally:
        model.train(was_training).to(original_device)
    logger.info("Split %r: cached %d image embeddings (%s) in %s", split_name, len(cached), dtype, path)
    # Read back from the file, memory-mapped, whatever map kept in memory.
    return datasets.Dataset.from_file(str(path))
