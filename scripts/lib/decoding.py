"""Decoding one image file safely: PIL with a memory bound, EXIF orientation, any colour mode to 8-bit RGB,
resized and centre-cropped to the training size. Anything unreadable is an UnreadableImage with the reason."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.lib.cli import UserError, printable

# What PIL raises on broken files: truncated data (OSError/SyntaxError/EOFError), bad zlib streams, malformed
# headers (ValueError/struct.error), and huge images (DecompressionBombError, which is not an OSError).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    struct.error,
    IndexError,
    Image.DecompressionBombError,
)


class UnreadableImage(UserError):
    """An image file that cannot be decoded (empty, truncated, not an image, too large, odd colour mode)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read image {printable(path)}: {printable(reason)} — replace or delete the file")
        self.path = Path(path)
        self.reason = reason


# Images are decoded whole, so their size is checked first (Image.open reads only the header). 8192 x 8192: every
# camera up to 61 MP fits, and a larger JPEG is decoded at 1/2..1/8 scale (draft) before this check. PIL's own
# bomb limit (179 MP) lets a 329 KB 16-bit PNG of 13000 x 13000 through, which took predict to 2.9 GB.
MAX_DECODE_PIXELS = 8192 * 8192
# Worst host memory per decoded pixel: a palette image with transparency is decoded at 1 byte, expanded once to
# RGBA (4) and premultiplied for the resize (4); RGBA costs 4 + 4, 16-bit 2 + 4, RGB 4 (PIL stores 3 bands in 4
# bytes), grey 1. Measured as peak-RSS growth over 16 MP images: 9.1, 8.1, 6.1, 4.1, 1.1 (18, 24, 12, 8, 6 when
# every conversion ran at full size before the resize).
DECODE_BYTES_PER_PIXEL = 9
# So one decode needs at most this much (~0.6 GB); the cache build runs no more decodes at once than fit.
WORST_DECODE_BYTES = MAX_DECODE_PIXELS * DECODE_BYTES_PER_PIXEL
# Decoder threads of a cache build: PIL releases the GIL, so up to one per core, but never more than this.
MAX_DECODE_WORKERS = 8
# Stored orientation -> the transpose that shows the image upright (the EXIF Orientation tag, 0x0112).
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# Files between PIL's warning limit (89 MP) and its error limit are refused by MAX_DECODE_PIXELS with a reason in
# the skip list; PIL's warning would only say the same thing again, outside the log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _refuse_oversized(path: Path, image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_DECODE_PIXELS:
        raise UnreadableImage(
            path,
            f"{width} x {height} pixels is more than the {MAX_DECODE_PIXELS / 1e6:.0f} "
            "megapixels decoded here (save a smaller copy)",
        )


# Modes whose bicubic resize means what it should (alpha is premultiplied by resize itself); 16-bit images cannot
# be resized, palette and 1-bit ones only nearest-neighbour, and in CMYK, LAB or HSV the mixing is not linear.
_RESAMPLED_AS_IS = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})


def _resizable(image: Image.Image) -> Image.Image:
    """The decoded image in a mode that resizes well, converted (one full-size copy) only where it must be."""
    if image.mode in _RESAMPLED_AS_IS:
        return image
    if image.mode.startswith("I;16"):
        return image.convert("I")
    if image.mode == "1":
        return image.convert("L")
    has_alpha = image.mode in ("PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if has_alpha else "RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white (not the black that a plain RGBA->RGB convert would give)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image, sixteen_bit: bool) -> Image.Image:
    """The resized image as 8-bit RGB, without clipping high-bit-depth images to white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA"):
        return _composite_on_white(image)
    if image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if sixteen_bit:
            values = values >> 8
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _is_sixteen_bit(image: Image.Image) -> bool:
    # 32-bit integer images from PIL are almost always 16-bit sources; values above 255 say so. getextrema reads
    # the decoded pixels in place, without a copy.
    return image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255)


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` and cut the centre square, in one antialiased resize."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0
    )


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode `path` to a (size, size, 3) uint8 array: upright, RGB, shorter side resized, centre-cropped.

    At most MAX_DECODE_PIXELS are decoded (larger JPEGs at a reduced scale, others are refused), and every
    conversion but one happens after the resize, so one decode needs at most WORST_DECODE_BYTES.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage(path, "the file is empty (0 bytes)")
        with Image.open(path) as image:
            # JPEG can decode at 1/2..1/8 scale directly; keeps both sides >= size, so quality is kept.
            image.draft(image.mode, (size, size))
            _refuse_oversized(path, image)
            image.load()
            sixteen_bit = _is_sixteen_bit(image)
            orientation = image.getexif().get(_EXIF_ORIENTATION)
            # The centre square of the stored image is the centre square of the upright one, so the (small)
            # crop is turned upright instead of the whole decoded image.
            small = _to_rgb(_resize_center_crop(_resizable(image), size), sixteen_bit)
            upright = small.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else small
            return np.asarray(upright, dtype=np.uint8)
    except Image.UnidentifiedImageError:
        raise UnreadableImage(path, "not an image format Pillow can read") from None
    except _DECODE_ERRORS as error:
        raise UnreadableImage(path, f"{type(error).__name__}: {error}") from error
