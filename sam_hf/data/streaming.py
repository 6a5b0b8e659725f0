"""Streamed datasets: splits cut from a stream, and one shard per dataloader worker."""

from __future__ import annotations

import logging
import zlib
from typing import Any

import datasets
import numpy as np

from ..config.arguments import DataArguments

logger = logging.getLogger(__name__)


def reshard_for_workers(stream: datasets.IterableDataset, num_workers: int) -> datasets.IterableDataset:
    """`stream`, split into more shards when it has fewer than `num_workers` and its format allows (Parquet: one shard
    per row group).

    Each dataloader worker reads whole shards of a stream, and `datasets` stops the workers that get none: a Hub
    dataset stored in one Parquet file would be read and transformed by one worker however many were asked for.
    """
    if num_workers <= stream.num_shards:
        return stream
    reshard = getattr(stream, "reshard", None)  # not in older datasets
    try:
        resharded = reshard() if reshard is not None else stream
    except NotImplementedError:  # a format datasets cannot split
        resharded = stream
    if resharded.num_shards > stream.num_shards:
        logger.info(
            "--streaming: the training stream has %d shard(s) for %d dataloader workers; split into %d (Parquet row "
            "groups) so that every worker reads.",
            stream.num_shards,
            num_workers,
            resharded.num_shards,
        )
    if resharded.num_shards < num_workers:
        logger.warning(
            "--streaming: the training stream has %d shard(s), so only %d of the %d dataloader workers read it (each "
            "reads whole shards). A dataset stored in more files or row groups is read by more workers.",
            resharded.num_shards,
            resharded.num_shards,
            num_workers,
        )
    return resharded


def _image_key(image: Any) -> tuple:
    """A decoded image's identity in a stream: its shape and a checksum of its pixels."""
    pixels = np.ascontiguousarray(np.asarray(image))
    return pixels.shape, str(pixels.dtype), zlib.crc32(pixels)


def _undecoded(ds: datasets.Dataset | datasets.IterableDataset) -> tuple[Any, dict[str, datasets.Image]]:
    """`ds` with its decoded `Image` columns left encoded, and those columns' features to put back."""
    images = {c: f for c, f in (ds.features or {}).items() if isinstance(f, datasets.Image) and f.decode}
    for column in images:
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds, images


def streaming_splits(
    source: datasets.IterableDatasetDict, data_args: DataArguments, seed: int, num_workers: int = 0
) -> tuple[datasets.IterableDataset, datasets.Dataset | None]:
    """The streamed training split (shuffled through a buffer, reshuffled every epoch) and an evaluation split read
    into memory: `--eval_split` when the source has it, otherwise the first `--max_eval_samples` (default 32)
    training rows, whose images the training stream then leaves out. The training stream is split into at least
    `num_workers` shards where its format allows (`reshard_for_workers`).

    The evaluation rows are left out by image rather than with `IterableDataset.skip`: `datasets` spreads a skip over
    the dataloader workers (each skips its share of its own shards), so with several workers some evaluation rows
    would be trained on and as many training rows lost.
    """
    if data_args.train_split not in source:
        raise ValueError(
            f"--train_split {data_args.train_split!r} is not a split of the dataset; splits: {', '.join(source)}."
        )
    train = reshard_for_workers(source[data_args.train_split], num_workers)
    n_eval, carved = data_args.max_eval_samples, False
    if data_args.eval_split and data_args.eval_split in source:
        eval_stream = source[data_args.eval_split]
    elif data_args.validation_split_percentage:
        n_eval, carved, eval_stream = n_eval or 32, True, train
        logger.info(
            "Streaming without a %r split: the first %d training rows are the evaluation split",
            data_args.eval_split,
            n_eval,
        )
    else:
        eval_stream = None
    eval_ds = None
    if eval_stream is not None:
        # Read with images still encoded: they are stored as they came, not decoded and encoded again.
        eval_stream, images = _undecoded(eval_stream.take(n_eval) if n_eval else eval_stream)
        eval_ds = datasets.Dataset.from_list(list(eval_stream), features=eval_stream.features)
        for column, feature in images.items():
            eval_ds = eval_ds.cast_column(column, feature)
        if carved:
            # In the dataloader workers, on the images they decode anyway.
            held_out = {_image_key(image) for image in eval_ds["image"]}
            train = train.filter(lambda image: _image_key(image) not in held_out, input_columns="image")
        logger.info("Read %d evaluation rows from the stream into memory", len(eval_ds))
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    return train.shuffle(seed=seed, buffer_size=1000), eval_ds
