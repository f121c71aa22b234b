"""TinyDiT: shapes for every registry size, adaLN-Zero init, gradient flow, DiT parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from models.tiny_dit import DIT_SIZES, TinyDiT, attention, build_dit, count_parameters, sincos_2d


def dit_reference_parameter_count(
    width: int,
    depth: int,
    patch: int,
    in_channels: int,
    out_channels: int,
    num_classes: int,
    num_tokens: int,
    mlp_ratio: int = 4,
) -> int:
    """The parameter count of facebookresearch/DiT's DiT, written out layer by layer.

    Includes DiT's fixed position embedding, which it stores as a (frozen) nn.Parameter.
    """
    hidden = mlp_ratio * width
    patch_embed = in_channels * patch * patch * width + width
    timestep_embed = 256 * width + width + width * width + width
    label_embed = (num_classes + 1) * width  # + 1: the null class
    block = (
        width * 3 * width
        + 3 * width  # qkv
        + width * width
        + width  # attention output projection
        + width * hidden
        + hidden
        + hidden * width
        + width  # MLP
        + width * 6 * width
        + 6 * width
    )  # adaLN modulation
    final = width * 2 * width + 2 * width + width * patch * patch * out_channels + patch * patch * out_channels
    return patch_embed + timestep_embed + label_embed + depth * block + final + num_tokens * width


def test_formula_reproduces_the_published_dit_xl2_count():
    # DiT's train.py logs "DiT Parameters: 675,129,632" for DiT-XL/2 (latents 32x32x4, learned sigma -> 8 out).
    assert dit_reference_parameter_count(1152, 28, 2, 4, 8, 1000, 256) == 675_129_632


@pytest.mark.parametrize(("name", "paper_millions"), [("S/2", 33), ("B/2", 130)])
def test_parameter_counts_match_dit(name, paper_millions):
    with torch.device("meta"):  # counting needs no memory or initialisation time
        model = build_dit(name, image_size=32, num_classes=1000, in_channels=4)  # DiT's 256 px -> 32x32 latents
    size = DIT_SIZES[name]
    expected_without_pos = dit_reference_parameter_count(size.width, size.depth, size.patch, 4, 4, 1000, 0)
    assert count_parameters(model) == expected_without_pos
    # DiT's Table 1 (33M, 130M) also counts the learned-sigma output channels and the frozen position table.
    learned_sigma_and_pos = size.width * size.patch**2 * 4 + size.patch**2 * 4 + 256 * size.width
    assert (count_parameters(model) + learned_sigma_and_pos) / 1e6 == pytest.approx(paper_millions, abs=0.6)


@pytest.mark.parametrize("name", list(DIT_SIZES))
def test_every_registry_size_maps_images_to_images(name):
    model = build_dit(name, image_size=16, num_classes=3)
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.tensor([0.0, 999.0]), torch.tensor([0, 3])).shape == x.shape


def test_fresh_model_outputs_exactly_zero():
    model = build_dit("T/4", image_size=16, num_classes=5)
    out = model(torch.randn(3, 3, 16, 16), torch.rand(3) * 1000, torch.tensor([0, 4, 5]))
    assert torch.equal(out, torch.zeros_like(out))


def test_gradients_reach_every_parameter_once_the_zeroed_layers_have_moved():
    torch.manual_seed(0)
    model = TinyDiT(image_size=8, num_classes=2, width=32, depth=2, heads=2, patch=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 1])
    # adaLN-Zero: step 1 moves only the output linear, step 2 the adaLN layers (gates), and only the
    # third backward reaches attention, MLP and embeddings through the now non-zero gates.
    for _ in range(3):
        optimizer.zero_grad()
        (model(x, t, y) - x).square().mean().backward()
        optimizer.step()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_position_embedding_is_a_fixed_buffer_rebuilt_on_construction():
    model = build_dit("T/4", image_size=16, num_classes=2)
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()
    assert model.pos_embed.shape == (1, 16, 128)
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(128, 4).float())


def test_sincos_2d_matches_mae_layout():
    # Token (row 1, col 2) of a 3x3 grid, dim 8: [sin(x), sin(x/100), cos(x), cos(x/100)] for x = col,
    # then the same for y = row (MAE / DiT's get_2d_sincos_pos_embed).
    emb = sincos_2d(8, 3)[1 * 3 + 2]
    col, row = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    expected = torch.stack(
        [
            col.sin(),
            (col / 100).sin(),
            col.cos(),
            (col / 100).cos(),
            row.sin(),
            (row / 100).sin(),
            row.cos(),
            (row / 100).cos(),
        ]
    )
    torch.testing.assert_close(emb, expected)


def test_attributes_the_rest_of_the_kit_relies_on():
    model = build_dit("T/2", image_size=8, num_classes=7, in_channels=1)
    assert (model.image_size, model.in_channels, model.num_classes, model.null_class, model.patch) == (8, 1, 7, 7, 2)
    assert model.y_embedder.embedding_table.num_embeddings == 8


def test_build_dit_rejects_bad_names_and_sizes():
    with pytest.raises(ValueError, match="unknown DiT size"):
        build_dit("XL/2", image_size=32, num_classes=2)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        build_dit("T/8", image_size=20, num_classes=2)


def test_residual_stream_is_contiguous_so_norms_and_linears_do_not_copy_it():
    model = TinyDiT(image_size=16, num_classes=2, width=32, depth=2, heads=2, patch=4)
    layouts = []
    for block in model.blocks:
        block.norm1.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    model(torch.randn(2, 3, 16, 16), torch.rand(2) * 1000, torch.tensor([0, 1]))
    assert layouts == [True, True]


def test_cpu_bf16_attention_runs_in_fp32_and_returns_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert torch.equal(out, expected)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
