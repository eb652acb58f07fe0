"""The stage-1 dVAE: shapes per preset, encode/decode contracts, input checks, save/load, ``dalle vae reconstruct``."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.cli import main
from dalle.errors import ConfigError, UserError
from dalle.models.dvae import DVAE, PRESETS, DVAEConfig, ResBlock, count_parameters, preset

TINY = {"tiny-64": 8, "tiny-32": 8, "tiny-64-16": 16, "tiny-48": 12}  # preset → side of its code grid


@pytest.fixture(scope="module")
def tiny32() -> DVAE:
    torch.manual_seed(0)
    return DVAE(preset("tiny-32"))


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_shapes_and_contracts(name):
    cfg = preset(name)
    model = DVAE(cfg)
    k, g, r = cfg.codebook_size, cfg.grid_size, cfg.resolution
    assert g == TINY[name]
    images = torch.rand(2, 3, r, r)
    logits = model.encoder(images)
    assert logits.shape == (2, k, g, g)
    stats = model.decoder(F.softmax(logits, dim=1))
    assert cfg.likelihood == "gaussian" and stats.shape == (2, 3, r, r)  # the mean pixel (see PRESETS)
    codes = model.encode(images)
    assert codes.shape == (2, g, g) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < k
    out = model.decode(codes)
    assert out.shape == (2, 3, r, r) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_paper_preset_parameter_counts_and_shapes_on_meta():
    # Paper §2.1 / OpenAI's release: encoder 53.8M, decoder 43.8M parameters.
    cfg = preset("paper")
    with torch.device("meta"):
        model = DVAE(cfg)
        logits = model.encoder(torch.empty(1, 3, 256, 256))
        stats = model.decoder(torch.empty(1, 8192, 32, 32))
    assert count_parameters(model.encoder) == 53_786_240
    assert count_parameters(model.decoder) == 43_829_766
    assert (cfg.grid_size, cfg.codebook_size) == (32, 8192)
    assert logits.shape == (1, 8192, 32, 32)
    assert stats.shape == (1, 6, 256, 256)


def test_openai_parameter_names():
    with torch.device("meta"):
        model = DVAE(preset("paper"))
    keys = set(model.state_dict())
    for key in ["encoder.blocks.input.w", "encoder.blocks.group_1.block_1.res_path.conv_1.w",
                "encoder.blocks.group_2.block_1.id_path.w", "encoder.blocks.output.conv.b",
                "decoder.blocks.input.w", "decoder.blocks.group_4.block_2.res_path.conv_4.b",
                "decoder.blocks.output.conv.w"]:
        assert key in keys
    # Same width in and out: the identity path has no parameters.
    assert "encoder.blocks.group_1.block_1.id_path.w" not in keys
    assert model.encoder.blocks.group_1.block_1.res_path.conv_4.w.shape == (256, 64, 1, 1)
    assert model.decoder.blocks.group_1.block_1.res_path.conv_1.w.shape == (512, 128, 1, 1)


def test_post_gain_is_one_over_n_layers_squared():
    cfg = DVAEConfig(resolution=32, n_hid=16, n_blk_per_group=3, n_groups=2, codebook_size=16, n_init=8)
    blocks = [m for m in DVAE(cfg).modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 2 * 2 * 3
    assert all(b.post_gain == pytest.approx(1 / 36) for b in blocks)


@pytest.mark.parametrize(("n_groups", "grid"), [(4, 4), (3, 8), (2, 16), (1, 32)])
def test_n_groups_sets_downsampling(n_groups, grid):
    cfg = DVAEConfig(resolution=32, n_hid=8, n_blk_per_group=1, n_groups=n_groups, codebook_size=16, n_init=8)
    assert cfg.grid_size == grid
    model = DVAE(cfg)
    assert model.encoder(torch.rand(1, 3, 32, 32)).shape == (1, 16, grid, grid)
    assert model.decode(torch.zeros(1, grid, grid, dtype=torch.long)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize(("field", "value"), [("n_groups", 5), ("n_groups", 0), ("n_hid", 30), ("n_blk_per_group", 0),
                                              ("codebook_size", 1), ("resolution", 60), ("n_init", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"DVAEConfig.{field}"):
        DVAEConfig(**{field: value})


def test_unknown_preset_lists_names():
    with pytest.raises(UserError, match="tiny-64"):
        preset("huge")
    assert preset("paper") is not PRESETS["paper"]


@pytest.mark.parametrize(("x", "message"), [
    (torch.rand(3, 32, 32), "4-d"),
    (torch.rand(1, 4, 32, 32), "expected 3 channels, got 4"),
    (torch.rand(1, 3, 64, 64), "expected spatial size 32x32, got 64x64"),
    (torch.rand(1, 3, 32, 32, dtype=torch.float64), "expected dtype torch.float32"),
])
def test_encoder_rejects_bad_input(tiny32, x, message):
    with pytest.raises(ValueError, match=message):
        tiny32.encoder(x)


def test_decoder_rejects_bad_input(tiny32):
    k, g = tiny32.config.codebook_size, tiny32.config.grid_size
    with pytest.raises(ValueError, match=f"expected {k} channels, got 3"):
        tiny32.decoder(torch.rand(1, 3, g, g))
    with pytest.raises(ValueError, match="expected spatial size 8x8, got 4x4"):
        tiny32.decoder(torch.rand(1, k, 4, 4))
    with pytest.raises(ValueError, match="expected dtype torch.float32"):
        tiny32.decoder(torch.rand(1, k, g, g).half())
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 512\)"):
        tiny32.decode(torch.full((1, g, g), k))
    with pytest.raises(ValueError, match="integer codes"):
        tiny32.decode(torch.zeros(1, g, g))
    with pytest.raises(ValueError, match=r"expected \(B, 8, 8\) codes"):
        tiny32.decode(torch.zeros(1, g * g, dtype=torch.long))


def test_decode_codes_equals_decoder_on_one_hot(tiny32):
    cfg = tiny32.config
    codes = torch.randint(0, cfg.codebook_size, (3, cfg.grid_size, cfg.grid_size))
    one_hot = F.one_hot(codes, cfg.codebook_size).permute(0, 3, 1, 2).float()  # (B, K, g, g)
    with torch.no_grad():
        expected = tiny32.stats_to_image(tiny32.decoder(one_hot))
    torch.testing.assert_close(tiny32.decode(codes), expected, rtol=1e-5, atol=1e-6)


def test_channels_last_gives_the_same_results(tiny32):
    nhwc = copy.deepcopy(tiny32).to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 32, 32)
    codes = torch.randint(0, 512, (2, 8, 8))
    with torch.no_grad():
        logits = nhwc.encoder(images.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(logits, tiny32.encoder(images), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nhwc.decode(codes), tiny32.decode(codes), rtol=1e-4, atol=1e-5)


def test_stats_to_image_uses_mu_only(tiny32):
    stats = torch.zeros(1, 6, 4, 4)
    stats[:, 3:] = 100.0  # ln b must not matter
    assert torch.allclose(tiny32.stats_to_image(stats), torch.full((1, 3, 4, 4), 0.5))


def test_gaussian_decoder_outputs_the_mean_pixel():
    cfg = dataclasses.replace(preset("tiny-32"), likelihood="gaussian")
    model = DVAE(cfg)
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.grid_size, cfg.grid_size))
    with torch.no_grad():
        stats = model.decoder.forward_codes(codes)
    assert stats.shape == (2, 3, 32, 32)
    torch.testing.assert_close(model.decode(codes), (stats * 0.5 + 0.5).clamp(0, 1))
    assert torch.equal(model.stats_to_image(torch.tensor([-3.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)),
                       torch.tensor([0.0, 0.0, 0.5, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2))
    with pytest.raises(ConfigError, match="likelihood"):
        dataclasses.replace(cfg, likelihood="poisson")


def test_no_silent_casts_in_bfloat16(tiny32):
    model = DVAE(tiny32.config).to(torch.bfloat16)
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="expected dtype torch.bfloat16"):
        model.encode(images)
    assert model.encode(images.bfloat16()).dtype == torch.int64
    assert model.decode(torch.zeros(1, 8, 8, dtype=torch.long)).dtype == torch.bfloat16


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = DVAE(preset("tiny-32"))
    model.to_empty(device="cpu")
    model.init_weights()
    w = model.encoder.blocks.input.w.detach()  # fan-in 3 * 7 * 7 = 147
    assert torch.isfinite(w).all() and abs(float(w.std()) - 147**-0.5) < 0.02
    assert float(model.encoder.blocks.input.b.detach().abs().max()) == 0.0


def test_save_load_round_trip(tiny32, tmp_path):
    tiny32.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["kind"] == "dvae" and saved["codebook_size"] == 512
    loaded = DVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny32.config
    ours, theirs = tiny32.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(images), tiny32.encode(images))


def test_load_rejects_other_kind_and_mismatched_weights(tiny32, tmp_path):
    tiny32.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "kind": "transformer"}))
    with pytest.raises(UserError, match="not a 'dvae' model"):
        DVAE.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_hid": 64}))
    with pytest.raises(UserError, match="do not fit the model"):
        DVAE.from_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="no such checkpoint"):
        DVAE.from_pretrained(tmp_path / "absent")


def _write_image(path, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_cli_reconstruct(tiny32, tmp_path, capsys):
    tiny32.save_pretrained(tmp_path / "model")
    (tmp_path / "a").mkdir()
    good = [_write_image(tmp_path / "cat.png"), _write_image(tmp_path / "a" / "cat.jpg", seed=1)]
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"not an image")
    rc = main(["vae", "reconstruct", str(good[0]), str(corrupt), str(tmp_path / "missing.png"), str(good[1]),
               "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--batch-size", "1"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "skipped" in err and "broken.png" in err and "missing.png" in err
    assert out.count("PSNR") == 3 and "2 of 4 images" in out
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["cat-2.png", "cat.png"]  # same stem twice: the second gets a suffix
    assert Image.open(tmp_path / "out" / "cat.png").size == (64, 32)  # original | reconstruction


def test_cli_reconstruct_all_bad_is_an_error(tiny32, tmp_path, capsys):
    tiny32.save_pretrained(tmp_path / "model")
    rc = main(["vae", "reconstruct", str(tmp_path / "nope.png"), "--model", str(tmp_path / "model"),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "none of the given images" in capsys.readouterr().err
