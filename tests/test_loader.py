import dataclasses
import functools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.data import loader as loader_mod
from dalle.data.config import DataConfig
from dalle.data.images import BadRecord
from dalle.data.loader import make_loader, shuffled
from dalle.data.records import Record
from dalle.data.registry import open_source
from dalle.data.transforms import to_float
from dalle.errors import UserError


def gradient(i: int, w: int = 48, h: int = 32) -> Image.Image:
    """A non-square image whose pixels say where they came from, so crops can be told apart."""
    x = np.arange(w)[None, :].repeat(h, 0)
    y = np.arange(h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x * 5, y * 7, np.full_like(x, i % 256)], -1).astype(np.uint8))


def broken(i: int) -> Image.Image:
    raise BadRecord("corrupt image", f"record {i}")


@dataclasses.dataclass
class FakeSource:
    """``size`` records; those with index in ``bad`` fail to decode, those in ``no_caption`` have an empty caption."""

    size: int
    bad: frozenset = frozenset()
    no_caption: frozenset = frozenset()
    name: str = "fake"

    def records(self, shard=0, num_shards=1):
        for i in range(shard, self.size, num_shards):
            load = functools.partial(broken if i in self.bad else gradient, i)
            yield Record(f"fake/{i:04d}", "" if i in self.no_caption else f"picture {i}", load, {"i": i})


def keys(batches):
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_every_record_once(workers):
    ld = make_loader(DataConfig(size=50, resolution=32), batch_size=16, workers=workers)
    batches = list(ld)
    for b in batches:
        assert b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (32, 32, 3)
        assert len(b["captions"]) == len(b["keys"]) == len(b["attributes"]) == b["images"].shape[0] <= 16
        assert set(b) == {"images", "captions", "keys", "attributes"}
        assert to_float(b["images"]).shape == (len(b["keys"]), 3, 32, 32)
    assert sorted(keys(batches)) == [f"shapes/train/{i:06d}" for i in range(50)]
    if workers == 0:
        assert [len(b["keys"]) for b in batches] == [16, 16, 16, 2]
    assert ld.stats.seen == ld.stats.kept == 50 and ld.stats.skipped == 0


def test_batch_content_matches_the_source():
    cfg = DataConfig(size=8, resolution=32)
    batch = next(iter(make_loader(cfg, batch_size=8)))
    records = list(open_source(cfg).records())
    for i, r in enumerate(records):
        assert batch["keys"][i] == r.key and batch["captions"][i] == r.caption
        assert batch["attributes"][i] == r.attributes
        assert np.array_equal(batch["images"][i].numpy(), np.asarray(r.load()))


def test_drop_last_counts_the_dropped_samples():
    ld = make_loader(DataConfig(size=50, resolution=32), batch_size=16, drop_last=True)
    assert [len(b["keys"]) for b in ld] == [16, 16, 16]
    assert ld.stats.kept == 48 and ld.stats.reasons == {"incomplete last batch (drop_last)": 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_split_the_records(monkeypatch, workers):
    cfg = DataConfig(size=40, resolution=32)
    monkeypatch.setattr(loader_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loader_mod.dist, "get_world_size", lambda: 2)
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(loader_mod.dist, "get_rank", lambda rank=rank: rank)
        per_rank.append(keys(make_loader(cfg, batch_size=8, workers=workers)))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"shapes/train/{i:06d}" for i in range(40)]


def test_shuffle_is_seeded_and_changes_with_the_epoch():
    cfg = DataConfig(size=64, resolution=32)
    plain = keys(make_loader(cfg, batch_size=8))
    first = keys(make_loader(cfg, batch_size=8, shuffle=True, shuffle_buffer=16))
    assert sorted(first) == sorted(plain) and first != plain
    assert keys(make_loader(cfg, batch_size=8, shuffle=True, shuffle_buffer=16)) == first
    assert keys(make_loader(cfg, batch_size=8, shuffle=True, shuffle_buffer=16, start_epoch=1)) != first
    # With repeat, the second pass over the data comes in a new order.
    stream = iter(make_loader(cfg, batch_size=8, shuffle=True, shuffle_buffer=16, repeat=True))
    two_epochs = keys(next(stream) for _ in range(16))
    assert two_epochs[:64] == first and sorted(two_epochs[64:]) == sorted(plain) and two_epochs[64:] != first


