"""Image-embedding cache: run the frozen vision encoder once per image, keep the result memory-mapped on disk.

The cache is one Arrow file in the datasets cache, named by a fingerprint of everything the embedding depends on:
the vision encoder's weights, the image processor's class and configuration, the storage dtype, the encoder's
autocast dtype and every image's bytes. A changed weight or image gives another fingerprint, so a stale cache is
never read. Only the image side is cached; prompts (box jitter, object sampling) are drawn at every step by
`SamTransform`.

Layout: one row per image, in the order of the dataset.

- `image_embeddings`: the frozen image side's output as `.npy` bytes (`numpy.lib.format`), so that reading a row costs
  one memory copy instead of the nested Python lists that `datasets` makes of an `Array3D` column. One array for SAM;
  one per feature level, back to back, for family members whose decoder reads several (`sam_hf.family`: SAM-HQ's
  early ViT features, SAM 2's three levels);
- `original_sizes`, `reshaped_input_sizes`: `(height, width)` before and after the processor's resize;
- `image_digest`: SHA-256 of the image's bytes;
- `embedding_checksum`: CRC-32 of the digest followed by the embedding bytes, checked whenever a row is read.

Integrity: the file is written under a temporary name and given its final name when complete, so a killed build never
leaves a file that looks finished. Builds may run at the same time, in other containers or on other machines sharing
the cache directory: each temporary is named by its machine, PID namespace, PID and a random token, and the finished
file is published under its final name only if no other build published it first (see `_publish`). A build removes the
temporaries of dead builds of its own machine and PID namespace, and those of any other that were not written to for
`STALE_TEMPORARY_SECONDS`; it never judges another machine's process by its PID. On open, the schema, the row count and
the per-row image digests are checked (rows of other images, or in another order, are caught there), and every row's
checksum is verified when the file is small enough. A damaged file is moved aside with a warning and rebuilt. Damage
found later, when a row is read, raises `EmbeddingCacheError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from ..core.env import default_dataloader_num_workers
from ..core.images import encode_images, to_rgb_array
from ..family.registry import family_of

logger = logging.getLogger(__name__)


CACHE_FORMAT = "sam_hf-embeddings-v3"


DTYPES = {"float16": np.float16, "float32": np.float32}


CACHE_COLUMNS = ("image_embeddings", "original_sizes", "reshaped_input_sizes", "image_digest", "embedding_checksum")


# Caches up to this size have every row's checksum verified when they are opened; larger ones when rows are read.
VERIFY_ON_OPEN_MAX_BYTES = 2 * 1024**3


# A temporary of another machine or PID namespace is removed once it has not been written to for this long: a live
# build writes every few batches, and whether another machine's process is alive cannot be known from here.
STALE_TEMPORARY_SECONDS = 7 * 24 * 3600


_FEATURES = datasets.Features(
    {
        "image_embeddings": datasets.Value("large_binary"),
        "original_sizes": datasets.List(datasets.Value("int32"), length=2),
        "reshaped_input_sizes": datasets.List(datasets.Value("int32"), length=2),
        "image_digest": datasets.Value("string"),
        "embedding_checksum": datasets.Value("int64"),
    }
)


class EmbeddingCacheError(ValueError):
    """An embedding cache file is damaged: unreadable, of the wrong shape, or a row fails its checksum."""


def weights_fingerprint(module: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names and exact bytes of every tensor in `module.state_dict()` (or in a state dict)."""
    digest = hashlib.sha256()
    state = module if isinstance(module, Mapping) else module.state_dict()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _image_bytes(entry: dict) -> bytes:
    if entry.get("bytes") is not None:
        return entry["bytes"]
    return Path(entry["path"]).read_bytes()


def image_digests(ds: datasets.Dataset) -> list[str]:
    """SHA-256 (hex) of every image's encoded bytes, in row order, without decoding any image."""
    raw = ds.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    return [hashlib.sha256(_image_bytes(entry)).hexdigest() for entry in raw["image"]]


