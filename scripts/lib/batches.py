"""Batches from the image cache: the split, the order, augmentation, all pure functions of (seed, step).

`stratified_split` (classifier validation) -> `global_batch_indices` (one permutation per epoch, seeded by
(seed, epoch); endless, so a resumed run and an N-process run see the same samples) -> `shard_bounds` (each
process's slice of the global batch) -> `draw_augmentation` / `apply_augmentation` (batched, on the training
device). `training_batch` strings them together for the classifier; the DiT trainer does the same with its
noise draws beside them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from scripts.lib.cli import UserError
from scripts.lib.images import ImageCache

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


# ----------------------------------------------------------------------------------------------------------
# Augmentation on batch tensors, on the training device
# ----------------------------------------------------------------------------------------------------------

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
