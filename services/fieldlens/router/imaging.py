"""Image validation and decoding with size, pixel and decompression-bomb limits."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from fieldlens.common.errors import InvalidInput

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
MODEL_IMAGE_SIZE = 64
# A JPEG the fast path decodes: its colour spaces (what libjpeg converts to RGB itself), and
# markers whose presence sends it to Pillow instead (an orientation that must be applied).
_FAST_JPEG_COLOURSPACES = ("YCbCr", "Gray")
_ORIENTATION_MARKERS = (b"Exif\x00\x00", b"http://ns.adobe.com/xap/1.0/")
_METADATA_SCAN_BYTES = 1 << 16


@dataclass(frozen=True)
class ImageLimits:
    """Bounds enforced before any pixel is decoded."""

    max_bytes: int
    max_pixels: int
    size: int = MODEL_IMAGE_SIZE


@dataclass(frozen=True)
class DecodedImage:
    """The model input (size x size x 3 uint8 RGB) and the content hash of the encoded bytes."""

    rgb: np.ndarray
    content_hash: str
    format: str
    width: int
    height: int


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checked_hash(data: bytes, limits: ImageLimits) -> str:
    """The content hash of an encoded image within the byte limit (no decoding: cache hits
    are answered from the hash alone)."""
    if not data:
        raise InvalidInput("image is empty")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    return content_hash(data)


def decode(data: bytes, limits: ImageLimits, digest: str | None = None) -> DecodedImage:
    """Validates and decodes an encoded image, raising InvalidInput with a clear reason."""
    digest = digest or checked_hash(data, limits)
    fast = _decode_model_sized_jpeg(data, limits, digest)
    if fast is not None:
        return fast
    return decode_with_pillow(data, limits, digest)


def decode_with_pillow(data: bytes, limits: ImageLimits, digest: str) -> DecodedImage:
    """`decode` for every format and size, with Pillow."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between 1x and 2x its own bomb limit; the header
            # check below is ours, so escalate everything to an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                # Pillow names JPEGs with a multi-picture segment (phone photos) MPO.
                fmt = "JPEG" if im.format == "MPO" else (im.format or "?")
                if fmt not in ALLOWED_FORMATS:
                    raise InvalidInput(
                        f"unsupported image format {fmt}; send one of {', '.join(ALLOWED_FORMATS)}"
                    )
                width, height = im.size
                # Checked from the header, before decoding: a tiny file can declare huge pixels.
                if width * height > limits.max_pixels:
                    raise InvalidInput(
                        f"image is {width}x{height} = {width * height} pixels; the limit is "
                        f"{limits.max_pixels} (decompression-bomb guard)"
                    )
                if width < 1 or height < 1:
                    raise InvalidInput("image has no pixels")
                im.draft("RGB", (limits.size * 2, limits.size * 2))  # JPEG: decode at reduced scale
                # Phones store rotation as an EXIF tag; in place, since a copy of every photo
                # (what exif_transpose returns when there is nothing to turn) costs more.
                ImageOps.exif_transpose(im, in_place=True)
                if im.mode.startswith("I;16") or im.mode == "I":
                    # convert("RGB") clips 16-bit greys to white; scale to 8 bits first.
                    wide = np.asarray(im, dtype=np.uint32)
                    shift = 8 if im.mode.startswith("I;16") or wide.max() > 255 else 0
                    im = Image.fromarray((wide >> shift).clip(0, 255).astype(np.uint8), "L")
                rgb = im.convert("RGB").resize((limits.size, limits.size), Image.BILINEAR)
                arr = np.asarray(rgb, dtype=np.uint8)
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(
            f"not a decodable image; send one of {', '.join(ALLOWED_FORMATS)}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"image rejected by the decompression-bomb guard: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated or corrupt data surfaces from the decoder as OSError/SyntaxError.
        raise InvalidInput(f"corrupt image data: {exc}") from None
    return DecodedImage(arr, digest, fmt, width, height)


def _decode_model_sized_jpeg(data: bytes, limits: ImageLimits, digest: str) -> DecodedImage | None:
    """A plain JPEG already at the model's size, decoded by libjpeg-turbo straight to RGB.

    The common case (a client that resizes before sending, like the dataset's photos) costs a
    quarter of Pillow's path, pixel for pixel the same (the same library and methods: accurate
    DCT, smooth upsampling). Anything else returns None and takes Pillow's path: another size
    or format, an EXIF or XMP segment (it may carry an orientation), CMYK, or data libjpeg
    finds wrong (so the client gets Pillow's message for it).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    head = data[:_METADATA_SCAN_BYTES]
    if any(marker in head for marker in _ORIENTATION_MARKERS):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        if (
            (width, height) != (limits.size, limits.size)
            or colourspace not in _FAST_JPEG_COLOURSPACES
            or width * height > limits.max_pixels
        ):
            return None
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    except ValueError:
        return None
    return DecodedImage(rgb, digest, "JPEG", width, height)