def _fingerprint(
    digests: list[str], model: torch.nn.Module, image_processor, dtype: str, autocast_dtype: torch.dtype | None
) -> str:
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(image_side_fingerprint(model).encode())
    digest.update(type(image_processor).__name__.encode())
    digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    digest.update(f"{dtype}/{autocast_dtype}".encode())
    for d in digests:
        digest.update(bytes.fromhex(d))
    return digest.hexdigest()[:32]


def image_side_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of the weights that make a model's image embeddings (its family member's `image_side`)."""
    member = family_of(model)
    return member.model_type + ":" + weights_fingerprint(member.image_side_state(model))


def embedding_fingerprint(
    ds: datasets.Dataset,
    model: torch.nn.Module,
    image_processor,
    dtype: str,
    autocast_dtype: torch.dtype | None = None,
) -> str:
    """Fingerprint of the embeddings of `ds`: encoder weights, processor, dtypes and image bytes."""
    return _fingerprint(image_digests(ds), model, image_processor, dtype, autocast_dtype)


def _checksum(digest: str, blob: bytes) -> int:
    return zlib.crc32(blob, zlib.crc32(digest.encode()))


def _encode(arrays: list[np.ndarray]) -> bytes:
    """One row's feature levels as `.npy` arrays written back to back."""
    buffer = io.BytesIO()
    for array in arrays:
        np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _decode(blob: bytes) -> list[np.ndarray]:
    buffer, arrays = io.BytesIO(blob), []
    while buffer.tell() < len(blob):
        arrays.append(np.lib.format.read_array(buffer, allow_pickle=False))
    if not arrays:
        raise ValueError("no array in the row")
    return arrays


