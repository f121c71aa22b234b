"""Image folders in, batches out, as pure functions of (seed, step) so resumed and multi-process runs agree.

DIR/<class>/*.jpg -> `scan_image_folder` (the layout and class names checked) -> `load_rgb` (PIL within a memory
bound, EXIF rotation, any colour mode to RGB, resized and centre-cropped once) -> `load_or_build_cache` (uint8
N x 3 x H x W `.npy`, memory-mapped, keyed by the listing and the size; an unreadable file is skipped with a counted
warning) -> `global_batch_indices` (one permutation per epoch, seeded by (seed, epoch)) -> each rank's slice
(`shard_bounds`) -> `ImageSource.gather` (on the training device) -> `draw_augmentation` / `apply_augmentation`
(batched, on the device). File names reach log lines escaped (`cli.printable`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from scripts.lib.cli import IMAGE_EXTENSIONS, LOGGER_NAME, UserError, check_class_names, class_folders, is_hidden_name
from scripts.lib.cli import printable, write_atomic

CACHE_DIR_NAME, CACHE_FORMAT_VERSION = ".tiny-cats-cache", 2
# iNaturalist 2021 (10,000 species) is the largest common labelled set; at this bound the largest class table a
# checkpoint can ask for (a resnet50 head) is 82 MB, where a claim of 1e9 classes would be 8 TB.
MAX_CLASSES = 10_000
LAYOUT_HINT = (
    "expected layout DIR/<class>/*.jpg (one subfolder per class); for the built-in data run "
    "`python scripts/make_toy_cats.py --out DIR`"
)


# --- The image folder --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageFolderListing:
    """The classes (sorted folder names) and image files (path, class index) found under `root`."""

    root: Path
    class_names: list[str]
    files: list[tuple[Path, int]]


def scan_image_folder(root: str | Path) -> ImageFolderListing:
    """List DIR/<class>/<image>; a UserError that says what to fix when the layout is wrong."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "path {} is a file, not a folder" if root.exists() else "folder {} does not exist"
        raise UserError(f"data {what.format(printable(root))} — {LAYOUT_HINT}")
    class_dirs = class_folders(root)
    if not class_dirs or len(class_dirs) > MAX_CLASSES:
        many = f"{len(class_dirs)} class subfolders, more than the {MAX_CLASSES} a model of this kit can have"
        has = many if class_dirs else "no class subfolders"
        raise UserError(f"data folder {printable(root)} has {has} — {LAYOUT_HINT}")
    check_class_names(root, [class_dir.name for class_dir in class_dirs])
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        found = [p for p in class_dir.iterdir() if p.is_file() and not is_hidden_name(p.name)]
        images = sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise UserError(f"class folder {printable(class_dir)} has no image files "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) — add images or remove the folder")  # fmt: skip
        files += [(path, label) for path in images]
    return ImageFolderListing(root, [d.name for d in class_dirs], files)


