"""FLUX's token layout: our latent_image_ids / pack_latents / unpack_latents
(dancegrpo_fast/policies/flux.py) against diffusers' FluxPipeline private helpers on random inputs.
The policy does not call the private helpers (they may change in any diffusers release); this test
fails loudly when diffusers changes or removes them, so a layout change cannot pass unnoticed."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from dancegrpo_fast.policies.flux import latent_image_ids, pack_latents, unpack_latents


def _private(name):
    helper = getattr(FluxPipeline, name, None)
    assert helper is not None, (f"diffusers {__import__('diffusers').__version__} has no FluxPipeline.{name}: check "
                                f"that FLUX's token layout is still what dancegrpo_fast/policies/flux.py assumes")
    return helper


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (8, 8), (45, 45)])
def test_image_ids_equal_diffusers(rows, cols):
    ours = latent_image_ids(rows, cols)
    theirs = _private("_prepare_latent_image_ids")(1, rows, cols, torch.device("cpu"), torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == (rows * cols, 3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("batch,channels,height,width", [(1, 16, 2, 2), (3, 16, 6, 10), (2, 4, 8, 8)])
def test_pack_unpack_equal_diffusers(batch, channels, height, width):
    latents = torch.randn(batch, channels, height, width, dtype=torch.float64)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, _private("_pack_latents")(latents, batch, channels, height, width),
                               rtol=0, atol=0)
    tokens = torch.randn_like(packed)
    vae_scale = 8  # diffusers' helper takes pixel sizes; ours takes latent sizes
    theirs = _private("_unpack_latents")(tokens, height * vae_scale, width * vae_scale, vae_scale)
    torch.testing.assert_close(unpack_latents(tokens, height, width), theirs, rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, height, width), latents, rtol=0, atol=0)


def test_token_order_is_row_major_and_channel_major():
    """A hand-built case: token k is patch (k // (W/2), k % (W/2)); its 4C features are (c, dy, dx)."""
    latents = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    packed = pack_latents(latents)
    assert packed.shape == (1, 6, 8)
    # token 4 = patch row 1, column 1 -> pixels rows 2..3, columns 2..3 of each channel
    expected = torch.stack([latents[0, c, 2 + dy, 2 + dx] for c in range(2) for dy in range(2) for dx in range(2)])
    torch.testing.assert_close(packed[0, 4], expected)
    ids = latent_image_ids(2, 3)
    torch.testing.assert_close(ids[4], torch.tensor([0.0, 1.0, 1.0]))