def read_embedding(row: Mapping[str, Any], verify: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """The float32 image features of one cached row (a dict with the cache's columns): the `(C, g, g)` embedding,
    or a list of feature levels for family members whose decoder reads several.

    Args:
        row (`Mapping`): at least `image_embeddings` (array bytes from this module's cache, or an array-like such as
            an `Array3D` value), and `image_digest` / `embedding_checksum` to verify the bytes.
        verify (`bool`, *optional*, defaults to `True`): check the row's CRC-32 first.

    Raises:
        EmbeddingCacheError: the bytes do not match their checksum or are not an array.
    """
    blob = row["image_embeddings"]
    if not isinstance(blob, bytes):
        # An array column (nested lists, numpy or torch) of a dataset that was not built by this module.
        return torch.as_tensor(np.asarray(blob), dtype=torch.float32)
    if verify and "embedding_checksum" in row:
        if _checksum(row["image_digest"], blob) != row["embedding_checksum"]:
            raise EmbeddingCacheError(
                f"The cached embedding of image sha256:{row['image_digest'][:16]} fails its checksum: the embedding "
                "cache file is damaged."
            )
    try:
        arrays = _decode(blob)
    except (ValueError, OSError, TypeError, EOFError) as err:
        raise EmbeddingCacheError(
            f"The cached embedding of image sha256:{str(row.get('image_digest'))[:16]} is not a valid array: {err}"
        ) from err
    levels = [torch.from_numpy(a).float() for a in arrays]
    return levels[0] if len(levels) == 1 else levels


def verify_embedding_cache(path: str | os.PathLike, digests: list[str] | None = None) -> str | None:
    """Check one cache file: readable, the expected columns, the image digests (when given) and every row's checksum.

    Returns:
        `None` when the file is sound, otherwise what is wrong with it.
    """
    try:
        cached = datasets.Dataset.from_file(str(path))
        return _problem(cached, digests, full=True)
    except (pa.ArrowException, OSError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"


def _problem(cached: datasets.Dataset, digests: list[str] | None, full: bool) -> str | None:
    missing = [c for c in CACHE_COLUMNS if c not in cached.column_names]
    if missing:
        return f"missing columns {missing}"
    if digests is not None:
        if len(cached) != len(digests):
            return f"{len(cached)} rows where the split has {len(digests)} images"
        stored = cached["image_digest"]
        bad = next((i for i, (a, b) in enumerate(zip(stored, digests)) if a != b), None)
        if bad is not None:
            return f"row {bad} holds the embedding of another image"
    rows = range(len(cached)) if full or len(cached) < 2 else (0, len(cached) - 1)
    table = cached.select_columns(["image_embeddings", "image_digest", "embedding_checksum"])
    for i in rows:
        try:
            read_embedding(table[i])
        except EmbeddingCacheError:
            return f"row {i} fails its checksum"
    return None


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged cache file aside (never deleted: it may be evidence) and say so."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    path.rename(aside)
    logger.warning("Embedding cache %s is damaged (%s); moved it to %s and building it again.", path, reason, aside)
    return aside


def _open(path: Path, digests: list[str]) -> datasets.Dataset | None:
    """The cache at `path`, or `None` (after moving it aside) when it is damaged."""
    try:
        cached = datasets.Dataset.from_file(str(path))
        problem = _problem(cached, digests, full=path.stat().st_size <= VERIFY_ON_OPEN_MAX_BYTES)
    except (pa.ArrowException, OSError, ValueError) as err:
        problem = f"unreadable ({type(err).__name__}: {err})"
    if problem is None:
        return cached
    quarantine(path, problem)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _origin() -> str:
    """`<host>-<PID namespace>` of this process: where its PID means something. Two containers may both run their
    build as PID 1, on one machine or on several sharing the cache directory."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (not Linux): the host name alone
        namespace = 0
    return f"{host}-{namespace}"


# `<fingerprint>.arrow.incomplete-<host>-<PID namespace>-<token>-<pid>`; older builds wrote `...incomplete-<pid>`.
_TEMPORARY = re.compile(r"\.arrow\.incomplete-(?:(?P<origin>.+-\d+)-(?P<token>[0-9a-f]{32})-)?(?P<pid>\d+)$")


def _temporary_path(path: Path) -> Path:
    """A name for this build's temporary of `path` that no other build, here or on another machine, can have."""
    return path.with_name(f"{path.name}.incomplete-{_origin()}-{uuid.uuid4().hex}-{os.getpid()}")


def _remove_stale_temporaries(root: Path) -> None:
    """Remove the temporaries of dead builds: those of this machine and PID namespace whose process is gone, and any
    not written to for `STALE_TEMPORARY_SECONDS`. Another machine's or container's temporary is otherwise left alone:
    its PID says nothing here."""
    origin = _origin()
    for tmp in root.glob("*.arrow.incomplete-*"):
        match = _TEMPORARY.search(tmp.name)
        try:
            idle = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:  # its build finished or removed it meanwhile
            continue
        if match and match["origin"] == origin and not _pid_alive(int(match["pid"])):
            reason = "left behind by an interrupted cache build"
        elif idle > STALE_TEMPORARY_SECONDS:
            reason = f"not written to for {idle / 86400:.1f} days"
        else:
            continue
        logger.info("Removing %s, %s.", tmp, reason)
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path) -> bool:
    """Give the finished temporary `tmp` its final name `path`, unless another build published `path` first; remove
    `tmp` either way. Returns whether this build's file was published.

    A hard link creates `path` only if it does not exist, atomically, also on NFS: the file another build published
    is never replaced under the processes (on any machine) that have it open, memory-mapped. Where the file system
    has no hard links, the temporary is renamed if `path` does not exist yet.
    """
    try:
        os.link(tmp, path)
        published = True
    except FileExistsError:
        published = False
    except OSError:  # no hard links on this file system
        published = not path.exists()
        if published:
            os.replace(tmp, path)
    tmp.unlink(missing_ok=True)
    return published


def default_embedding_batch_size(device: torch.device | str) -> int:
    """8 images per encoder call on an accelerator; 1 on CPUs, where ViT-B's global attention over 4,096 tokens needs
    about 0.8 GB per image and layer and batching gains nothing."""
    return 1 if torch.device(device).type == "cpu" else 8


def add_image_embeddings(
    ds: datasets.Dataset,
    model: torch.nn.Module,
    image_processor,
    split_name: str = "train",
    dtype: str = "float16",
    batch_size: int | None = None,
    cache_dir: str | None = None,
    device: torch.device | str = "cpu",
    num_workers: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> datasets.Dataset:
    """Add the embedding cache's columns (`image_embeddings`, `original_sizes`, `reshaped_input_sizes`,
    `image_digest`, `embedding_checksum`) to `ds`, from a memory-mapped cache file.

    Builds the cache on first use and reads it back memory-mapped afterwards; the result references that one file
    (no second copy is written). Under accelerate, call it inside `main_process_first()` so that the main process
    builds the file and the others read it. Use `read_embedding(row)` to get a row's embedding as a tensor.

    Args:
        ds (`datasets.Dataset`): rows with an `image` column.
        model: a SAM-family model; its frozen image side (`sam_hf.family`) makes the embeddings; it is not modified.
        image_processor: the model's image processor (resizing, normalisation, padding).
        split_name (`str`): for logs and progress bars.
        dtype (`str`, *optional*, defaults to `"float16"`): storage dtype, `"float16"` or `"float32"`.
        batch_size (`int`, *optional*): images per encoder call; defaults to 8 on an accelerator and 1 on CPUs.
        cache_dir (`str`, *optional*): where cache files live; defaults to `<datasets cache>/sam_hf/embeddings`.
        device: where the encoder runs.
        num_workers (`int`, *optional*): processes that decode and preprocess images while the encoder runs;
            defaults to `min(8, CPUs - 1)` on an accelerator and 0 on CPUs.
        autocast_dtype (`torch.dtype`, *optional*): run the encoder under autocast in this dtype (pass the training
            precision, `torch.bfloat16` for `--bf16`, so that cached and uncached training see the same encoder).
    """
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    device = torch.device(device)
    digests = image_digests(ds)
    fingerprint = _fingerprint(digests, model, image_processor, dtype, autocast_dtype)
    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "sam_hf" / "embeddings"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{fingerprint}.arrow"
    cached = _open(path, digests) if path.is_file() else None
    if cached is not None:
        logger.info("Split %r: reusing cached image embeddings %s", split_name, path)
    else:
        _build(
            ds,
            model,
            image_processor,
            path=path,
            digests=digests,
            split_name=split_name,
            dtype=dtype,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            autocast_dtype=autocast_dtype,
        )
        cached = datasets.Dataset.from_file(str(path))
    if ds._indices is not None:
        # concatenate_datasets(axis=1) rewrites *every* input when one has an indices mapping (a select, shuffle or
        # filter), the cache included. Flattening the split alone keeps the cache a single file.
        ds = ds.flatten_indices()
    return datasets.concatenate_datasets([ds, cached], axis=1)


class _ImageRows(torch.utils.data.Dataset):
    """Decoded and preprocessed images for the cache build, so that DataLoader workers do it off the main process."""

    def __init__(self, ds: datasets.Dataset, image_processor):
        self.ds = ds.select_columns(["image"])
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        images = [to_rgb_array(im) for im in self.ds[indices]["image"]]
        enc = encode_images(self.image_processor, images)
        return {
            "pixel_values": enc["pixel_values"],
            "original_sizes": np.asarray(enc["original_sizes"]).tolist(),
            "reshaped_input_sizes": np.asarray(enc["reshaped_input_sizes"]).tolist(),
        }


def _check_space(split_name: str, n_rows: int, row_bytes: int, shapes: list[tuple], dtype: str, path: Path) -> None:
    size = n_rows * row_bytes
    free = shutil.disk_usage(path.parent).free
    logger.info(
        "Split %r: caching %d image embeddings %s %s in %s: %.2f MB per image, %.2f GB needed, %.2f GB free",
        split_name,
        n_rows,
        " + ".join(str(s) for s in shapes),
        dtype,
        path,
        row_bytes / 1e6,
        size / 1e9,
        free / 1e9,
    )
    if size > free:
        raise OSError(
            f"Not enough disk space for the embedding cache of split {split_name!r}: {size / 1e9:.2f} GB needed in "
            f"{path.parent}, {free / 1e9:.2f} GB free. Free some space, point --embedding_cache_dir elsewhere, use "
            "--embedding_dtype float16, or train without the cache (--cache_embeddings false)."
        )


def _build(
    ds: datasets.Dataset,
    model: torch.nn.Module,
    image_processor,
    *,
    path: Path,
    digests: list[str],
    split_name: str,
    dtype: str,
    batch_size: int | None,
    num_workers: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> None:
    """Encode every image of `ds` and write the cache file `path` (`digests`: the images' SHA-256, in row order);
    the other arguments are those of `add_image_embeddings`."""
    member = family_of(model)
    root = path.parent
    _remove_stale_temporaries(root)
    batch_size = batch_size or default_embedding_batch_size(device)
    if num_workers is None:
        num_workers = default_dataloader_num_workers(cuda=device.type != "cpu")
    loader = torch.utils.data.DataLoader(
        _ImageRows(ds, image_processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=lambda batch: batch,  # __getitems__ already returns the whole batch
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
    tmp = _temporary_path(path)
    was_training, original_device = model.training, next(model.parameters()).device
    model.eval().to(device)
    start = time.perf_counter()
    try:
        with ArrowWriter(features=_FEATURES, path=str(tmp), writer_batch_size=64) as writer:
            row = 0
            for batch in tqdm(loader, desc=f"Caching image embeddings ({split_name})", unit="batch"):
                pixel_values = batch["pixel_values"].to(device, non_blocking=True)
                autocast = torch.autocast(device.type, autocast_dtype) if autocast_dtype is not None else nullcontext()
                with torch.no_grad(), autocast:
                    levels = member.encode(model, pixel_values)
                levels = [x.to(dtype=getattr(torch, dtype)).cpu().numpy() for x in levels]
                blobs = [_encode([x[i] for x in levels]) for i in range(len(levels[0]))]
                if row == 0:
                    # The size of one row is known once the encoder has run: refuse before writing the rest.
                    shapes = [tuple(x.shape[1:]) for x in levels]
                    _check_space(split_name, len(ds), max(len(b) for b in blobs) + 128, shapes, dtype, path)
                batch_digests = digests[row : row + len(blobs)]
                writer.write_batch(
                    {
                        "image_embeddings": blobs,
                        "original_sizes": batch["original_sizes"],
                        "reshaped_input_sizes": batch["reshaped_input_sizes"],
                        "image_digest": batch_digests,
                        "embedding_checksum": [_checksum(d, b) for d, b in zip(batch_digests, blobs)],
                    }
                )
                row += len(blobs)
            writer.finalize()
        if row != len(ds):
            raise RuntimeError(f"Embedding cache build wrote {row} rows for {len(ds)} images.")
        if not _publish(tmp, path):
            logger.info(
                "Split %r: another build published the embedding cache %s first; using it (this build's copy is "
                "discarded).",
                split_name,
                path,
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training).to(original_device)
    seconds = time.perf_counter() - start
    logger.info(
        "Split %r: cached %d image embeddings in %.1f s (%.1f images/s), %.2f GB, in %s",
        split_name,
        len(ds),
        seconds,
        len(ds) / max(seconds, 1e-9),
        path.stat().st_size / 1e9,
        path,
    )


def quarantine_damaged(*splits: datasets.Dataset | None) -> str:
    """Verify the embedding caches behind `splits` row by row and move the damaged ones aside; say what was done."""
    moved = []
    for ds in splits:
        for entry in ds.cache_files if ds is not None else []:
            path = Path(entry["filename"])
            if len(path.stem) == 32 and path.suffix == ".arrow":  # <fingerprint>.arrow, not a datasets cache-*.arrow
                problem = verify_embedding_cache(path) if path.is_file() else None
                if problem is not None:
                    moved.append(f"{path} ({problem}) was moved to {quarantine(path, problem)}")
    if not moved:
        return "No damaged cache file was found on disk."
    return "; ".join(moved) + ". Run the same command again to rebuild it."
