"""The data pipeline shared by both trainers, the evaluation and the benchmark.

image folder (DIR/<class>/*.jpg) -> `scan_image_folder` (validate the layout)
-> `load_rgb` (decode with PIL, fix EXIF rotation and colour mode, resize + centre-crop once)
-> `load_or_build_cache` (uint8 N x 3 x H x W `.npy`, memory-mapped, keyed by listing + size)
-> `global_batch_indices` / `shard` (a pure function of (seed, step): resumable, same samples on 1 or N ranks)
-> `draw_augmentation` / `apply_augmentation` (batched, on the training device) -> model.
`training_batch` strings the last three together. No per-sample PIL work happens in the training loop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from scripts.cli import UserError
from scripts.runtime import synchronize

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


def scan_image_folder(root: str | Path) -> ImageFolderListing:
    """List DIR/<class>/<image>; raise a UserError that says what to fix when the layout is wrong."""
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"data folder {root} does not exist — {LAYOUT_HINT}")
    if not root.is_dir():
        raise UserError(f"data path {root} is a file, not a folder — {LAYOUT_HINT}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden_name(p.name))
    if not class_dirs:
        raise UserError(f"data folder {root} has no class subfolders — {LAYOUT_HINT}")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir()
                        if p.is_file() and not is_hidden_name(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UserError(f"class folder {class_dir} has no image files ({extensions}) — "
                            f"add images or remove the folder")
        files.extend((path, label) for path in images)
    return ImageFolderListing(root=root, class_names=[d.name for d in class_dirs], files=files)


# ----------------------------------------------------------------------------------------------------------
# Decoding one image
# ----------------------------------------------------------------------------------------------------------

class UnreadableImage(UserError):
    """An image file that cannot be decoded (empty, truncated, not an image, too large, odd colour mode)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read image {path}: {reason} — replace or delete the file")
        self.path = Path(path)
        self.reason = reason


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white (not the black that a plain RGBA->RGB convert would give)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without clipping high-bit-depth images to white."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if has_alpha or (image.mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    if image.mode.startswith("I;16"):
        eight_bit = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode == "I":
        # 32-bit integer images from PIL are almost always 16-bit sources; values above 255 say so.
        values = np.asarray(image, dtype=np.int64)
        if values.max(initial=0) > 255:
            values = values >> 8
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` and cut the centre square, in one antialiased resize."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode `path` to a (size, size, 3) uint8 array: upright, RGB, shorter side resized, centre-cropped."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage(path, "the file is empty (0 bytes)")
        with Image.open(path) as image:
            # JPEG can decode at 1/2..1/8 scale directly; keeps both sides >= size, so quality is kept.
            image.draft(image.mode, (size, size))
            image.load()
            upright = ImageOps.exif_transpose(image)
            rgb = _to_rgb(upright)
            return np.asarray(_resize_center_crop(rgb, size), dtype=np.uint8)
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
    raise UserError(f"cannot create an image cache in any of {', '.join(map(str, candidates))} — "
                    f"pass a writable --cache-dir")


def _decode_or_reason(path: Path, size: int) -> np.ndarray | str:
    """The CHW image, or why it could not be read (so one bad file does not stop a whole build)."""
    try:
        return load_rgb(path, size).transpose(2, 0, 1)
    except UnreadableImage as error:
        return error.reason


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
    workers = min(8, os.cpu_count() or 1) if len(paths) >= 64 else 1
    try:
        progress = tqdm(total=len(paths), desc=f"caching {image_size}px images", unit="img",
                        disable=not show_progress)
        with progress:
            for (path, label), result in zip(listing.files, _decoded_in_order(paths, image_size, workers),
                                                     strict=True):
                if isinstance(result, str):
                    skipped.append(f"{path.relative_to(listing.root).as_posix()}: {result}")
                else:
                    scratch[len(labels)] = result
                    labels.append(label)
                progress.update()
        if skipped:
            warn(f"skipped {len(skipped)} unreadable image file(s) of {len(paths)} in {listing.root}: "
                 + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        if not labels:
            raise UserError(f"none of the {len(paths)} image files in {listing.root} could be read — "
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


# ----------------------------------------------------------------------------------------------------------
# Splits and the batch order: pure functions of (seed, step), so resumed and multi-process runs agree
# ----------------------------------------------------------------------------------------------------------

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
    return (np.sort(np.concatenate([empty, *train])).astype(np.int64),
            np.sort(np.concatenate([empty, *val])).astype(np.int64))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    order.flags.writeable = False  # shared through the LRU cache
    return order


def global_batch_indices(num_items: int, global_batch: int, step: int, seed: int,
                         pool: np.ndarray | None = None) -> np.ndarray:
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
        parts.append(order[max(start - epoch_start, 0):min(stop - epoch_start, num_items)])
    positions = np.concatenate(parts)
    return np.asarray(pool)[positions] if pool is not None else positions


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous slice of a global batch that process `rank` of `world_size` trains on."""
    start, stop = shard_bounds(len(indices), rank, world_size)
    return indices[start:stop]


def shard_bounds(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of a global batch; the batch must split evenly across processes."""
    if global_batch % world_size != 0:
        raise UserError(f"global batch size {global_batch} is not divisible by the {world_size} processes — "
                        f"choose a batch size that is a multiple of {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    per_rank = global_batch // world_size
    return rank * per_rank, (rank + 1) * per_rank


def epoch_of_step(step: int, global_batch: int, num_items: int) -> int:
    """The epoch that the first item of global batch `step` belongs to."""
    return step * global_batch // num_items


def steps_for_epochs(epochs: float, global_batch: int, num_items: int) -> int:
    """Optimizer steps that show every item `epochs` times (the last batch may straddle into the next)."""
    return max(1, math.ceil(epochs * num_items / global_batch))


# ----------------------------------------------------------------------------------------------------------
# Augmentation on batch tensors, on the training device
# ----------------------------------------------------------------------------------------------------------

AUGMENTATION_LEVELS = ("basic", "medium", "full")
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
        tensors = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
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
    return AugmentationParams(flip=torch.zeros(batch_size, dtype=torch.bool, device=device),
                              crop_side=ones, crop_shift=torch.zeros(batch_size, 2, device=device),
                              brightness=ones, contrast=ones, saturation=ones)


def draw_augmentation(level: str, batch_size: int, image_size: int,
                      generator: torch.Generator) -> AugmentationParams:
    """Draw every random parameter of one GLOBAL batch on the generator's device.

    basic: horizontal flips. medium: + a random square crop keeping 80-100% of the side, anywhere inside
    the image. full: + brightness/contrast/saturation factors in [0.85, 1.15].
    """
    if level not in AUGMENTATION_LEVELS:
        choices = ", ".join(AUGMENTATION_LEVELS)
        raise UserError(f"unknown augmentation level {level!r} — choose one of {choices}")
    device = generator.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    params = identity_augmentation(batch_size, device)
    params.flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
    if level in ("medium", "full"):
        # Whole pixels at least: a crop smaller than one pixel would only blur the image.
        min_side = min(MIN_CROP_SIDE, 1.0 - 1.0 / image_size)
        params.crop_side = uniform(min_side, 1.0, batch_size)
        params.crop_shift = uniform(-1.0, 1.0, batch_size, 2) * (1.0 - params.crop_side)[:, None]
        params.crops = True
    if level == "full":
        params.brightness, params.contrast, params.saturation = (
            uniform(1 - COLOUR_JITTER, 1 + COLOUR_JITTER, batch_size) for _ in range(3))
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
    luma = sum(weight * images[:, channel:channel + 1] for channel, weight in enumerate(_LUMA))
    brightness, contrast, saturation = (f.view(-1, 1, 1, 1) for f in (params.brightness, params.contrast,
                                                                      params.saturation))
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


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from (seed, step) only, so a resumed run draws the same augmentations."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (1 << 63))
    return generator


# ----------------------------------------------------------------------------------------------------------
# The batch stream
# ----------------------------------------------------------------------------------------------------------

def gather_batch(images: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Rows `indices` of the (memory-mapped) image array as a uint8 tensor, read in file order."""
    order = np.argsort(indices, kind="stable")
    rows = images[indices[order]]
    unsorted = np.empty_like(rows)
    unsorted[order] = rows
    return torch.from_numpy(unsorted)


def training_batch(cache: ImageCache, global_batch: int, step: int, seed: int, level: str,
                   device: torch.device | str, rank: int = 0, world_size: int = 1,
                   pool: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (augmented images float32 [0, 1], labels int64) of global batch `step`, on `device`.

    Indices and augmentation are drawn for the whole global batch and then sliced, so 1 and N processes
    train on identical samples, and a resumed run continues exactly.
    """
    num_items = len(pool) if pool is not None else len(cache)
    indices = global_batch_indices(num_items, global_batch, step, seed, pool=pool)
    start, stop = shard_bounds(global_batch, rank, world_size)
    local = indices[start:stop]
    images = gather_batch(cache.images, local).to(device, non_blocking=True)
    labels = torch.from_numpy(cache.labels[local]).to(device, non_blocking=True)
    params = draw_augmentation(level, global_batch, cache.image_size, step_generator(seed, step, device))
    return apply_augmentation(images, params.slice(start, stop)), labels


def measure_pipeline_throughput(cache: ImageCache, batch_size: int, level: str, steps: int,
                                device: torch.device | str = "cpu") -> float:
    """Images per second of the cached + augmented batch stream (indices -> gather -> augment)."""
    device = torch.device(device)

    training_batch(cache, batch_size, 0, seed=0, level=level, device=device)  # warm-up: allocations, kernels
    synchronize(device)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        training_batch(cache, batch_size, step, seed=0, level=level, device=device)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)
