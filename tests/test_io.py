"""Reading images of any common format/depth and masks of either convention; bad files are named."""

import numpy as np
import pytest
from PIL import Image

from lesion_kd.data.io import DataError, read_image, read_mask


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
def test_read_image_returns_uint8_rgb_for_every_mode(tmp_path, mode):
    arr = (np.arange(12 * 10).reshape(12, 10) * (500 if mode == "I;16" else 2)).astype(
        np.uint16 if mode == "I;16" else np.uint8)
    if mode in ("RGB", "RGBA"):
        arr = np.stack([arr] * (3 if mode == "RGB" else 4), axis=-1)
    Image.fromarray(arr, mode=mode if mode != "I;16" else None).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert img.shape == (12, 10, 3) and img.dtype == np.uint8
    if mode == "I;16":  # 16-bit is min-max scaled onto the full 8-bit range
        assert img.min() == 0 and img.max() == 255


def test_read_image_jpeg_and_npy(tmp_path):
    Image.fromarray(np.full((9, 7, 3), 100, np.uint8)).save(tmp_path / "a.jpg")
    np.save(tmp_path / "b.npy", np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5))
    assert read_image(tmp_path / "a.jpg").shape == (9, 7, 3)
    b = read_image(tmp_path / "b.npy")
    assert b.shape == (4, 5, 3) and b.max() == 255


@pytest.mark.parametrize("high", [1, 255])
def test_read_mask_accepts_0_1_and_0_255(tmp_path, high):
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = high
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert set(np.unique(out)) == {0, 1} and out.sum() == 9


def test_mask_with_more_than_two_levels_is_named(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[0, 0], m[1, 1] = 128, 255
    Image.fromarray(m).save(tmp_path / "grey.png")
    with pytest.raises(DataError, match=r"grey\.png.*two levels"):
        read_mask(tmp_path / "grey.png")


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"bad\.jpg.*corrupt or unreadable"):
        read_image(tmp_path / "bad.jpg")


def test_nan_image_is_refused(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((4, 4), np.nan, np.float32))
    with pytest.raises(DataError, match=r"nan\.npy.*NaN"):
        read_image(tmp_path / "nan.npy")
