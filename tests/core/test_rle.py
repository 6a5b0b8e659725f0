"""COCO RLE: the layout pycocotools reads, round trips, and the checks that keep bad runs away from numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sam_hf.core.rle import decode_rle, encode_rle, rle_size

RLE_PY = Path(__file__).resolve().parents[2] / "sam_hf" / "core" / "rle.py"


def test_rle_matches_coco_layout_and_round_trips():
    # Column-major runs starting with background: the 2 x 3 mask [[0, 1, 1], [0, 1, 0]] flattens to 0 0 1 1 1 0.
    mask = np.array([[0, 1, 1], [0, 1, 0]], bool)
    assert encode_rle(mask, compressed=False) == {"size": [2, 3], "counts": [2, 3, 1]}
    assert encode_rle(mask) == {"size": [2, 3], "counts": "231"}  # small counts are chr(48 + count)
    assert encode_rle(np.ones((2, 2), bool), compressed=False) == {"size": [2, 2], "counts": [0, 4]}
    assert encode_rle(np.zeros((3, 2), bool), compressed=False) == {"size": [3, 2], "counts": [6]}
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 33)]:
        for density in (0.0, 0.3, 1.0):
            m = rng.random(shape) < density
            for compressed in (False, True):
                np.testing.assert_array_equal(decode_rle(encode_rle(m, compressed)), m)
    # numpy integers are integers (counts taken from an array), tuples are lists.
    np.testing.assert_array_equal(decode_rle({"size": (np.int64(1), 3), "counts": [np.int32(1), 2]}), [[0, 1, 1]])


def test_counts_that_wrap_around_int64_are_refused_without_a_crash():
    """Four counts whose sum is 2**64 + 24,000 wrap around to 24,000 = 120 x 200 in int64; numpy's `np.repeat` then
    reads past its buffer and the interpreter dies (exit 139). The module runs in a child interpreter, loaded from its
    file (it imports nothing from sam_hf), so a crash fails this test instead of the test run."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('rle', sys.argv[1])\n"
        "rle = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(rle)\n"
        "try:\n"
        "    rle.decode_rle({'size': [120, 200], 'counts': [2**62, 2**62, 2**62, 2**62 + 24000]})\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(RLE_PY)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"decode_rle crashed the interpreter (exit {proc.returncode}): {proc.stderr[-2000:]}"
    total = 4 * 2**62 + 24000  # the Python-int sum, not its int64 wraparound
    assert f"RLE runs sum to {total} pixels but 'size' 120x200 (HxW) has 24000" in proc.stdout


@pytest.mark.parametrize(
    "rle, message",
    [
        # A count past int64 (OverflowError from numpy before), and more pixels than an array can index.
        ({"size": [1, 5], "counts": [2**64]}, f"RLE runs sum to {2**64} pixels"),
        ({"size": [2**40, 2**40], "counts": [2**80]}, "more pixels than an array can hold"),
        ({"size": [1e400, 5], "counts": [5]}, "'size' must be [height, width] (non-negative integers)"),
        ({"size": [True, 5], "counts": [5]}, "'size' must be [height, width]"),
        ({"size": ["1", "5"], "counts": [5]}, "'size' must be [height, width]"),
        # Non-integer counts are refused, not truncated or parsed.
        ({"size": [1, 5], "counts": [2.5, 2.5]}, "count 0 is 2.5"),
        ({"size": [1, 5], "counts": [1, 4.0]}, "count 1 is 4.0"),
        ({"size": [1, 5], "counts": [True, 4]}, "count 0 is true"),
        ({"size": [1, 5], "counts": ["5"]}, 'count 0 is "5"'),
        ({"size": [1, 5], "counts": [[5]]}, "count 0 is [5]"),
        ({"size": [1, 5], "counts": [6, -1]}, "negative run at index 1"),
        ({"size": [1, 5], "counts": {"0": 5}}, "must be a list of integers (uncompressed) or a string (compressed)"),
        # A compressed count of 100 groups would be a 500-bit integer (and a long one takes quadratic time).
        ({"size": [1, 5], "counts": "o" * 100}, "count 0 of the compressed RLE string has more than 13 groups"),
    ],
)
def test_bad_runs_and_sizes_are_refused_before_decoding(rle, message):
    with pytest.raises(ValueError) as info:
        decode_rle(rle)
    assert message in str(info.value)


def test_rle_size_reads_the_size_without_decoding():
    # Counts that do not even sum right: the size alone is read, so a caller can compare it first.
    assert rle_size({"size": [120, 200], "counts": [1]}) == (120, 200)
    with pytest.raises(ValueError, match="expected an RLE object with 'size' and 'counts'"):
        rle_size({"size": [120, 200]})
