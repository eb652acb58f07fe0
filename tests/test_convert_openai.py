"""OpenAI's dVAE ↔ ours: parity with the ``DALL-E`` package, safe loading, ``dalle vae import-openai``."""

import dataclasses
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dalle.cli import main
from dalle.data.transforms import map_pixels, unmap_pixels
from dalle.errors import UserError
from dalle.models.convert import PickledModule, infer_config, load_openai_file, openai_to_ours, ours_to_openai
from dalle.models.dvae import DVAE, DVAEConfig, load_state_dict_checked, preset

# The package's validators need n_hid >= 64 and vocab_size >= 512, and it always has 4 groups.
SMALL = {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512}
SMALL_RES = 32


@pytest.fixture(scope="module")
def dall_e():
    return pytest.importorskip("dall_e", reason="the DALL-E package is needed for parity tests")


@pytest.fixture(scope="module")
def openai_pair(dall_e):
    torch.manual_seed(1)
    enc = dall_e.Encoder(**SMALL)
    dec = dall_e.Decoder(n_init=32, **SMALL)
    # The package starts biases at zero; random biases make the parity test see every tensor.
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            if p.ndim == 1:
                p.normal_(std=0.1)
    return enc, dec


def _ours(enc, dec, resolution=SMALL_RES):
    config, state = openai_to_ours(enc.state_dict(), dec.state_dict(), resolution=resolution)
    with torch.device("meta"):
        model = DVAE(config)
    load_state_dict_checked(model, state, "test")
    return model


def openai_like(name: str) -> DVAEConfig:
    """A tiny preset with OpenAI's logit-Laplace decoder (the tiny presets' own decoders are Gaussian)."""
    return dataclasses.replace(preset(name), likelihood="logit-laplace")


def test_small_config_is_inferred(openai_pair):
    enc, dec = openai_pair
    config = infer_config(enc.state_dict(), dec.state_dict(), resolution=SMALL_RES)
    assert config == DVAEConfig(resolution=32, n_hid=64, n_blk_per_group=1, n_groups=4, codebook_size=512,
                                n_init=32, in_channels=3)


def test_parity_with_dall_e_package(openai_pair):
    enc, dec = openai_pair
    model = _ours(enc, dec)
    images = torch.rand(2, 3, SMALL_RES, SMALL_RES)
    with torch.no_grad():
        theirs_logits = enc(map_pixels(images))
        ours_logits = model.encoder(map_pixels(images))
        torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-6, atol=1e-6)
        codes = theirs_logits.argmax(dim=1)  # (B, g, g)
        z = F.one_hot(codes, 512).permute(0, 3, 1, 2).float()  # (B, K, g, g)
        theirs_stats = dec(z)
        torch.testing.assert_close(model.decoder(z), theirs_stats, rtol=1e-6, atol=1e-6)
        theirs_images = unmap_pixels(torch.sigmoid(theirs_stats[:, :3]))
    assert torch.equal(model.encode(images), codes)
    torch.testing.assert_close(model.decode(codes), theirs_images, rtol=1e-5, atol=1e-6)


def test_paper_size_key_mapping_on_meta(dall_e):
    meta = torch.device("meta")
    enc, dec = dall_e.Encoder(device=meta), dall_e.Decoder(device=meta)
    config, state = openai_to_ours(enc.state_dict(), dec.state_dict())
    assert config == preset("paper")
    with torch.device("meta"):
        model = DVAE(config)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_round_trip_ours_openai_ours():
    model = DVAE(openai_like("tiny-64"))
    encoder_sd, decoder_sd = ours_to_openai(model)
    assert "blocks.input.w" in encoder_sd and "blocks.output.conv.b" in decoder_sd
    config, state = openai_to_ours(encoder_sd, decoder_sd, resolution=64)
    assert config == model.config
    original = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)


def test_ours_loads_into_dall_e_package(dall_e, openai_pair):
    enc, dec = openai_pair
    encoder_sd, decoder_sd = ours_to_openai(_ours(enc, dec))
    fresh = dall_e.Encoder(**SMALL)
    fresh.load_state_dict(encoder_sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), enc.state_dict().values()))
    dall_e.Decoder(n_init=32, **SMALL).load_state_dict(decoder_sd)