# --- Decoding one file: bounded in memory, upright, RGB, resized and centre-cropped ------------------------------
class UnreadableImage(UserError):
    """An image file that cannot be decoded (empty, truncated, not an image, too large, odd colour mode)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read image {printable(path)}: {printable(reason)} — replace or delete the file")
        self.path, self.reason = Path(path), reason


# What PIL raises on broken files: truncated data, bad zlib streams, malformed headers, and huge images
# (DecompressionBombError is no OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError,
                  Image.DecompressionBombError)  # fmt: skip
# Images are decoded whole, so their size is checked first (Image.open reads the header only): every camera up to
# 61 MP fits, and a larger JPEG is decoded at 1/2..1/8 scale (draft) first. PIL's own bomb limit (179 MP) let a 329 KB
# 16-bit PNG of 13000 x 13000 through, which took predict to 2.9 GB.
MAX_DECODE_PIXELS = 8192 * 8192
# Worst host memory per decoded pixel, measured as peak-RSS growth over 16 MP images: a palette image with
# transparency 9 (1 byte, expanded to RGBA, premultiplied for the resize), RGBA 8, 16-bit 6, RGB 4, grey 1.
DECODE_BYTES_PER_PIXEL = 9
WORST_DECODE_BYTES = MAX_DECODE_PIXELS * DECODE_BYTES_PER_PIXEL  # ~0.6 GB: how many decodes may run at once
MAX_DECODE_WORKERS = 8  # PIL releases the GIL: up to one thread per core, never more than this
# EXIF Orientation (0x0112) -> the transpose that shows the image upright.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # fmt: skip
# Modes whose bicubic resize means what it should (alpha is premultiplied by resize itself): 16-bit images cannot be
# resized, palette and 1-bit ones only nearest-neighbour, and in CMYK, LAB or HSV the mixing is not linear.
_RESAMPLED_AS_IS = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})
# Files between PIL's warning limit and MAX_DECODE_PIXELS are refused with a reason in the skip list instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _resizable(image: Image.Image) -> Image.Image:
    """The decoded image in a mode that resizes well, converted (one full-size copy) only where it must be."""
    if image.mode in _RESAMPLED_AS_IS:
        return image
    if image.mode.startswith("I;16") or image.mode == "1":
        return image.convert("I" if image.mode != "1" else "L")
    has_alpha = image.mode in ("PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if has_alpha else "RGB")


def _to_rgb(image: Image.Image, sixteen_bit: bool) -> Image.Image:
    """The resized image as 8-bit RGB: transparency onto white (not black), 16-bit scaled, not clipped to white."""
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode == "I":
        values = np.asarray(image, dtype=np.int64) >> (8 if sixteen_bit else 0)
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode `path` to a (size, size, 3) uint8 array: upright, RGB, shorter side resized, centre-cropped. At most
    MAX_DECODE_PIXELS are decoded, and every conversion but one happens after the resize, so one decode needs at most
    WORST_DECODE_BYTES."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage(path, "the file is empty (0 bytes)")
        with Image.open(path) as image:
            image.draft(image.mode, (size, size))  # JPEG: decode at 1/2..1/8 scale, both sides still >= size
            width, height = image.size
            if width * height > MAX_DECODE_PIXELS:
                limit = f"{MAX_DECODE_PIXELS / 1e6:.0f} megapixels"
                raise UnreadableImage(path, f"{width} x {height} pixels is more than the {limit} decoded here")
            image.load()
            # 32-bit integer images from PIL are almost always 16-bit sources: values above 255 say so.
            sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255)
            orientation = image.getexif().get(0x0112)
            side = min(width, height)
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
            small = _resizable(image).resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
            # The centre square of the stored image is that of the upright one: turn the small crop, not the image.
            small = _to_rgb(small, sixteen_bit)
            return np.asarray(small.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else small, np.uint8)
    except Image.UnidentifiedImageError:
        raise UnreadableImage(path, "not an image format Pillow can read") from None
    except _DECODE_ERRORS as error:
        raise UnreadableImage(path, f"{type(error).__name__}: {error}") from error


# --- The uint8 cache: one decode per machine and image size ------------------------------------------------------
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


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Host memory this process could still take without swapping, or None where nothing tells: MemAvailable,
    lowered to what is left under a cgroup v2 memory limit (containers, Modal), else sysconf's free pages."""
    try:
        line = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError, StopIteration):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # no such name (macOS) or no sysconf
            available = None
    try:
        limit, used = (cgroup / "memory.max").read_text().strip(), int((cgroup / "memory.current").read_text())
        left = None if limit == "max" else max(0, int(limit) - used)
    except (OSError, ValueError):
        left = None
    return left if available is None else available if left is None else min(available, left)


def decode_workers(num_files: int, available_bytes: int | None) -> int:
    """Decoder threads of a cache build: one per core (at most MAX_DECODE_WORKERS), but only as many as half the
    available memory holds at WORST_DECODE_BYTES each (two when unknown, ~1.2 GB); one for a small build."""
    if num_files < 64:
        return 1
    by_memory = 2 if available_bytes is None else available_bytes // 2 // WORST_DECODE_BYTES
    return max(1, min(MAX_DECODE_WORKERS, os.cpu_count() or 1, by_memory))


