"""Image folders in, a uint8 cache out: listing, decoding and the memory-mapped cache both trainers read.

image folder (DIR/<class>/*.jpg) -> `scan_image_folder` (validate the layout and the class names)
-> `load_rgb` (decode with PIL within a memory bound, fix EXIF rotation and colour mode, resize + centre-crop once)
-> `load_or_build_cache` (uint8 N x 3 x H x W `.npy`, memory-mapped, keyed by listing + size; decoder threads
bounded by cores and available memory). File names reach log lines and errors escaped (`cli.printable`).
What happens to the cached images per step lives in scripts/lib/batches.py. This module needs no torch, so
the data-preparation commands stay light.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import struct
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from scripts.lib.cli import UserError, printable
from scripts.lib.host_memory import available_memory_bytes

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CACHE_DIR_NAME = ".tiny-cats-cache"
CACHE_FORMAT_VERSION = 1
LOGGER_NAME = "tiny_cats"
LAYOUT_HINT = ("expected layout DIR/<class>/*.jpg (one subfolder per class); for the built-in data run "
               "`python scripts/make_toy_cats.py --out DIR`")

# What PIL raises on broken files: truncated data (OSError/SyntaxError/EOFError), bad zlib streams, malformed
# headers (ValueError/struct.error), and huge images (DecompressionBombError, which is not an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError,
                  Image.DecompressionBombError)

LogFn = Callable[[str], object]

# iNaturalist 2021 (10,000 species) is the largest common labelled set; at this bound the biggest class table a
# checkpoint can ask for (a resnet50 head, 2048 x 10,000 floats) is 82 MB, where a claim of 1e9 would be 8 TB.
MAX_CLASSES = 10_000
# A class is a folder name, which common file systems cap at 255 characters.
MAX_CLASS_NAME_CHARS = 255


# ----------------------------------------------------------------------------------------------------------
# Listing the image folder
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageFolderListing:
    """The classes (sorted folder names) and image files (path, class index) found under `root`."""

    root: Path
    class_names: list[str]
    files: list[tuple[Path, int]]


def is_hidden_name(name: str) -> bool:
    """Folders like .ipynb_checkpoints, .tiny-cats-cache or __pycache__ are tool clutter, not classes."""
    return name.startswith((".", "__"))


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot name a class, or None. Class names are folder names that end up in checkpoint metadata,
    in log lines and in the file names sample.py writes, so the trainers and the loaders apply the same rule."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_CLASS_NAME_CHARS:
        return f"is not a name of 1 to {MAX_CLASS_NAME_CHARS} characters"
    if printable(name) != name:
        return "holds a control, line-break or text-direction character"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    return None


def scan_image_folder(root: str | Path) -> ImageFolderListing:
    """List DIR/<class>/<image>; raise a UserError that says what to fix when the layout is wrong."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data folder {printable(root)} does not exist — {LAYOUT_HINT}")
    if not root.is_dir():
        raise UserError(f"data path {printable(root)} is a file, not a folder — {LAYOUT_HINT}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden_name(p.name))
    if not class_dirs:
        raise UserError(f"data folder {printable(root)} has no class subfolders — {LAYOUT_HINT}")
    if len(class_dirs) > MAX_CLASSES:
        raise UserError(f"data folder {printable(root)} has {len(class_dirs)} class subfolders, more than the "
                        f"{MAX_CLASSES} a model of this kit can have — {LAYOUT_HINT}")
    for class_dir in class_dirs:
        problem = class_name_problem(class_dir.name)
        if problem:
            raise UserError(f"class folder {printable(class_dir)}: the name {problem} — rename the folder")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir()
                        if p.is_file() and not is_hidden_name(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(f"class folder {printable(class_dir)} has no image files ({extensions}) — "
                            f"add images or remove the folder")
        files.extend((path, label) for path in images)
    return ImageFolderListing(root=root, class_names=[d.name for d in class_dirs], files=files)


def refuse_foreign_classes(out: Path, allowed: Iterable[str]) -> None:
    """Stop before writing into a folder that already holds other classes: every subfolder of an
    ImageFolder is a class, so e.g. toy cats and Oxford breeds in one `data/cats` would silently mix."""
    if not out.is_dir():
        return
    allowed = set(allowed)
    foreign = sorted(
        p.name for p in out.iterdir() if p.is_dir() and not is_hidden_name(p.name) and p.name not in allowed
    )
    if foreign:
        raise UserError(
            f"{printable(out)} already holds other classes ({printable(', '.join(foreign[:6]))}) that would mix "
            "into this data set — remove them or choose another output folder"
        )


# ----------------------------------------------------------------------------------------------------------
# Decoding one image
# ----------------------------------------------------------------------------------------------------------

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
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


# Files between PIL's warning limit (89 MP) and its error limit are refused by MAX_DECODE_PIXELS with a reason in
# the skip list; PIL's warning would only say the same thing again, outside the log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _refuse_oversized(path: Path, image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_DECODE_PIXELS:
        raise UnreadableImage(path, f"{width} x {height} pixels is more than the {MAX_DECODE_PIXELS / 1e6:.0f} "
                                    "megapixels decoded here (save a smaller copy)")


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
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)


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


# ----------------------------------------------------------------------------------------------------------
# The uint8 cache
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageCache:
    """Decoded images (N, 3, H, W) uint8 (a read-only memmap when loaded from disk) and their labels."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    image_size: int
    skipped: list[str]
    path: Path | None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _as_log_fn(log: LogFn | logging.Logger | None) -> LogFn:
    if log is None:
        return logging.getLogger(LOGGER_NAME).warning
    if isinstance(log, logging.Logger):
        return log.warning
    return log


def _cache_key(listing: ImageFolderListing, image_size: int) -> str:
    """Changes whenever a file is added, removed, renamed, rewritten, or the image size changes."""
    entries = []
    for path, _ in listing.files:
        stat = path.stat()
        entries.append([path.relative_to(listing.root).as_posix(), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps({"version": CACHE_FORMAT_VERSION, "image_size": image_size, "files": entries})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _fallback_cache_dir(data_dir: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return base / "tiny-cats" / digest


def _candidate_cache_dirs(data_dir: Path, cache_dir: str | Path | None) -> list[Path]:
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    return [data_dir / CACHE_DIR_NAME, _fallback_cache_dir(data_dir)]


def _cache_files(directory: Path, image_size: int, key: str) -> tuple[Path, Path]:
    stem = f"{image_size}px-{key}"
    return directory / f"{stem}.npy", directory / f"{stem}.json"


def _read_cache(directory: Path, image_size: int, key: str) -> ImageCache | None:
    """The cache stored under `key`, or None when it is missing or does not match its metadata."""
    images_path, meta_path = _cache_files(directory, image_size, key)
    if not (images_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
        labels = np.asarray(meta["labels"], dtype=np.int64)
        class_names, skipped = list(meta["class_names"]), list(meta["skipped"])
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or hand-edited: rebuild it
        return None
    expected_shape = (len(labels), 3, image_size, image_size)
    if meta.get("key") != key or images.dtype != np.uint8 or images.shape != expected_shape:
        return None
    return ImageCache(images=images, labels=labels, class_names=class_names, image_size=image_size,
                      skipped=skipped, path=images_path)


def _writable_dir(candidates: Sequence[Path]) -> Path:
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise UserError(f"cannot create an image cache in any of {', '.join(map(printable, candidates))} — "
                    f"pass a writable --cache-dir")


def _decode_or_reason(path: Path, size: int) -> np.ndarray | str:
    """The CHW image, or why it could not be read (so one bad file does not stop a whole build)."""
    try:
        return load_rgb(path, size).transpose(2, 0, 1)
    except UnreadableImage as error:
        return error.reason


def decode_workers(num_files: int, available_bytes: int | None) -> int:
    """Decoder threads for a cache build: one per core (at most MAX_DECODE_WORKERS), but only as many as half the
    available memory holds at WORST_DECODE_BYTES each; one for a small build."""
    if num_files < 64:
        return 1
    # Unknown memory (no /proc, no sysconf figure): two decodes at the worst case, ~1.2 GB, fit any machine that
    # trains; the rest of the memory is the trainer's and other programs'.
    by_memory = 2 if available_bytes is None else available_bytes // 2 // WORST_DECODE_BYTES
    return max(1, min(MAX_DECODE_WORKERS, os.cpu_count() or 1, by_memory))


def _decoded_in_order(paths: Sequence[Path], size: int, workers: int) -> Iterator[np.ndarray | str]:
    """Decode in a thread pool (PIL releases the GIL while decoding and resizing), in bounded chunks."""
    if workers <= 1:
        yield from (_decode_or_reason(path, size) for path in paths)
        return
    chunk = 64 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), chunk):
            yield from pool.map(functools.partial(_decode_or_reason, size=size), paths[start:start + chunk])


def _temp_path(final: Path) -> Path:
    """A unique sibling name: ranks or runs building at the same time never write the same file."""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_images(final: Path, images: np.ndarray) -> None:
    temp = _temp_path(final)
    out = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8, shape=images.shape)
    for start in range(0, len(images), 4096):
        out[start:start + 4096] = images[start:start + 4096]
    out.flush()
    del out
    os.replace(temp, final)


def _build_cache(listing: ImageFolderListing, image_size: int, directory: Path, key: str, warn: LogFn,
                 show_progress: bool) -> ImageCache:
    images_path, meta_path = _cache_files(directory, image_size, key)
    paths = [path for path, _ in listing.files]
    scratch_path = _temp_path(images_path)
    scratch = np.lib.format.open_memmap(scratch_path, mode="w+", dtype=np.uint8,
                                        shape=(len(paths), 3, image_size, image_size))
    labels: list[int] = []
    skipped: list[str] = []
    workers = decode_workers(len(paths), available_memory_bytes())
    try:
        progress = tqdm(total=len(paths), desc=f"caching {image_size}px images", unit="img",
                        disable=not show_progress)
        with progress:
            for (path, label), result in zip(listing.files, _decoded_in_order(paths, image_size, workers),
                                                     strict=True):
                if isinstance(result, str):
                    skipped.append(f"{printable(path.relative_to(listing.root).as_posix())}: {printable(result)}")
                else:
                    scratch[len(labels)] = result
                    labels.append(label)
                progress.update()
        if skipped:
            warn(f"skipped {len(skipped)} unreadable image file(s) of {len(paths)} in {printable(listing.root)}: "
                 + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        if not labels:
            raise UserError(f"none of the {len(paths)} image files in {printable(listing.root)} could be read — "
                            f"check the files ({LAYOUT_HINT})")
        # Atomic: the .npy appears complete or not at all, and the .json (written last) marks it valid.
        if skipped:
            _write_images(images_path, scratch[:len(labels)])
        else:
            scratch.flush()
            os.replace(scratch_path, images_path)
    finally:
        del scratch
        scratch_path.unlink(missing_ok=True)
    meta = {"key": key, "version": CACHE_FORMAT_VERSION, "image_size": image_size, "root": str(listing.root),
            "class_names": listing.class_names, "skipped": skipped, "labels": labels}
    meta_temp = _temp_path(meta_path)
    meta_temp.write_text(json.dumps(meta))
    os.replace(meta_temp, meta_path)
    _remove_stale_caches(directory, image_size, keep=key)
    cache = _read_cache(directory, image_size, key)
    assert cache is not None, "a cache just written must read back"
    return cache


def _remove_stale_caches(directory: Path, image_size: int, keep: str) -> None:
    """Old caches of the same size are dead weight once the listing changed (other sizes stay)."""
    for path in directory.glob(f"{image_size}px-*"):
        if keep not in path.name:
            path.unlink(missing_ok=True)


def load_or_build_cache(data_dir: str | Path, image_size: int, cache_dir: str | Path | None = None,
                        log: LogFn | logging.Logger | None = None, show_progress: bool = True) -> ImageCache:
    """The uint8 cache of `data_dir` at `image_size`, reused when the listing is unchanged, else rebuilt.

    Default location `<data_dir>/.tiny-cats-cache/`, or `~/.cache/tiny-cats/<hash>` when the data folder is
    read-only. Safe under DDP: build on the main process first, then call on the others (they find it).
    """
    if image_size < 1:
        raise UserError(f"image size must be positive, got {image_size}")
    listing = scan_image_folder(data_dir)
    key = _cache_key(listing, image_size)
    candidates = _candidate_cache_dirs(listing.root, cache_dir)
    for directory in candidates:
        cache = _read_cache(directory, image_size, key)
        if cache is not None:
            return cache
    return _build_cache(listing, image_size, _writable_dir(candidates), key, _as_log_fn(log), show_progress)


def synthetic_cache(num_images: int, image_size: int, num_classes: int = 2, seed: int = 0) -> ImageCache:
    """An in-memory cache of random images, for benchmarks and tests that need no files."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_images, 3, image_size, image_size), dtype=np.uint8)
    labels = np.arange(num_images, dtype=np.int64) % num_classes
    return ImageCache(images=images, labels=labels, class_names=[f"class_{i}" for i in range(num_classes)],
                      image_size=image_size, skipped=[], path=None)
