"""Data: sources, object indexing, tiles and object crops, the training transform and collator, the embedding
cache, COCO and synthetic images."""

from __future__ import annotations

from .cache import (
    EmbeddingCacheError,
    add_image_embeddings,
    embedding_fingerprint,
    read_embedding,
    verify_embedding_cache,
    weights_fingerprint,
)
from .coco import COCO_FILE, CocoIndex, annotation_mask, find_coco_file, index_coco, load_coco
from .coco_export import write_coco
from .collator import SamDataCollator
from .indexing import index_objects
from .sources import load_source
from .synthetic import NUCLEI_APPEARANCE, synthetic_blobs, synthetic_cells, synthetic_dataset
from .transforms import SamTransform, jitter_boxes, object_labels, resize_and_pad_masks
from .windows import crop_objects, tile_dataset

__all__ = [
    "COCO_FILE",
    "CocoIndex",
    "EmbeddingCacheError",
    "NUCLEI_APPEARANCE",
    "SamDataCollator",
    "SamTransform",
    "add_image_embeddings",
    "annotation_mask",
    "crop_objects",
    "embedding_fingerprint",
    "find_coco_file",
    "index_coco",
    "index_objects",
    "jitter_boxes",
    "load_coco",
    "load_source",
    "object_labels",
    "read_embedding",
    "resize_and_pad_masks",
    "synthetic_blobs",
    "synthetic_cells",
    "synthetic_dataset",
    "tile_dataset",
    "verify_embedding_cache",
    "weights_fingerprint",
    "write_coco",
]