def _decoded(paths: Sequence[Path], size: int, workers: int) -> Iterator[np.ndarray | str]:
    """Each file's CHW image, or why it could not be read (one bad file must not stop a build), in order."""

    def decode(path: Path) -> np.ndarray | str:
        try:
            return load_rgb(path, size).transpose(2, 0, 1)
        except UnreadableImage as error:
            return error.reason

    if workers <= 1:
        yield from map(decode, paths)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:  # in bounded chunks: decoded images wait in memory
        for start in range(0, len(paths), 64 * workers):
            yield from pool.map(decode, paths[start : start + 64 * workers])


def _read_cache(images_path: Path, meta_path: Path, key: str, image_size: int) -> ImageCache | None:
    """The cache stored under `key`, or None when it is missing or does not match its metadata (then rebuilt)."""
    try:
        meta = json.loads(meta_path.read_text())
        labels = np.asarray(meta["labels"], dtype=np.int64)
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)[: len(labels)]  # then the skipped files' rows
        cache = ImageCache(images, labels, list(meta["class_names"]), image_size, list(meta["skipped"]), images_path)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    expected = (len(labels), 3, image_size, image_size)
    return cache if meta.get("key") == key and images.dtype == np.uint8 and images.shape == expected else None


def load_or_build_cache(
    data_dir: str | Path, image_size: int, cache_dir: str | Path | None = None,
    warn: Callable[[str], object] | None = None, show_progress: bool = True,
) -> ImageCache:  # fmt: skip
    """The uint8 cache of `data_dir` at `image_size`, reused while the listing is unchanged, else rebuilt.

    In `cache_dir`, or `<data_dir>/.tiny-cats-cache/`, or `~/.cache/tiny-cats/<hash>` when the data folder is
    read-only. Safe under DDP: build on one process first, then the others find it.
    """
    listing = scan_image_folder(data_dir)
    # The key changes whenever a file is added, removed, renamed or rewritten, or the size changes; the stem names
    # the data folder, so folders sharing a --cache-dir keep their caches apart.
    stats = [(p.relative_to(listing.root).as_posix(), p.stat()) for p, _ in listing.files]
    entries = [[name, stat.st_size, stat.st_mtime_ns] for name, stat in stats]
    payload = json.dumps({"version": CACHE_FORMAT_VERSION, "image_size": image_size, "files": entries})
    key = hashlib.sha256(payload.encode()).hexdigest()[:20]
    folder_id = hashlib.sha256(str(listing.root.resolve()).encode()).hexdigest()[:16]
    stem = f"{image_size}px-{folder_id}-"
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiny-cats" / folder_id
    candidates = [Path(cache_dir).expanduser()] if cache_dir else [listing.root / CACHE_DIR_NAME, fallback]
    for directory in candidates:
        if cache := _read_cache(directory / f"{stem}{key}.npy", directory / f"{stem}{key}.json", key, image_size):
            return cache
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            break
    else:
        raise UserError(f"cannot create an image cache in any of {', '.join(map(printable, candidates))} — pass a "
                        "writable --cache-dir, or set XDG_CACHE_HOME to a writable folder")  # fmt: skip
    warn = warn or logging.getLogger(LOGGER_NAME).warning  # the skipped files' warnings
    return _build_cache(listing, image_size, directory, stem, key, warn, show_progress)


