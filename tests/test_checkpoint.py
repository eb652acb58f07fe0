import random

import numpy as np
import pytest
import torch

from dalle import checkpoint as ck
from dalle.errors import UserError


def test_model_dir_round_trip(tmp_path):
    sd = {"a.w": torch.randn(3, 4), "a.b": torch.zeros(4)}
    ck.save_model_dir(tmp_path / "m", {"dim": 4}, sd, extra_files={"note.txt": "hi"})
    config, loaded = ck.load_model_dir(tmp_path / "m")
    assert config == {"dim": 4}
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert (tmp_path / "m" / "note.txt").read_text() == "hi"


def test_interrupted_save_keeps_previous(tmp_path):
    target = tmp_path / "m"
    ck.save_model_dir(target, {"v": 1}, {"x": torch.ones(2)})
    with pytest.raises(RuntimeError), ck.atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"v": 2}')
        raise RuntimeError("killed mid-save")
    assert ck.load_model_dir(target)[0] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind


def test_crash_between_renames_is_recovered(tmp_path):
    target = tmp_path / "m"
    ck.save_model_dir(target, {"v": 1}, {"x": torch.ones(2)})
    target.rename(tmp_path / ".m.old")  # the state a kill between the two renames leaves
    assert ck.load_model_dir(target)[0] == {"v": 1}


def test_corrupt_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        ck.load_model_dir(tmp_path / "nope")
    ck.save_model_dir(tmp_path / "m", {"v": 1}, {"x": torch.ones(2)})
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt weights"):
        ck.load_model_dir(tmp_path / "m")


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = ck.optimizer_to_tensors(opt.state_dict())
    restored = ck.optimizer_from_tensors(tensors, meta)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(restored)
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(opt2.state[p][k], v)


def test_rng_state_round_trip():
    tensors, meta = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(tensors, meta)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_training_checkpoints_latest_and_prune(tmp_path):
    for step in (10, 20, 30):
        ck.save_checkpoint(tmp_path, step, config={"c": 1}, tensors={"model": {"w": torch.full((2,), step)}},
                           state={"data_position": step * 4}, keep=2)
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000030"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000020", "step-00000030"]
    config, tensors, state = ck.load_checkpoint(latest)
    assert state == {"step": 30, "data_position": 120} and tensors["model"]["w"][0] == 30
    # A pointer to a half-written directory falls back to the newest complete one.
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")
    assert ck.latest_checkpoint(tmp_path).name == "step-00000030"
    assert ck.latest_checkpoint(tmp_path / "empty") is None
