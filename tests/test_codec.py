"""Codec: exact pack/unpack, FluxPipeline's conventions, and the VAE codec on a tiny saved AutoencoderKL."""
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline

from fluxir.codec import PixelCodec, VaeCodec, image_ids, pack, unpack


def test_pack_unpack_round_trip_is_exact():
    z = torch.randn(3, 5, 8, 12)
    tokens = pack(z)
    assert tokens.shape == (3, 4 * 6, 20)
    assert torch.equal(unpack(tokens, 8, 12), z)


def test_pack_and_ids_follow_flux_pipeline():
    z = torch.randn(2, 16, 6, 10)
    ref = FluxPipeline._pack_latents(z, 2, 16, 6, 10)
    assert torch.equal(pack(z), ref)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10), ref_ids)
    # FluxPipeline._unpack_latents works on pixel sizes (÷ vae_scale_factor·2 internally)
    assert torch.equal(unpack(ref, 6, 10), FluxPipeline._unpack_latents(ref, 6 * 8, 10 * 8, 8))


def test_odd_latent_is_refused():
    with pytest.raises(ValueError, match="even"):
        pack(torch.zeros(1, 3, 5, 4))


def test_pixel_codec_range():
    img = torch.rand(2, 3, 8, 8)
    z = PixelCodec().encode(img)
    assert z.min() >= -1 and z.max() <= 1
    torch.testing.assert_close(PixelCodec().decode(z), img)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_vae_codec_scaling_and_shift(tiny_vae_dir):
    codec = VaeCodec.from_pretrained(tiny_vae_dir)
    assert (codec.latent_channels, codec.downsample) == (4, 2)
    img = torch.rand(2, 3, 16, 16)
    z = codec.encode(img)
    assert z.shape == (2, 4, 8, 8)
    raw = codec.vae.encode(img * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(z, (raw - 0.1159) * 0.3611)
    out = codec.decode(z)
    ref = ((codec.vae.decode(raw).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_vae_codec_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VaeCodec.from_pretrained(tmp_path)