def test_shuffle_buffer_keeps_every_record():
    out = list(shuffled(range(100), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


def test_random_crops_change_with_the_epoch():
    cfg = DataConfig(source="fake", resolution=16, crop="random")
    ld = make_loader(cfg, batch_size=4, repeat=True, source=FakeSource(4))
    stream = iter(ld)
    epoch0, epoch1 = next(stream), next(stream)
    assert epoch0["keys"] == epoch1["keys"]
    assert not torch.equal(epoch0["images"], epoch1["images"])
    again = next(iter(make_loader(cfg, batch_size=4, repeat=True, source=FakeSource(4))))
    assert torch.equal(again["images"], epoch0["images"])


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_reach_the_main_process(workers):
    src = FakeSource(30, bad=frozenset({1, 2, 5, 17}), no_caption=frozenset({8, 9, 20}))
    ld = make_loader(DataConfig(source="fake", resolution=16), batch_size=4, workers=workers, source=src)
    got = keys(ld)
    assert len(got) == 23
    assert ld.stats.seen == 30 and ld.stats.kept == 23
    assert ld.stats.reasons == {"corrupt image": 4, "empty caption": 3}
    assert set(ld.stats.examples["corrupt image"]) <= {"fake/0001", "fake/0002", "fake/0005", "fake/0017"}
    assert "23 of 30 records used, 7 skipped" in ld.stats.summary()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("repeat", [False, True])
def test_a_split_without_samples_is_a_user_error(workers, repeat):
    src = FakeSource(6, bad=frozenset(range(6)))
    ld = make_loader(DataConfig(source="fake", resolution=16), batch_size=4, workers=workers, repeat=repeat,
                     source=src)
    with pytest.raises(UserError, match=r"'fake' split 'train' yielded no usable sample.*6 × corrupt image"):
        list(ld)


def test_more_workers_than_records():
    ld = make_loader(DataConfig(size=1, resolution=32), batch_size=4, workers=2)
    assert keys(ld) == ["shapes/train/000000"]


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 2, "workers": -1},
                                    {"batch_size": 2, "shuffle": True, "shuffle_buffer": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(UserError):
        make_loader(DataConfig(size=4), **kwargs)


@dataclasses.dataclass
class CountingSource(FakeSource):
    """A FakeSource that counts how often each image is decoded (in this process: workers=0)."""

    loads: dict = dataclasses.field(default_factory=dict)

    def records(self, shard=0, num_shards=1):
        for record in super().records(shard, num_shards):
            i = record.attributes["i"]
            yield dataclasses.replace(record, load=functools.partial(self._load, record.load, i))

    def _load(self, load, i):
        self.loads[i] = self.loads.get(i, 0) + 1
        return load()


def _epochs(cfg, source, n_batches):
    stream = iter(make_loader(cfg, batch_size=5, shuffle=True, repeat=True, source=source))
    return [next(stream) for _ in range(n_batches)]


@pytest.mark.parametrize("crop", ["center", "random"])
def test_a_repeating_stream_decodes_each_image_once_and_yields_what_decoding_every_time_would(crop):
    cfg = DataConfig(resolution=24, crop=crop, seed=3)
    kept, fresh = CountingSource(20, bad=frozenset({7})), CountingSource(20, bad=frozenset({7}))
    with_memory = _epochs(cfg, kept, 15)  # 19 good records per epoch: about four epochs
    without = _epochs(dataclasses.replace(cfg, decoded_memory_mb=0), fresh, 15)
    assert keys(with_memory) == keys(without)
    for a, b in zip(with_memory, without):
        assert torch.equal(a["images"], b["images"])  # the same crops, drawn from the same random stream
    assert set(kept.loads.values()) == {1}  # the corrupt one too: its failure is remembered
    assert min(fresh.loads.values()) >= 3
    assert len({tuple(b["images"][0].flatten()[:64].tolist()) for b in with_memory}) > 1


def test_decoded_images_stop_being_kept_at_their_budget():
    from dalle.data.pipeline import DecodedImages

    memory = DecodedImages(max_bytes=2 * 24 * 24 * 3)
    for i in range(4):
        memory.put(f"k{i}", np.zeros((24, 24, 3), np.uint8))
    assert sorted(memory.images) == ["k0", "k1"] and memory.used == memory.max_bytes
    assert memory.get("k3") is None


def _gradient_folder(path, n):
    for i in range(n):
        gradient(i).save(path / f"g{i}.png")
        (path / f"g{i}.txt").write_text(f"gradient {i}")
    return DataConfig(source=str(path), resolution=16, val_fraction=0.0)


def _count_opens(monkeypatch, log):
    """Every image the user-folder source opens, in this process or a forked worker, as a line of ``log``."""
    from dalle.data import user

    def open_image(path, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{path}\n")
        return Image.open(path)

    monkeypatch.setattr(user, "open_image", open_image)
    return lambda: log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("workers", [0, 2])
def test_training_epochs_decode_each_image_once_per_run(tmp_path, monkeypatch, workers):
    from dalle.data.loader import TrainingEpochs, kept_images
    from dalle.data.records import SkipStats

    cfg = _gradient_folder(tmp_path, 6)
    opened = _count_opens(monkeypatch, tmp_path / "opened.log")

    def three_epochs(cfg):
        stats = SkipStats()
        epochs = TrainingEpochs(cfg, 3, workers)
        images = [b["images"] for epoch in (0, 1, 2) for b in epochs.epoch(epoch, stats)]
        assert stats.seen == stats.kept == 18
        return images

    kept = three_epochs(cfg)
    assert len(opened()) == 6  # the later epochs decoded nothing, in whichever process decoded the first
    fresh = three_epochs(dataclasses.replace(cfg, decoded_memory_mb=0))
    assert len(opened()) == 24 and all(torch.equal(a, b) for a, b in zip(kept, fresh, strict=True))
    assert kept_images(dataclasses.replace(cfg, decoded_memory_mb=0)) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_training_epochs_reopen_an_epoch_exactly(workers):
    """A resumed run re-opens its epoch after others were read or abandoned half-way: the same batches come back."""
    from dalle.data.loader import TrainingEpochs
    from dalle.data.records import SkipStats

    cfg = DataConfig(size=40, resolution=16, crop="random", seed=1)
    epochs = TrainingEpochs(cfg, 4, workers)
    stats = SkipStats()
    first = [(b["keys"], b["images"]) for b in epochs.epoch(0, stats)]
    half = epochs.epoch(1, stats)
    abandoned = [next(half) for _ in range(3)]
    again = [(b["keys"], b["images"]) for b in epochs.epoch(0, stats)]
    second = [(b["keys"], b["images"]) for b in epochs.epoch(1, stats)]
    assert [k for k, _ in first] == [k for k, _ in again] and all(torch.equal(a, b) for (_, a), (_, b) in
                                                                 zip(first, again, strict=True))
    assert [k for k, _ in second][:3] == [b["keys"] for b in abandoned] and [k for k, _ in second] != [k for k, _ in
                                                                                                     first]
    expected = [b["keys"] for b in make_loader(cfg, 4, workers, shuffle=True, drop_last=True, start_epoch=1)]
    assert [k for k, _ in second] == expected
    assert stats.kept >= 3 * 40 + 12