def _build_cache(listing, image_size, directory: Path, stem: str, key: str, warn, show_progress) -> ImageCache:
    images_path, meta_path = directory / f"{stem}{key}.npy", directory / f"{stem}{key}.json"
    paths, labels, skipped = [path for path, _ in listing.files], [], []

    def decode_into(tmp: Path) -> None:  # the readable images first; the rows of skipped files stay unused at the end
        images = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(paths), 3, image_size, image_size))
        workers = decode_workers(len(paths), available_memory_bytes())
        decoded = zip(listing.files, _decoded(paths, image_size, workers), strict=True)
        for (path, label), result in tqdm(decoded, total=len(paths), desc=f"caching {image_size}px images",
                                          unit="img", disable=not show_progress):  # fmt: skip
            if isinstance(result, str):
                skipped.append(f"{printable(path.relative_to(listing.root).as_posix())}: {printable(result)}")
            else:
                images[len(labels)] = result
                labels.append(label)
        if skipped:
            warn(f"skipped {len(skipped)} unreadable image file(s) of {len(paths)} in {printable(listing.root)}: "
                 + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))  # fmt: skip
        if not labels:
            raise UserError(f"none of the {len(paths)} image files in {printable(listing.root)} could be read — "
                            f"check the files ({LAYOUT_HINT})")  # fmt: skip
        images.flush()

    # Atomic: the .npy appears complete or not at all, and the .json (written last) marks it valid.
    write_atomic(images_path, decode_into)
    meta = dict(key=key, version=CACHE_FORMAT_VERSION, image_size=image_size, root=str(listing.root),
                class_names=listing.class_names, skipped=skipped, labels=labels)  # fmt: skip
    write_atomic(meta_path, json.dumps(meta))
    for old in directory.glob(f"{stem}*"):  # this folder's caches at this size under an older listing
        if key not in old.name:
            old.unlink(missing_ok=True)
    cache = _read_cache(images_path, meta_path, key, image_size)
    assert cache is not None, "a cache just written must read back"
    return cache


def synthetic_cache(num_images: int, image_size: int, num_classes: int = 2, seed: int = 0) -> ImageCache:
    """An in-memory cache of random images, for benchmarks and tests that need no files."""
    images = np.random.default_rng(seed).integers(0, 256, (num_images, 3, image_size, image_size), dtype=np.uint8)
    labels = np.arange(num_images, dtype=np.int64) % num_classes
    return ImageCache(images, labels, [f"class_{i}" for i in range(num_classes)], image_size, [], None)


