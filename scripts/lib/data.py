"""Image folders in, batches out: listing, safe decoding, the uint8 cache, the batch order and augmentation."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import struct
import unicodedata
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from scripts.lib.cli import LOGGER_NAME, name_problem, UserError, printable

# ====================================================================================================
# Image folders in, a uint8 cache out: listing, decoding and the memory-mapped cache both trainers read.
# ====================================================================================================


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


CACHE_DIR_NAME = ".tiny-cats-cache"


CACHE_FORMAT_VERSION = 1


LAYOUT_HINT = (
    "expected layout DIR/<class>/*.jpg (one subfolder per class); for the built-in data run "
    "`python scripts/make_toy_cats.py --out DIR`"
)


LogFn = Callable[[str], object]


# iNaturalist 2021 (10,000 species) is the largest common labelled set; at this bound the biggest class table a
# checkpoint can ask for (a resnet50 head, 2048 x 10,000 floats) is 82 MB, where a claim of 1e9 would be 8 TB.
MAX_CLASSES = 10_000


# A class is a folder name, which common file systems cap at 255 characters.
MAX_CLASS_NAME_CHARS = 255


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
    """Why `name` cannot name a class, or None: class names are folder names that reach checkpoint metadata, log
    lines and the file names sample.py writes, so the trainers and the loaders apply the same rule."""
    return name_problem(name)


def class_names_problem(names: list[str]) -> str | None:
    """Why these names cannot be one data set's classes (the first reason), or None. Two spellings of one name
    (NFC "café" and NFD "café") print identically, so they are one class name twice, not two classes."""
    seen: dict[str, str] = {}
    for name in names:
        problem = name_problem(name)
        if problem:
            return f"'{printable(name)}': the name {problem}"
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            return f"'{printable(seen[key])}' and '{printable(name)}' are one name in two Unicode spellings"
        seen[key] = name
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
        raise UserError(
            f"data folder {printable(root)} has {len(class_dirs)} class subfolders, more than the "
            f"{MAX_CLASSES} a model of this kit can have — {LAYOUT_HINT}"
        )
    problem = class_names_problem([class_dir.name for class_dir in class_dirs])
    if problem:
        raise UserError(f"class folders of {printable(root)}: {problem} — rename the folder")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not is_hidden_name(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(
                f"class folder {printable(class_dir)} has no image files ({extensions}) — "
                f"add images or remove the folder"
            )
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
    return ImageCache(
        images=images, labels=labels, class_names=class_names, image_size=image_size, skipped=skipped, path=images_path
    )


def _writable_dir(candidates: Sequence[Path]) -> Path:
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise UserError(
        f"cannot create an image cache in any of {', '.join(map(printable, candidates))} — pass a writable --cache-dir"
    )


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
            yield from pool.map(functools.partial(_decode_or_reason, size=size), paths[start : start + chunk])


def _temp_path(final: Path) -> Path:
    """A unique sibling name: ranks or runs building at the same time never write the same file."""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_images(final: Path, images: np.ndarray) -> None:
    temp = _temp_path(final)
    out = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8, shape=images.shape)
    for start in range(0, len(images), 4096):
        out[start : start + 4096] = images[start : start + 4096]
    out.flush()
    del out
    os.replace(temp, final)


def _build_cache(
    listing: ImageFolderListing, image_size: int, directory: Path, key: str, warn: LogFn, show_progress: bool
) -> ImageCache:
    images_path, meta_path = _cache_files(directory, image_size, key)
    paths = [path for path, _ in listing.files]
    scratch_path = _temp_path(images_path)
    scratch = np.lib.format.open_memmap(
        scratch_path, mode="w+", dtype=np.uint8, shape=(len(paths), 3, image_size, image_size)
    )
    labels: list[int] = []
    skipped: list[str] = []
    workers = decode_workers(len(paths), available_memory_bytes())
    try:
        progress = tqdm(total=len(paths), desc=f"caching {image_size}px images", unit="img", disable=not show_progress)
        with progress:
            for (path, label), result in zip(listing.files, _decoded_in_order(paths, image_size, workers), strict=True):
                if isinstance(result, str):
                    skipped.append(f"{printable(path.relative_to(listing.root).as_posix())}: {printable(result)}")
                else:
                    scratch[len(labels)] = result
                    labels.append(label)
                progress.update()
        if skipped:
            warn(
                f"skipped {len(skipped)} unreadable image file(s) of {len(paths)} in {printable(listing.root)}: "
                + "; ".join(skipped[:5])
                + (" ..." if len(skipped) > 5 else "")
            )
        if not labels:
            raise UserError(
                f"none of the {len(paths)} image files in {printable(listing.root)} could be read — "
                f"check the files ({LAYOUT_HINT})"
            )
        # Atomic: the .npy appears complete or not at all, and the .json (written last) marks it valid.
        if skipped:
            _write_images(images_path, scratch[: len(labels)])
        else:
            scratch.flush()
            os.replace(scratch_path, images_path)
    finally:
        del scratch
        scratch_path.unlink(missing_ok=True)
    meta = {
        "key": key,
        "version": CACHE_FORMAT_VERSION,
        "image_size": image_size,
        "root": str(listing.root),
        "class_names": listing.class_names,
        "skipped": skipped,
        "labels": labels,
    }
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


def load_or_build_cache(
    data_dir: str | Path,
    image_size: int,
    cache_dir: str | Path | None = None,
    log: LogFn | logging.Logger | None = None,
    show_progress: bool = True,
) -> ImageCache:
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
    return ImageCache(
        images=images,
        labels=labels,
        class_names=[f"class_{i}" for i in range(num_classes)],
        image_size=image_size,
        skipped=[],
        path=None,
    )


# ====================================================================================================
# Decoding one image file safely: PIL with a memory bound, EXIF orientation, any colour mode to 8-bit RGB,
# ====================================================================================================


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


# ====================================================================================================
# Host memory: how much is still available, and keeping freed memory for reuse.
# ====================================================================================================


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Host memory this process could still take without swapping, or None where nothing tells.

    Linux: MemAvailable, lowered to what is left under a cgroup v2 memory limit (containers, Modal), since the
    kernel's figure is the whole machine's. Elsewhere: the free physical pages sysconf reports, if any.
    """
    available = _meminfo_available(meminfo)
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # unknown name (macOS has no SC_AVPHYS_PAGES) or no sysconf
            available = None
    left_in_cgroup = _cgroup_headroom(cgroup)
    if left_in_cgroup is not None:
        available = left_in_cgroup if available is None else min(available, left_in_cgroup)
    return available


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(cgroup: Path) -> int | None:
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


