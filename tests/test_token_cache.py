import argparse
import json

import numpy as np
import pytest
import torch

from dalle.data import token_cache as tc
from dalle.data.config import DataConfig
from dalle.data.loader import make_loader
from dalle.data.transforms import to_float
from dalle.errors import UserError
from dalle.models.dvae import DVAE, DVAEConfig

TINY = DVAEConfig(resolution=16, n_hid=8, n_blk_per_group=1, n_groups=2, codebook_size=32, n_init=8)
DATA = DataConfig(resolution=16, size=50, split="val")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dvae") / "model"
    torch.manual_seed(0)
    DVAE(TINY).save_pretrained(path)
    return path


def encode(model_dir, out, **kw):
    model = DVAE.from_pretrained(model_dir)
    options = dict(batch_size=8, chunk_size=16, progress=False)
    return tc.encode_dataset(model, model_dir, DATA, out, **{**options, **kw})


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "ref"
    result = encode(model_dir, out)
    assert (result.count, result.encoded) == (50, 50)
    return out


def test_round_trip(model_dir, reference):
    meta = json.loads((reference / "meta.json").read_text())
    assert meta["complete"] and meta["count"] == 50 and meta["chunks"] == 4 and meta["grid_size"] == 8
    assert meta["dtype"] == "uint16" and meta["source"] == "shapes" and meta["split"] == "val"
    assert np.load(reference / "codes-00000.npy").dtype == np.uint16
    cache = tc.TokenCache(reference)
    assert len(cache) == 50 and cache.grid_size == 8 and cache.codebook_size == 32
    model = DVAE.from_pretrained(model_dir).eval()
    batches = list(make_loader(DATA, 50))
    images, captions = batches[0]["images"], batches[0]["captions"]
    want = model.encode(to_float(images))  # (50, 8, 8): argmax codes, no noise
    codes, caption, attributes = cache[17]
    assert codes.dtype == torch.int64 and codes.shape == (8, 8)
    assert torch.equal(codes, want[17]) and caption == captions[17]
    assert attributes == batches[0]["attributes"][17]
    assert torch.equal(cache[-1][0], want[49]) and cache.record(3)["key"] == batches[0]["keys"][3]
    with pytest.raises(IndexError):
        cache[50]


def test_finished_cache_is_not_redone(model_dir, reference):
    before = (reference / "codes-00000.npy").stat().st_mtime_ns
    assert encode(model_dir, reference).encoded == 0
    assert (reference / "codes-00000.npy").stat().st_mtime_ns == before


def test_resume_after_interruption(model_dir, reference, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_write = tc._write_chunk
    calls = []

    def killed_on_third_chunk(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(tc, "_write_chunk", killed_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        encode(model_dir, out)
    monkeypatch.setattr(tc, "_write_chunk", real_write)
    with pytest.raises(UserError, match="unfinished"):
        tc.TokenCache(out)
    result = encode(model_dir, out, workers=0, batch_size=4)  # read options of the first session are kept
    assert (result.count, result.encoded) == (50, 50 - 32)
    for name in [f"codes-0000{i}.npy" for i in range(4)]:
        assert np.array_equal(np.load(out / name), np.load(reference / name))
    for i in range(4):
        assert (out / f"captions-0000{i}.jsonl").read_text() == (reference / f"captions-0000{i}.jsonl").read_text()


def test_other_model_or_data_needs_overwrite(model_dir, reference, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(1)
    DVAE(TINY).save_pretrained(other)  # different random weights
    with pytest.raises(UserError, match="model_sha256"):
        encode(other, reference)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="not a token cache"):
        encode(model_dir, tmp_path / "junk")
    out = tmp_path / "copy"
    encode(model_dir, out)
    assert encode(other, out, overwrite=True).encoded == 50


def test_batches_shuffle_and_shard(reference):
    cache = tc.TokenCache(reference)
    epoch0 = [b["indices"].tolist() for b in tc.cache_batches(cache, 8, seed=1, epoch=0)]
    assert epoch0 == [b["indices"].tolist() for b in tc.cache_batches(cache, 8, seed=1, epoch=0)]
    assert epoch0 != [b["indices"].tolist() for b in tc.cache_batches(cache, 8, seed=1, epoch=1)]
    assert len(epoch0) == 6 and len(set(sum(epoch0, []))) == 48  # drop_last: 50 // 8 full batches
    first = next(iter(tc.cache_batches(cache, 8, seed=1)))
    assert first["codes"].shape == (8, 8, 8) and first["codes"].dtype == torch.int64
    assert torch.equal(first["codes"][0], cache[int(first["indices"][0])][0])
    assert len(first["captions"]) == 8 and len(first["keys"]) == 8
    ranks = [sum((b["indices"].tolist() for b in tc.cache_batches(cache, 5, rank=r, world_size=3)), [])
             for r in range(3)]
    assert all(len(r) == 15 for r in ranks) and not set(ranks[0]) & set(ranks[1])
    resumed = [b["indices"].tolist() for b in tc.cache_batches(cache, 8, seed=1, start_batch=4)]
    assert resumed == epoch0[4:]


def test_vae_encode_command(model_dir, tmp_path):
    from dalle.cli import add_group
    from dalle.commands import vae_train

    parser = argparse.ArgumentParser()
    vae_train.register(add_group(parser.add_subparsers(), "vae", "dVAE"))
    out = tmp_path / "cache"
    args = parser.parse_args(["vae", "encode", "--model", str(model_dir), "--out", str(out), "--data-size", "20",
                              "--chunk-size", "8", "--batch-size", "4", "--no-progress"])
    assert args.func(args) == 0
    cache = tc.TokenCache(out)
    assert len(cache) == 20 and cache.meta["split"] == "train" and cache.meta["data"]["resolution"] == 16
