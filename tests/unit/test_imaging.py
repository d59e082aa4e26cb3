"""Image validation and decoding: formats, modes, corrupt data and size/pixel limits."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from fieldlens.common.errors import InvalidInput
from fieldlens.router import imaging
from fieldlens.router.imaging import ImageLimits, content_hash, decode

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000)


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (100, 80)) -> Image.Image:
    return Image.new("RGB", size, color)


def _noise(size: tuple[int, int] = (160, 120), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 1-bit greyscale pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    # Far too little image data: decoding it would fail as corrupt, not as too large.
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("fmt", "kw", "tol"),
    [
        ("JPEG", {"quality": 95}, 4),
        ("PNG", {}, 0),
        ("WEBP", {"lossless": True}, 0),
    ],
)
def test_allowed_formats_decode_to_model_input(fmt: str, kw: dict[str, object], tol: int) -> None:
    color = (200, 40, 90)
    data = _encode(_solid(color), fmt, **kw)
    img = decode(data, LIMITS)
    assert img.rgb.shape == (64, 64, 3)
    assert img.rgb.dtype == np.uint8
    assert img.format == fmt
    assert (img.width, img.height) == (100, 80)
    assert img.content_hash == hashlib.sha256(data).hexdigest()
    assert np.abs(img.rgb.astype(int) - np.asarray(color)).max() <= tol


def test_large_jpeg_is_reduced_and_keeps_its_header_size() -> None:
    data = _encode(_noise((1024, 768)), "JPEG", quality=80)
    img = decode(data, LIMITS)
    assert img.rgb.shape == (64, 64, 3)
    assert (img.width, img.height) == (1024, 768)


def test_content_hash_follows_the_bytes() -> None:
    a = _encode(_solid((1, 2, 3)), "PNG")
    b = _encode(_solid((1, 2, 4)), "PNG")
    assert decode(a, LIMITS).content_hash == decode(a, LIMITS).content_hash
    assert decode(a, LIMITS).content_hash != decode(b, LIMITS).content_hash


def test_rgba_drops_alpha() -> None:
    im = Image.new("RGBA", (50, 50), (10, 20, 30, 0))
    img = decode(_encode(im, "PNG"), LIMITS)
    assert img.rgb.shape == (64, 64, 3)
    assert (img.rgb == np.asarray([10, 20, 30], np.uint8)).all()


def test_greyscale_becomes_three_equal_channels() -> None:
    im = Image.new("L", (30, 40), 77)
    img = decode(_encode(im, "PNG"), LIMITS)
    assert img.rgb.shape == (64, 64, 3)
    assert (img.rgb == 77).all()


def test_palette_image_is_expanded() -> None:
    im = Image.new("P", (64, 64), 1)
    im.putpalette([0, 0, 0, 250, 100, 5] + [0, 0, 0] * 254)
    img = decode(_encode(im, "PNG"), LIMITS)
    assert (img.rgb == np.asarray([250, 100, 5], np.uint8)).all()


def test_sixteen_bit_greyscale_png_keeps_its_brightness() -> None:
    im = Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16))
    assert im.mode.startswith("I;16")
    img = decode(_encode(im, "PNG"), LIMITS)
    # 30000 / 65535 of full scale is about 117 in 8 bits.
    assert abs(int(img.rgb.mean()) - round(30000 / 65535 * 255)) <= 2


def test_jpeg_with_multi_picture_segment_is_accepted() -> None:
    data = _encode(_solid((200, 40, 90)), "MPO", save_all=True, append_images=[_solid((0, 0, 0))])
    assert data[:3] == b"\xff\xd8\xff"  # a JPEG stream any JPEG decoder reads
    img = decode(data, LIMITS)
    assert img.rgb.shape == (64, 64, 3)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_rejected_naming_the_allowed_ones(fmt: str) -> None:
    data = _encode(_solid((10, 20, 30)), fmt)
    with pytest.raises(
        InvalidInput, match=f"unsupported image format {fmt}; send one of JPEG, PNG, WEBP"
    ):
        decode(data, LIMITS)


def test_empty_bytes_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode(b"", LIMITS)


def test_random_bytes_are_rejected() -> None:
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidInput, match="not a decodable image; send one of JPEG, PNG, WEBP"):
        decode(data, LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_images_are_rejected(fmt: str, keep: float) -> None:
    data = _encode(_noise(), fmt)
    cut = data[: int(len(data) * keep)]
    with pytest.raises(InvalidInput, match="corrupt image data: "):
        decode(cut, LIMITS)


def test_byte_limit() -> None:
    data = _encode(_noise((64, 64)), "PNG")
    assert decode(data, ImageLimits(max_bytes=len(data), max_pixels=10_000)).rgb.shape == (
        64,
        64,
        3,
    )
    with pytest.raises(
        InvalidInput, match=f"image is {len(data)} bytes; the limit is {len(data) - 1} bytes"
    ):
        decode(data, ImageLimits(max_bytes=len(data) - 1, max_pixels=10_000))


def test_pixel_limit_is_inclusive() -> None:
    data = _encode(_solid((5, 5, 5), (40, 25)), "PNG")  # 1000 pixels
    assert decode(data, ImageLimits(max_bytes=10**6, max_pixels=1000)).width == 40
    with pytest.raises(InvalidInput, match=r"= 1000 pixels; the limit is 999 \(decompression"):
        decode(data, ImageLimits(max_bytes=10**6, max_pixels=999))


def test_declared_pixels_over_our_limit_are_rejected_before_decoding() -> None:
    data = _png_header_only(3000, 3000)  # 9 M pixels, under Pillow's own guard
    assert len(data) < 200
    limits = ImageLimits(max_bytes=10**6, max_pixels=1_000_000)
    start = time.perf_counter()
    # Our header check, not Pillow's decoder (which would call the data corrupt).
    with pytest.raises(InvalidInput, match=r"the limit is 1000000 \(decompression-bomb guard\)"):
        decode(data, limits)
    assert time.perf_counter() - start < 1.0


def test_decompression_bomb_is_rejected_fast() -> None:
    data = _png_header_only(20000, 20000)  # 400 M pixels declared in a tiny file
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="decompression-bomb guard"):
        decode(data, LIMITS)
    assert time.perf_counter() - start < 1.0


def test_exif_orientation_is_applied() -> None:
    # A 2:1 image whose EXIF says "rotate 90": the left half red, the right half blue.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    img = decode(buf.getvalue(), LIMITS)
    # After the 90-degree turn, red is on top and blue at the bottom.
    top, bottom = img.rgb[:16].mean(axis=(0, 1)), img.rgb[-16:].mean(axis=(0, 1))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
def test_model_sized_jpegs_decode_to_the_same_pixels_on_the_fast_path(
    mode: str, subsampling: int, progressive: bool
) -> None:
    """64x64 JPEGs skip Pillow (libjpeg-turbo straight to RGB); the pixels must be Pillow's."""
    rng = np.random.default_rng(subsampling + 3 * progressive)
    limits = ImageLimits(1 << 20, 1 << 20)
    for quality in (50, 90):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        smooth = Image.fromarray(pixels).resize((8, 8)).resize((64, 64), Image.BICUBIC)
        buf = io.BytesIO()
        smooth.convert(mode).save(
            buf, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive
        )
        data = buf.getvalue()
        digest = content_hash(data)
        assert imaging._decode_model_sized_jpeg(data, limits, digest) is not None  # fast path
        fast = decode(data, limits)
        slow = imaging.decode_with_pillow(data, limits, digest)
        assert (fast.width, fast.height, fast.format) == (slow.width, slow.height, slow.format)
        assert fast.rgb.shape == (64, 64, 3) and fast.rgb.dtype == np.uint8
        assert np.array_equal(fast.rgb, slow.rgb)


def test_jpegs_the_fast_path_must_not_take_go_to_pillow() -> None:
    limits = ImageLimits(1 << 20, 1 << 20)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 64), "red").save(rotated, "JPEG", exif=exif)
    bigger = io.BytesIO()
    Image.new("RGB", (65, 64), "red").save(bigger, "JPEG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(cmyk, "JPEG")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(good, "JPEG")
    truncated = good.getvalue()[: len(good.getvalue()) // 2]
    for data in (rotated.getvalue(), bigger.getvalue(), cmyk.getvalue(), truncated):
        assert imaging._decode_model_sized_jpeg(data, limits, content_hash(data)) is None
    assert decode(cmyk.getvalue(), limits).rgb.shape == (64, 64, 3)
    with pytest.raises(InvalidInput, match="corrupt|truncated"):
        decode(truncated, limits)
