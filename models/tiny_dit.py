"""TinyDiT: a class-conditional diffusion transformer, DiT in miniature.

Follows "Scalable Diffusion Models with Transformers" (Peebles & Xie, ICCV 2023,
arXiv:2212.09748) and its reference code (facebookresearch/DiT, models.py): patchify conv, fixed
2-D sin-cos position embedding (as in MAE, He et al. 2022), N transformer blocks conditioned by
adaLN-Zero on timestep + class embeddings, a final adaLN layer and unpatchify. The class table has
one extra row, the "null" class, for classifier-free guidance (Ho & Salimans 2022); the network
knows nothing about noise, schedules or label dropout (see models/diffusion.py).

Departures from the reference that do not change the maths: no learned sigma (the output has as
many channels as the input), the position embedding is a buffer instead of a frozen parameter,
attention uses F.scaled_dot_product_attention, and the SiLU of the conditioning vector is computed
once for all blocks instead of once per block. One departure does change it, slightly: the MLP uses
exact (erf) GELU instead of DiT's tanh approximation (they differ by at most 5e-4 per activation), because
PyTorch's CPU erf kernel is the faster one (README, "make bench").

Shapes: `forward(x, t, y)` takes x (B, C, H, W) float, t (B,) float timesteps on the 0..1000 scale
the embedding was designed for, y (B,) int64 in [0, num_classes] (num_classes = null class), and
returns (B, C, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TIMESTEP_FREQUENCY_DIM = 256


@dataclass(frozen=True)
class DiTSize:
    """Transformer width (hidden size), depth (blocks), attention heads and patch size."""

    width: int
    depth: int
    heads: int
    patch: int


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, as one fused multiply-add; shift/scale are (B, 1, D)."""
    return torch.addcmul(shift, x, 1 + scale)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding: sin half then cos half, frequencies 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) fixed 2-D embedding, row-major tokens; first half encodes x, second half y.

    Same values as DiT's/MAE's get_2d_sincos_pos_embed (whose meshgrid puts w first).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> sinusoidal features (256) -> MLP -> (B, width)."""

    def __init__(self, width: int, frequency_dim: int = TIMESTEP_FREQUENCY_DIM, max_period: float = 10000.0):
        super().__init__()
        half = frequency_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class label -> (B, width); row `num_classes` is the learned null (unconditional) class."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) with SDPA; bf16 on CPU is computed in fp32.

    PyTorch's CPU flash-attention kernel is several times slower in bf16 than in fp32 (its backward above all),
    which made attention a large share of a bf16-autocast CPU training step. GPUs keep their bf16 kernels.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, 3*D) -> (3, B, heads, N, head_dim); unflatten keeps the batch axis symbolic for ONNX.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = attention(*qkv.unbind(0))
        return self.proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """Position-wise feed-forward with exact GELU (DiT: tanh approximation; see the module docstring)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: shift/scale/gate for attention and for the MLP (6 chunks)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """x (B, N, D); c_act = SiLU(conditioning) (B, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c_act).unsqueeze(1).chunk(6, dim=-1)
        )
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from width to one patch of pixels."""

    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_act).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TinyDiT(nn.Module):
    """Class-conditional diffusion transformer; see the module docstring for shapes."""

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        width: int,
        depth: int,
        heads: int,
        patch: int,
        in_channels: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by the number of heads {heads}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.null_class = num_classes
        self.patch = patch
        self.grid = image_size // patch

        self.x_embedder = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        # Fixed, never trained, so a buffer; not saved in checkpoints because it is rebuilt here.
        self.register_buffer("pos_embed", sincos_2d(width, self.grid).float()[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; zeroed adaLN and output layers make a fresh model output exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding initialised like the linear layer it is.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity (gates are 0).
        for layer in [block.adaLN_modulation for block in self.blocks] + [
            self.final_layer.adaLN_modulation,
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W) image."""
        p = self.patch
        x = x.unflatten(1, (self.grid, self.grid)).unflatten(-1, (p, p, self.in_channels))
        # (B, h, w, p, q, C) -> (B, C, h, p, w, q) -> (B, C, h*p, w*q)
        return x.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) on the 0..1000 scale, y (B,) int64 (num_classes = null) -> (B, C, H, W)."""
        # Contiguous (B, N, D) tokens: the transposed conv output would otherwise hand its strided layout
        # down the residual stream, and every layer norm and linear would copy it (~10% of a CPU step).
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous() + self.pos_embed
        c_act = F.silu(self.t_embedder(t) + self.y_embedder(y))  # every adaLN layer starts with SiLU
        for block in self.blocks:
            tokens = block(tokens, c_act)
        return self.unpatchify(self.final_layer(tokens, c_act))


DIT_SIZES: dict[str, DiTSize] = {
    # T: our CPU-friendly size (~1.9M params at 32 px); head dim 64 like DiT-S and DiT-B.
    **{f"T/{p}": DiTSize(width=128, depth=6, heads=2, patch=p) for p in (8, 4, 2)},
    # S and B: the DiT paper's sizes.
    **{f"S/{p}": DiTSize(width=384, depth=12, heads=6, patch=p) for p in (8, 4, 2)},
    **{f"B/{p}": DiTSize(width=768, depth=12, heads=12, patch=p) for p in (8, 4, 2)},
}


def build_dit(model_name: str, image_size: int, num_classes: int, in_channels: int = 3) -> TinyDiT:
    """A TinyDiT of a registry size (`DIT_SIZES`, e.g. "T/4", "S/2")."""
    if model_name not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {model_name!r}; choose one of {', '.join(DIT_SIZES)}")
    size = DIT_SIZES[model_name]  # TinyDiT refuses an image size that is no multiple of the patch size
    return TinyDiT(image_size, num_classes, size.width, size.depth, size.heads, size.patch, in_channels)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; the position embedding is a buffer, not counted)."""
    return sum(p.numel() for p in model.parameters())
