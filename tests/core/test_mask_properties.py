"""Property-based checks of masks -> instances -> boxes -> labels over random shapes, dtypes and mask types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from sam_hf import tiny_sam_config, tiny_sam_processor  # noqa: E402
from sam_hf.core.images import encode_images, resized_shape  # noqa: E402
from sam_hf.core.masks import MASK_TYPES, boxes_from_instances, mask_to_instances  # noqa: E402
from sam_hf.data.transforms import resize_and_pad_masks  # noqa: E402

PROCESSOR = tiny_sam_processor(tiny_sam_config())  # 256-px input, 64 x 64 low-resolution masks
INPUT_SIDE = PROCESSOR.image_processor.size["longest_edge"]
MASK_SIDE = PROCESSOR.image_processor.mask_size["longest_edge"]
MASK_PAD = PROCESSOR.image_processor.mask_pad_size["height"]

_VALUES = {
    np.uint8: [0, 0, 0, 1, 2, 7, 255],
    np.uint16: [0, 0, 0, 1, 300, 65535],
    np.int32: [0, 0, 0, 1, -5, 2**31 - 1],
    np.float32: [0.0, 0.0, 0.0, 1.0, 2.5, -3.0, 1e6, np.nan, np.inf],
    np.float64: [0.0, 0.0, 0.0, 1.0, 0.5, -0.25, np.nan],
}


@st.composite
def masks(draw):
    height, width = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.bool_, np.float32, np.float64]))
    elements = st.booleans() if dtype is np.bool_ else st.sampled_from(_VALUES[dtype])
    arr = draw(hnp.arrays(dtype, (height, width), elements=elements))
    as_pil = dtype in (np.uint8, np.uint16) and draw(st.booleans())
    return arr, (Image.fromarray(arr) if as_pil else arr), draw(st.sampled_from(MASK_TYPES))


@settings(max_examples=150, deadline=None)
@given(masks())
def test_masks_to_instances_to_boxes(case):
    arr, mask, mask_type = case
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        with pytest.raises(ValueError, match="NaN or infinite"):  # the documented refusal
            mask_to_instances(mask, mask_type)
        return
    inst = mask_to_instances(mask, mask_type)
    assert inst.dtype == np.int32 and inst.shape == arr.shape
    foreground = arr != 0
    np.testing.assert_array_equal(inst > 0, foreground)  # every labelled pixel, and only those, is an object
    n = int(inst.max())
    assert set(np.unique(inst[foreground]).tolist()) == set(range(1, n + 1))  # ids 1..N without gaps
    values = np.unique(arr[foreground])
    kind = ("binary" if len(values) <= 1 else "instance") if mask_type == "auto" else mask_type
    if kind == "instance":  # one object per value: same value <=> same id
        assert n == len(values)
        for k in range(1, n + 1):
            assert len(np.unique(arr[inst == k])) == 1
    elif kind == "binary":
        assert n == ndimage.label(foreground)[1]
    else:
        assert n == sum(ndimage.label(arr == v)[1] for v in values)

    boxes = boxes_from_instances(inst)
    assert boxes.shape == (n, 4)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int), start=1):
        ys, xs = np.nonzero(inst == k)
        # Every pixel inside the inclusive box, and the box tight: each side touches the object.
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


@st.composite
def instance_maps(draw):
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    arr = draw(hnp.arrays(np.uint8, (height, width), elements=st.sampled_from([0, 0, 1, 2, 3])))
    return mask_to_instances(arr, "instance"), draw(st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(instance_maps())
def test_labels_align_with_the_processor_image_transform(case):
    inst, chunk_size = case
    height, width = inst.shape
    n = int(inst.max())
    ids = torch.arange(1, n + 1)
    labels = resize_and_pad_masks(torch.from_numpy(inst)[None] == ids[:, None, None], MASK_SIDE, MASK_PAD, chunk_size)
    assert labels.shape == (n, MASK_PAD, MASK_PAD)
    # The processor's own transform of this image and of a full mask: the same extent, top-left, zero padding.
    enc = encode_images(PROCESSOR.image_processor, np.zeros((height, width, 3), np.uint8),
                        segmentation_maps=np.ones((height, width), np.uint8))  # fmt: skip
    assert tuple(enc["original_sizes"][0].tolist()) == (height, width)
    assert tuple(enc["reshaped_input_sizes"][0].tolist()) == resized_shape(height, width, INPUT_SIDE)
    rows, cols = np.nonzero(enc["labels"][0].numpy())
    new_h, new_w = resized_shape(height, width, MASK_SIDE)
    assert (rows.max() + 1, cols.max() + 1) == (new_h, new_w)
    assert (labels[:, new_h:] == 0).all() and (labels[:, :, new_w:] == 0).all()  # the padding is zero
    assert ((labels >= 0) & (labels <= 1)).all()
    # Each object's label lies where its box lands in the resized frame (give or take the resampling kernel).
    sy, sx = new_h / height, new_w / width
    for k, (x0, y0, x1, y1) in enumerate(boxes_from_instances(inst)):
        assert labels[k].sum() > 0, "an object vanished from its label"
        r, c = np.nonzero(labels[k].numpy() > 1e-6)
        ty, tx = max(1.0, sy) + 1, max(1.0, sx) + 1
        assert y0 * sy - ty <= r.min() and r.max() <= (y1 + 1) * sy + ty
        assert x0 * sx - tx <= c.min() and c.max() <= (x1 + 1) * sx + tx
    # Chunking does not change the labels.
    whole = resize_and_pad_masks(torch.from_numpy(inst)[None] == ids[:, None, None], MASK_SIDE, MASK_PAD, n + 1)
    torch.testing.assert_close(labels, whole, rtol=0, atol=0)
