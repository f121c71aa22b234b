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
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scripts.lib.cli import UserError, printable
from scripts.lib.decoding import (
    MAX_DECODE_WORKERS,
    WORST_DECODE_BYTES,
    UnreadableImage,
    load_rgb,
)
from scripts.lib.host_memory import available_memory_bytes

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CACHE_DIR_NAME = ".tiny-cats-cache"
CACHE_FORMAT_VERSION = 1
LOGGER_NAME = "tiny_cats"
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
        raise UserError(
            f"data folder {printable(root)} has {len(class_dirs)} class subfolders, more than the "
            f"{MAX_CLASSES} a model of this kit can have — {LAYOUT_HINT}"
        )
    for class_dir in class_dirs:
        problem = class_name_problem(class_dir.name)
        if problem:
            raise UserError(f"class folder {printable(class_dir)}: the name {problem} — rename the folder")
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