def test_pickled_module_is_read_without_dall_e_code(openai_pair, tmp_path):
    enc, _ = openai_pair
    torch.save(enc, tmp_path / "encoder.pkl")  # what OpenAI released: a whole pickled module
    sd = load_openai_file(tmp_path / "encoder.pkl")
    expected = enc.state_dict()
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
    assert all(type(t) is torch.Tensor for t in sd.values())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "encoder.pkl"
    if writer == "torch":
        torch.save({"blocks.input.w": _Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises(UserError, match="refusing to load"):
        load_openai_file(path)
    assert not marker.exists()
    # The stand-ins are allowed only while loading.
    assert not any(isinstance(g, tuple) and g[0] is PickledModule for g in torch.serialization.get_safe_globals())


def test_state_dict_files_and_bad_files(tmp_path):
    encoder_sd, _ = ours_to_openai(DVAE(openai_like("tiny-32")))
    torch.save(encoder_sd, tmp_path / "enc.pt")
    save_file({k: v.contiguous() for k, v in encoder_sd.items()}, str(tmp_path / "enc.safetensors"))
    for name in ["enc.pt", "enc.safetensors"]:
        sd = load_openai_file(tmp_path / name)
        assert sd.keys() == encoder_sd.keys() and all(torch.equal(sd[k], encoder_sd[k]) for k in sd)
    with pytest.raises(UserError, match="missing file"):
        load_openai_file(tmp_path / "absent.pkl")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a dVAE module or a state dict"):
        load_openai_file(tmp_path / "list.pt")
    (tmp_path / "text.pkl").write_text("hello")
    with pytest.raises(UserError, match="text.pkl"):
        load_openai_file(tmp_path / "text.pkl")


def test_a_gaussian_decoder_is_not_exported_in_openai_format():
    model = DVAE(DVAEConfig(resolution=16, n_hid=8, n_blk_per_group=1, n_groups=2, codebook_size=16, n_init=8,
                            likelihood="gaussian"))
    with pytest.raises(UserError, match="gaussian likelihood"):
        ours_to_openai(model)


def test_mismatched_pair_and_wrong_files_are_user_errors():
    enc_a, dec_a = ours_to_openai(DVAE(openai_like("tiny-32")))
    _, dec_b = ours_to_openai(DVAE(DVAEConfig(resolution=32, n_hid=32, n_blk_per_group=1, n_groups=3,
                                              codebook_size=256, n_init=32)))
    with pytest.raises(UserError, match="512 codes but decoder takes 256"):
        openai_to_ours(enc_a, dec_b, resolution=32)
    with pytest.raises(UserError, match="no 'blocks.input.w'"):
        openai_to_ours({"foo": torch.zeros(1)}, dec_a)
    broken = dict(enc_a)
    broken["blocks.group_1.block_1.res_path.conv_2.w"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(UserError, match="conv_2.w has shape"):
        openai_to_ours(broken, dec_a, resolution=32)
    with pytest.raises(UserError, match="resolution"):
        openai_to_ours(enc_a, dec_a, resolution=30)


def test_cli_import_openai_then_reconstruct(tmp_path, capsys):
    from PIL import Image

    model = DVAE(openai_like("tiny-32"))
    encoder_sd, decoder_sd = ours_to_openai(model)
    torch.save(encoder_sd, tmp_path / "encoder.pt")
    torch.save(decoder_sd, tmp_path / "decoder.pt")
    out = tmp_path / "imported"
    args = ["vae", "import-openai", str(tmp_path / "encoder.pt"), str(tmp_path / "decoder.pt"),
            "--out", str(out), "--resolution", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert '"codebook_size": 512' in printed and "encoder 136,520" in printed and "decoder 107,726" in printed
    assert json.loads((out / "config.json").read_text())["n_groups"] == 3
    imported = DVAE.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), model.state_dict().values()))

    assert main(args) == 2  # refuses to overwrite without --overwrite
    assert "--overwrite" in capsys.readouterr().err

    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["vae", "reconstruct", str(tmp_path / "red.png"), "--model", str(out), "--out",
                 str(tmp_path / "recon")]) == 0
    assert "PSNR" in capsys.readouterr().out and (tmp_path / "recon" / "red.png").is_file()


def test_cli_import_openai_refuses_malicious_file(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save(_Exploit(marker), tmp_path / "encoder.pkl")
    rc = main(["vae", "import-openai", str(tmp_path / "encoder.pkl"), str(tmp_path / "encoder.pkl"),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