# --- The split and the batch order -------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), sorted; each class with >= 2 images lands in both when val_fraction > 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    rng, train, val = np.random.default_rng(seed), [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_val = round(len(members) * val_fraction)
        if val_fraction > 0 and len(members) >= 2:
            num_val = min(max(num_val, 1), len(members) - 1)
        val.append(members[:num_val])
        train.append(members[num_val:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    order.flags.writeable = False  # shared through the cache
    return order


def global_batch_indices(num_items: int, global_batch: int, step: int, seed: int, pool: np.ndarray | None = None):
    """Dataset indices of global batch `step`: items [step*B, (step+1)*B) of the endless stream of one permutation per
    epoch (epoch e from `default_rng([seed, e])`). `pool` maps stream items to dataset indices (the classifier's
    train_idx; then num_items == len(pool))."""
    if num_items < 1:
        raise UserError("no training images to draw batches from — check the data folder and split")
    start, stop = step * global_batch, (step + 1) * global_batch
    parts = [
        _epoch_permutation(num_items, seed, epoch)[max(start - epoch * num_items, 0) : stop - epoch * num_items]
        for epoch in range(start // num_items, (stop - 1) // num_items + 1)
    ]
    positions = np.concatenate(parts)
    return np.asarray(pool)[positions] if pool is not None else positions


def shard_bounds(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of a global batch; the batch must split evenly across processes."""
    if global_batch % world_size:
        raise UserError(f"global batch size {global_batch} does not split over {world_size} processes — choose a "
                        f"batch size that is a multiple of {world_size}")  # fmt: skip
    per_rank = global_batch // world_size
    return rank * per_rank, (rank + 1) * per_rank


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of optimizer step `step` (and of `rank`'s own randomness): a pure function of them, so a resumed run,
    or one on another number of processes, draws the same numbers."""
    return (((seed * 1_000_003 + step) << 16) + rank) % (1 << 63)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of everything random about step `step` that is drawn for the whole global batch."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


# --- Augmentation on batch tensors, on the training device -------------------------------------------------------
AUGMENTATION_LEVELS = ("none", "basic", "medium", "full")  # none: orientation is the class (a mirrored b is a d)
MIN_CROP_SIDE = 0.8  # crops keep at least this much of the side: tiny images lose the cat if cropped harder
COLOUR_JITTER = 0.15  # mild, and no hue change: coat colour is what the classes are about
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
        return dataclasses.replace(self, **{k: fn(v) for k, v in vars(self).items() if isinstance(v, torch.Tensor)})

    def slice(self, start: int, stop: int) -> AugmentationParams:
        """The parameters of samples [start, stop), e.g. one rank's part of the global batch."""
        return self._map(lambda t: t[start:stop])

    def to(self, device: torch.device | str) -> AugmentationParams:
        return self._map(lambda t: t.to(device))


def identity_augmentation(batch_size: int, device: torch.device | str = "cpu") -> AugmentationParams:
    """Parameters that change nothing (what each level randomises further)."""
    ones = torch.ones(batch_size, device=device)
    flip, shift = torch.zeros(batch_size, dtype=torch.bool, device=device), torch.zeros(batch_size, 2, device=device)
    return AugmentationParams(flip, ones, shift, ones, ones, ones)


def draw_augmentation(level: str, batch_size: int, image_size: int, generator: torch.Generator) -> AugmentationParams:
    """Every random parameter of one GLOBAL batch, on the generator's device. none: nothing drawn. basic: flips.
    medium: + a square crop keeping 80-100 % of the side, anywhere in the image. full: + brightness, contrast and
    saturation factors in [0.85, 1.15]."""
    if level not in AUGMENTATION_LEVELS:
        raise UserError(f"unknown augmentation level {level!r} — choose one of {', '.join(AUGMENTATION_LEVELS)}")
    device, params = generator.device, identity_augmentation(batch_size, generator.device)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    if level == "none":
        return params
    params.flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
    if level in ("medium", "full"):
        min_side = min(MIN_CROP_SIDE, 1.0 - 1.0 / image_size)  # whole pixels: a smaller crop would only blur
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


def unit_batch(arrays: Sequence[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Decoded (H, W, 3) uint8 images (`load_rgb`) -> one float32 (B, 3, H, W) batch in [0, 1] on `device`."""
    return to_unit_float(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device))


def apply_augmentation(images_uint8: torch.Tensor, params: AugmentationParams) -> torch.Tensor:
    """Augment a uint8 (B, 3, H, W) batch on its device; float32 in [0, 1]."""
    params = params.to(images_uint8.device)
    if params.crops:
        # Each sample's crop (+ flip) resized back in one batched bilinear grid_sample. Crops are axis-aligned, so
        # the grid is an outer combination of one x row and one y column per sample (cheaper than affine_grid).
        height, width = images_uint8.shape[2:]
        centres = lambda n: (torch.arange(n, device=params.flip.device, dtype=torch.float32) * 2 + 1) / n - 1  # noqa: E731
        mirror = 1.0 - 2.0 * params.flip.float()
        grid_x = (params.crop_side * mirror)[:, None] * centres(width) + params.crop_shift[:, :1]
        grid_y = params.crop_side[:, None] * centres(height) + params.crop_shift[:, 1:]
        grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)
        images = F.grid_sample(to_unit_float(images_uint8), grid, "bilinear", "border", align_corners=False)
        images = images.clamp_(0, 1)
    else:
        images = to_unit_float(torch.where(params.flip.view(-1, 1, 1, 1), images_uint8.flip(-1), images_uint8))
    if params.colour:
        # torchvision's brightness -> contrast -> saturation, per sample, folded into one affine map: with b, c, s
        # the factors, L the luma and m its mean, c*b*(s*x + (1-s)*L) + (1-c)*b*m (only the clamps between differ).
        luma = sum(weight * images[:, c : c + 1] for c, weight in enumerate(_LUMA))  # a 1x1 conv is ~20x slower
        b, c, s = (f.view(-1, 1, 1, 1) for f in (params.brightness, params.contrast, params.saturation))
        shift = (1 - c) * b * luma.mean((2, 3), keepdim=True)
        images = torch.lerp(luma, images, s).mul_(c * b).add_(shift).clamp_(0, 1)
    return images


# --- Batches on the training device ------------------------------------------------------------------------------
def gather_batch(images: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Rows `indices` of the (memory-mapped) image array as a uint8 tensor, read in file order."""
    order = np.argsort(indices, kind="stable")
    rows = images[indices[order]]
    unsorted = np.empty_like(rows)
    unsorted[order] = rows
    return torch.from_numpy(unsorted)


DEVICE_CACHE_MAX_FREE_FRACTION = 0.25  # a toy or Oxford-size set is tens of MB


class ImageSource:
    """The cached images and labels, placed where the training device gathers batches from them cheapest.

    device: the whole uint8 array on the training device (auto: on a GPU, when it fits in a quarter of its free
    memory); a batch is one index_select there, with no host round trip. host: the memory-mapped array; a batch is
    gathered on the host and, for a GPU, copied from pinned memory without blocking while the next one is gathered
    in the background. Both give bitwise the same batches.
    """

    def __init__(self, cache: ImageCache, device: torch.device | str, placement="auto", background: bool | None = None):
        self.device, self.image_size, self.num_images = torch.device(device), cache.image_size, len(cache)
        on_gpu = self.device.type == "cuda"
        if placement == "auto":
            share = DEVICE_CACHE_MAX_FREE_FRACTION
            fits = on_gpu and cache.images.nbytes <= share * torch.cuda.mem_get_info(self.device)[0]
            placement = "device" if fits else "host"
        self.placement, self._pin = placement, on_gpu  # a copy from pageable memory would wait for the GPU's queue
        self.images, self.labels = cache.images, np.asarray(cache.labels, dtype=np.int64)
        if placement == "device":
            self.images = torch.from_numpy(np.ascontiguousarray(cache.images)).to(self.device)
            self.labels = torch.from_numpy(self.labels).to(self.device)
        background = on_gpu if background is None else background  # the host is idle while a GPU computes
        self._background = ThreadPoolExecutor(max_workers=1) if placement == "host" and background else None
        self._prefetched: tuple[np.ndarray, Future] | None = None

    def _gather_on_host(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = gather_batch(self.images, indices), torch.from_numpy(self.labels[indices])
        return (images.pin_memory(), labels.pin_memory()) if self._pin else (images, labels)

    def prefetch(self, indices: np.ndarray) -> None:
        """Start gathering batch `indices` in the background (host placement on a GPU; else a no-op)."""
        if self._background is not None:
            self._prefetched = (indices, self._background.submit(self._gather_on_host, indices))

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (B, 3, H, W), int64 labels (B,)) of dataset rows `indices`, on the training device."""
        if self.placement == "device":
            rows = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
            rows = (rows.pin_memory() if self._pin else rows).to(self.device, non_blocking=True)
            return self.images.index_select(0, rows), self.labels.index_select(0, rows)
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and np.array_equal(prefetched[0], indices):
            images, labels = prefetched[1].result()
        else:
            images, labels = self._gather_on_host(indices)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def training_batch(source: ImageSource, global_batch: int, step: int, seed: int, level: str, rank: int = 0,
                   world_size: int = 1, pool: np.ndarray | None = None):  # fmt: skip
    """This rank's (augmented images float32 [0, 1], labels) of global batch `step`, on the source's device. Indices
    and augmentation are drawn for the whole global batch and then sliced, so 1 and N processes train on identical
    samples, and a resumed run continues exactly."""
    num_items = len(pool) if pool is not None else source.num_images
    indices = global_batch_indices(num_items, global_batch, step, seed, pool)
    start, stop = shard_bounds(global_batch, rank, world_size)
    images, labels = source.gather(indices[start:stop])
    params = draw_augmentation(level, global_batch, source.image_size, step_generator(seed, step, source.device))
    return apply_augmentation(images, params.slice(start, stop)), labels