# ====================================================================================================
# Batches from the image cache: the split, the order, augmentation, all pure functions of (seed, step).
# ====================================================================================================


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), sorted; each class with >= 2 images lands in both when val_fraction > 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_val = round(len(members) * val_fraction)
        if val_fraction > 0 and len(members) >= 2:
            num_val = min(max(num_val, 1), len(members) - 1)
        val.append(members[:num_val])
        train.append(members[num_val:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate([empty, *train])).astype(np.int64),
        np.sort(np.concatenate([empty, *val])).astype(np.int64),
    )


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    order.flags.writeable = False  # shared through the LRU cache
    return order


def global_batch_indices(
    num_items: int, global_batch: int, step: int, seed: int, pool: np.ndarray | None = None
) -> np.ndarray:
    """Dataset indices of global batch `step`: items [step*B, (step+1)*B) of the endless stream made of one
    permutation per epoch (epoch e from `default_rng([seed, e])`). `pool` maps stream items to dataset
    indices (e.g. the classifier's train_idx; then num_items == len(pool))."""
    if num_items < 1:
        raise UserError("no training images to draw batches from — check the data folder and split")
    if global_batch < 1:
        raise UserError(f"batch size must be positive, got {global_batch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if pool is not None and len(pool) != num_items:
        raise ValueError(f"pool has {len(pool)} items but num_items is {num_items}")
    start, stop = step * global_batch, (step + 1) * global_batch
    parts = []
    for epoch in range(start // num_items, (stop - 1) // num_items + 1):
        epoch_start = epoch * num_items
        order = _epoch_permutation(num_items, seed, epoch)
        parts.append(order[max(start - epoch_start, 0) : min(stop - epoch_start, num_items)])
    positions = np.concatenate(parts)
    return np.asarray(pool)[positions] if pool is not None else positions


def shard_bounds(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of a global batch; the batch must split evenly across processes."""
    if global_batch % world_size != 0:
        raise UserError(
            f"global batch size {global_batch} is not divisible by the {world_size} processes — "
            f"choose a batch size that is a multiple of {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per_rank = global_batch // world_size
    return rank * per_rank, (rank + 1) * per_rank


# none: for data whose orientation is the class (glyphs, text, digits): a mirrored "b" is a "d".
AUGMENTATION_LEVELS = ("none", "basic", "medium", "full")


# Crops keep at least this fraction of the side: tiny images lose the cat if cropped harder.
MIN_CROP_SIDE = 0.8


# Mild colour jitter only, and no hue change: coat colour is what the classes are about.
COLOUR_JITTER = 0.15


_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass
class AugmentationParams:
    """Per-sample random parameters of one batch. `crops`/`colour` say whether those stages run at all."""

    flip: torch.Tensor  # (B,) bool: mirror left-right
    crop_side: torch.Tensor  # (B,) fraction of the image side kept (1 = no crop)
    crop_shift: torch.Tensor  # (B, 2) crop centre x, y in [-1, 1] image coordinates
    brightness: torch.Tensor  # (B,) multiplicative factors, 1 = unchanged
    contrast: torch.Tensor
    saturation: torch.Tensor
    crops: bool = False
    colour: bool = False

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AugmentationParams:
        tensors = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **tensors)

    def __len__(self) -> int:
        return len(self.flip)

    def slice(self, start: int, stop: int) -> AugmentationParams:
        """The parameters of samples [start, stop), e.g. one rank's part of the global batch."""
        return self._map(lambda t: t[start:stop])

    def to(self, device: torch.device | str) -> AugmentationParams:
        return self._map(lambda t: t.to(device))


def identity_augmentation(batch_size: int, device: torch.device | str = "cpu") -> AugmentationParams:
    """Parameters that change nothing (the starting point that each level randomises further)."""
    ones = torch.ones(batch_size, device=device)
    return AugmentationParams(
        flip=torch.zeros(batch_size, dtype=torch.bool, device=device),
        crop_side=ones,
        crop_shift=torch.zeros(batch_size, 2, device=device),
        brightness=ones,
        contrast=ones,
        saturation=ones,
    )


def draw_augmentation(level: str, batch_size: int, image_size: int, generator: torch.Generator) -> AugmentationParams:
    """Draw every random parameter of one GLOBAL batch on the generator's device.

    none: nothing (no random numbers drawn). basic: horizontal flips. medium: + a random square crop keeping
    80-100% of the side, anywhere inside the image. full: + brightness/contrast/saturation factors in
    [0.85, 1.15].
    """
    if level not in AUGMENTATION_LEVELS:
        choices = ", ".join(AUGMENTATION_LEVELS)
        raise UserError(f"unknown augmentation level {level!r} — choose one of {choices}")
    device = generator.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    params = identity_augmentation(batch_size, device)
    if level == "none":
        return params
    params.flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
    if level in ("medium", "full"):
        # Whole pixels at least: a crop smaller than one pixel would only blur the image.
        min_side = min(MIN_CROP_SIDE, 1.0 - 1.0 / image_size)
        params.crop_side = uniform(min_side, 1.0, batch_size)
        params.crop_shift = uniform(-1.0, 1.0, batch_size, 2) * (1.0 - params.crop_side)[:, None]
        params.crops = True
    if level == "full":
        params.brightness, params.contrast, params.saturation = (
            uniform(1 - COLOUR_JITTER, 1 + COLOUR_JITTER, batch_size) for _ in range(3)
        )
        params.colour = True
    return params


def to_unit_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1], for evaluation (no augmentation)."""
    return images_uint8.to(torch.float32).div_(255.0)


def _crop_grid(params: AugmentationParams, height: int, width: int) -> torch.Tensor:
    """The (B, H, W, 2) `grid_sample` grid of each sample's crop, mirrored where `flip` is set.

    Crops are axis-aligned, so the grid is an outer combination of one x row and one y column per sample
    (much cheaper than `affine_grid`'s general matrix product).
    """
    device = params.crop_side.device

    def pixel_centres(n: int) -> torch.Tensor:  # in [-1, 1], as align_corners=False expects
        return (torch.arange(n, device=device, dtype=torch.float32) * 2 + 1) / n - 1

    mirror = 1.0 - 2.0 * params.flip.float()
    grid_x = (params.crop_side * mirror)[:, None] * pixel_centres(width) + params.crop_shift[:, 0:1]
    grid_y = params.crop_side[:, None] * pixel_centres(height) + params.crop_shift[:, 1:2]
    return torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)


def _crop_and_flip(images: torch.Tensor, params: AugmentationParams) -> torch.Tensor:
    """Per-sample crop (+ flip) resized back to full size in one batched bilinear `grid_sample`."""
    grid = _crop_grid(params, images.shape[2], images.shape[3])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _jitter_colour(images: torch.Tensor, params: AugmentationParams) -> torch.Tensor:
    """torchvision's brightness -> contrast -> saturation, per sample, folded into one affine map.

    With b, c, s the factors, L the luma and m its image mean, the chain equals
    c*b*(s*x + (1-s)*L) + (1-c)*b*m; it differs from torchvision only by skipping the clamps in between.
    """
    # A plain weighted channel sum: a 1x1 conv2d does the same ~20x slower on CPU.
    luma = sum(weight * images[:, channel : channel + 1] for channel, weight in enumerate(_LUMA))
    brightness, contrast, saturation = (
        f.view(-1, 1, 1, 1) for f in (params.brightness, params.contrast, params.saturation)
    )
    shift = (1 - contrast) * brightness * luma.mean((2, 3), keepdim=True)
    return torch.lerp(luma, images, saturation).mul_(contrast * brightness).add_(shift).clamp_(0, 1)


def apply_augmentation(images_uint8: torch.Tensor, params: AugmentationParams) -> torch.Tensor:
    """Augment a uint8 (B, 3, H, W) batch on its device; float32 in [0, 1]."""
    if len(params) != images_uint8.shape[0]:
        raise ValueError(f"{len(params)} augmentation parameter sets for a batch of {images_uint8.shape[0]}")
    params = params.to(images_uint8.device)
    if params.crops:
        images = _crop_and_flip(to_unit_float(images_uint8), params).clamp_(0, 1)
    else:
        flipped = torch.where(params.flip.view(-1, 1, 1, 1), images_uint8.flip(-1), images_uint8)
        images = to_unit_float(flipped)
    if params.colour:
        images = _jitter_colour(images, params)
    return images


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of optimizer step `step` (and of `rank`'s own randomness): a pure function of them, so a resumed run,
    or one on another number of processes, draws the same numbers."""
    return (((seed * 1_000_003 + step) << 16) + rank) % (1 << 63)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of everything random about step `step` that is drawn for the whole global batch."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


def gather_batch(images: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Rows `indices` of the (memory-mapped) image array as a uint8 tensor, read in file order."""
    order = np.argsort(indices, kind="stable")
    rows = images[indices[order]]
    unsorted = np.empty_like(rows)
    unsorted[order] = rows
    return torch.from_numpy(unsorted)


# The image cache moves onto the GPU when it takes at most this share of the free GPU memory: a toy or
# Oxford-size set is tens of MB, and every step then gathers its batch there, with no host round trip.
DEVICE_CACHE_MAX_FREE_FRACTION = 0.25


PLACEMENTS = ("auto", "device", "host")


class ImageSource:
    """The cached images and labels, placed where the training device gathers batches from them cheapest.

    device: the whole uint8 array on the training device (auto: on a GPU, when it fits in a quarter of the free
    memory); a batch is one index_select there. host: the memory-mapped array; a batch is gathered on the host
    and, for a GPU, copied from pinned memory without blocking while the next one is gathered in the background.
    Both placements give bitwise the same batches.
    """

    def __init__(
        self, cache: ImageCache, device: torch.device | str, placement: str = "auto", background: bool | None = None
    ):
        """`background`: gather host batches ahead in a thread (default: on a GPU, where the host is idle)."""
        self.device = torch.device(device)
        self.image_size = cache.image_size
        self.num_images = len(cache)
        if placement == "auto":
            placement = "device" if self.device.type == "cuda" and _fits_on_gpu(cache, self.device) else "host"
        self.placement = placement
        self._pin = self.device.type == "cuda"
        if placement == "device":
            self.images = torch.from_numpy(np.ascontiguousarray(cache.images)).to(self.device)
            self.labels = torch.from_numpy(np.asarray(cache.labels, dtype=np.int64)).to(self.device)
        else:
            self.images, self.labels = cache.images, np.asarray(cache.labels, dtype=np.int64)
        if background is None:
            background = self._pin
        self._background = ThreadPoolExecutor(max_workers=1) if placement == "host" and background else None
        self._prefetched: tuple[np.ndarray, Future] | None = None

    def _to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        if self._pin:  # a copy from pageable memory would wait for the GPU to finish its queue
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _gather_on_host(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = gather_batch(self.images, indices), torch.from_numpy(self.labels[indices])
        return (images.pin_memory(), labels.pin_memory()) if self._pin else (images, labels)

    def prefetch(self, indices: np.ndarray) -> None:
        """Start gathering the batch `indices` in the background (host placement on a GPU; else a no-op)."""
        if self._background is not None:
            self._prefetched = (indices, self._background.submit(self._gather_on_host, indices))

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (B, 3, H, W), int64 labels (B,)) of dataset rows `indices`, on the training device."""
        if self.placement == "device":
            rows = self._to_device(np.ascontiguousarray(indices, dtype=np.int64))
            return self.images.index_select(0, rows), self.labels.index_select(0, rows)
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and np.array_equal(prefetched[0], indices):
            images, labels = prefetched[1].result()
        else:
            images, labels = self._gather_on_host(indices)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _fits_on_gpu(cache: ImageCache, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return cache.images.nbytes <= DEVICE_CACHE_MAX_FREE_FRACTION * free


def training_batch(
    source: ImageSource,
    global_batch: int,
    step: int,
    seed: int,
    level: str,
    rank: int = 0,
    world_size: int = 1,
    pool: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (augmented images float32 [0, 1], labels int64) of global batch `step`, on the source's device.

    Indices and augmentation are drawn for the whole global batch and then sliced, so 1 and N processes
    train on identical samples, and a resumed run continues exactly.
    """
    num_items = len(pool) if pool is not None else source.num_images
    indices = global_batch_indices(num_items, global_batch, step, seed, pool=pool)
    start, stop = shard_bounds(global_batch, rank, world_size)
    images, labels = source.gather(indices[start:stop])
    params = draw_augmentation(level, global_batch, source.image_size, step_generator(seed, step, source.device))
    return apply_augmentation(images, params.slice(start, stop)), labels
