import argparse
import csv
import dataclasses
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dalle.checkpoint import latest_checkpoint
from dalle.data.config import DataConfig
from dalle.errors import UserError
from dalle.models.dvae import DVAE, DVAEConfig
from dalle.training.code_restarts import CodeRestarts, split_codes
from dalle.training.config import TrainConfig, config_for_run, with_defaults
from dalle.training.dvae_task import DVAETask, DVAETrainConfig, DVAETrainLoopConfig, standardise_logits
from dalle.training.loop import Trainer

TINY = DVAEConfig(resolution=16, n_hid=8, n_blk_per_group=1, n_groups=2, codebook_size=32, n_init=8)
TIMING = {"step_s", "elapsed_s"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def make_trainer(out, task_cls=DVAETask, restart_every=2, **train):
    data = DataConfig(resolution=16, size=40)  # 5 batches of 8 per epoch: runs below cross epoch boundaries
    # Dead-code restarts every other update, so that resuming is checked with them too.
    dvae = DVAETrainConfig(eval_images=16, sample_images=4, restart_every=restart_every, restart_fraction=1.0)
    options = dict(out=out, steps=8, batch_size=8, lr=3e-3, log_every=1, eval_every=4, checkpoint_every=100,
                   progress=False, tensorboard=False)
    return Trainer(task_cls(dvae, data, TINY), TrainConfig(**{**options, **train}))


def rows(path, drop=TIMING):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def assert_same_run(a, b):
    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    for name in ("model", "ema", "optimizer"):
        ta, tb = load_file(ca / f"{name}.safetensors"), load_file(cb / f"{name}.safetensors")
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}.{k} differs"
    assert rows(a / "metrics.csv") == rows(b / "metrics.csv")
    assert rows(a / "eval.csv") == rows(b / "eval.csv")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = make_trainer(out).run()
    assert result.status == "complete" and result.step == 8
    return out, result


def test_run_writes_metrics_samples_and_the_ema_model(straight):
    out, result = straight
    assert {"psnr", "mse", "relaxed_elb", "true_elb", "elb_gap", "perplexity", "codes_used", "tau", "beta"} <= set(
        result.eval)
    assert result.eval["tau"] == pytest.approx(1 / 16, rel=1e-6) and result.eval["beta"] == pytest.approx(6.6)
    assert len(rows(out / "metrics.csv")) == 8 and [r["step"] for r in rows(out / "eval.csv")] == ["4", "8"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000004.png", "step-00000008.png"]
    model = DVAE.from_pretrained(out / "model")
    ema = latest_checkpoint(out)
    exported = model.state_dict()
    for k, v in load_file(ema / "ema.safetensors").items():
        assert torch.equal(exported[k], v)  # the export is the EMA, not the raw weights


@pytest.mark.parametrize("how", ["stop_at_step", "sigterm"])
def test_resume_is_exact(straight, tmp_path, how):
    out = tmp_path / "run"
    if how == "stop_at_step":
        first = make_trainer(out, stop_at_step=4).run()
        assert first.status == "stopped" and first.step == 4
    else:
        class Killed(DVAETask):
            def loss(self, model, batch, step):
                if step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # delivered mid-update: the update finishes first
                return super().loss(model, batch, step)

        first = make_trainer(out, task_cls=Killed).run()
        assert first.status == "interrupted" and first.step == 3
    assert latest_checkpoint(out).name == f"step-{first.step:08d}" and not (out / "model").exists()
    result = make_trainer(out, resume=True).run()
    assert result.status == "complete" and result.step == 8
    assert_same_run(straight[0], out)


def test_resume_is_exact_with_worker_processes(tmp_path):
    """The data-loading processes persist from epoch to epoch (each keeps the images it decoded); the epochs they
    serve are still those a resumed run re-opens."""
    straight = tmp_path / "straight"
    assert make_trainer(straight, workers=2).run().step == 8  # epochs 0 and 1 through the same two workers
    out = tmp_path / "run"
    assert make_trainer(out, workers=2, stop_at_step=4).run().status == "stopped"
    assert make_trainer(out, workers=2, resume=True).run().step == 8
    assert_same_run(straight, out)


def test_crash_between_updates_keeps_the_last_step(straight, tmp_path):
    class BadData(DVAETask):
        def train_batches(self, epoch):
            if epoch == 1:
                raise RuntimeError("disk on fire")
            return super().train_batches(epoch)

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_trainer(out, task_cls=BadData).run()
    assert latest_checkpoint(out).name == "step-00000005"  # one epoch = 5 updates, saved when epoch 1 failed
    make_trainer(out, resume=True).run()
    assert_same_run(straight[0], out)


def test_existing_run_needs_resume(straight):
    with pytest.raises(UserError, match="--resume"):
        make_trainer(straight[0]).run()


def test_training_reduces_the_loss(tmp_path):
    make_trainer(tmp_path / "run", restart_every=0, steps=40, eval_every=40, lr=3e-3).run()
    losses = [float(r["loss"]) for r in rows(tmp_path / "run" / "metrics.csv")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 100  # nats per 16×16 image


def test_training_with_the_gaussian_likelihood(tmp_path):
    out = tmp_path / "run"
    data = DataConfig(resolution=16, size=40)
    dvae = DVAETrainConfig(eval_images=16, sample_images=4, likelihood="gaussian", gaussian_sigma=0.2)
    cfg = TrainConfig(out=out, steps=30, batch_size=8, lr=3e-3, log_every=1, eval_every=30, checkpoint_every=100,
                      progress=False, tensorboard=False)
    Trainer(DVAETask(dvae, data, dvae.model_config(16)), cfg).run()
    losses = [float(r["loss"]) for r in rows(out / "metrics.csv")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 100
    model = DVAE.from_pretrained(out / "model")
    assert model.config.likelihood == "gaussian" and model.decoder.blocks.output.conv.n_out == 3
    (evaluation,) = rows(out / "eval.csv")
    assert 0 < float(evaluation["mse"]) < 1


@pytest.mark.parametrize("likelihood, beta, want", [("logit-laplace", None, 6.6), ("gaussian", None, 0.2),
                                                    ("gaussian", 3.0, 3.0), ("logit-laplace", 0.0, 0.0)])
def test_beta_defaults_to_the_likelihoods_own(likelihood, beta, want):
    dvae = DVAETrainConfig(likelihood=likelihood, beta=beta)
    task = DVAETask(dvae, DataConfig(resolution=16), dvae.model_config(16))
    task.setup(TrainConfig(steps=1000), torch.device("cpu"))  # the ramp's length scales with the run
    assert task.beta(0) == 0.0 and task.beta(1000) == pytest.approx(want)


def test_with_defaults_and_config_for_run():
    cls = with_defaults(TrainConfig, "Probe", lr=0.5, steps=7)
    assert cls().lr == 0.5 and cls().steps == 7 and isinstance(cls(), TrainConfig)
    assert DVAETrainLoopConfig().out.name == "dvae"
    args = argparse.Namespace(lr=0.25, workers=3)
    saved = dataclasses.asdict(TrainConfig(steps=99, lr=0.1, workers=1))
    saved["out"] = str(saved["out"])
    cfg = config_for_run(TrainConfig, args, saved)
    assert (cfg.steps, cfg.lr, cfg.workers) == (99, 0.25, 3)  # saved run options, then the ones given now


def test_vae_train_command(tmp_path):
    from dalle.cli import add_group
    from dalle.commands import vae_train

    parser = argparse.ArgumentParser()
    vae_train.register(add_group(parser.add_subparsers(), "vae", "dVAE"))
    out = tmp_path / "run"
    argv = ["vae", "train", "--preset", "tiny-32", "--n-hid", "8", "--codebook-size", "16", "--n-groups", "2",
            "--n-blk-per-group", "2", "--data-resolution", "16", "--data-size", "24", "--steps", "3",
            "--batch-size", "8", "--eval-every", "3", "--eval-images", "8", "--no-progress", "--no-tensorboard",
            "--out", str(out)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    model = DVAE.from_pretrained(out / "model")
    assert (model.config.resolution, model.config.codebook_size, model.config.n_hid) == (16, 16, 8)
    assert (model.config.n_groups, model.config.n_blk_per_group, model.config.grid_size) == (2, 2, 8)
    args = parser.parse_args(argv[:2] + ["--out", str(out), "--resume", "--steps", "5", "--no-progress"])
    assert args.func(args) == 0  # continues the saved run (its options) for two more updates
    assert [r["step"] for r in rows(out / "eval.csv")][-1] == "5"


def test_resume_keeps_the_saved_architecture_when_the_preset_changed(tmp_path):
    # A run saved before the likelihood field existed (its tiny-32 then had a logit-Laplace decoder) must resume with
    # that decoder, not with today's preset.
    from dalle.cli import main

    out = tmp_path / "run"
    argv = ["vae", "train", "--preset", "tiny-32", "--n-hid", "8", "--codebook-size", "16", "--data-resolution", "16",
            "--data-size", "24", "--batch-size", "8", "--eval-every", "2", "--eval-images", "8", "--no-progress",
            "--no-tensorboard", "--threads", "1", "--out", str(out)]
    assert main(argv + ["--steps", "2", "--likelihood", "logit-laplace"]) == 0
    path = latest_checkpoint(out) / "config.json"  # what --resume reads
    saved = json.loads(path.read_text())
    del saved["task"]["model"]["likelihood"], saved["task"]["dvae"]["likelihood"]
    path.write_text(json.dumps(saved))
    assert main(argv + ["--steps", "4", "--resume"]) == 0
    assert DVAE.from_pretrained(out / "model").config.likelihood == "logit-laplace"
    assert [r["step"] for r in rows(out / "eval.csv")][-1] == "4"


@pytest.mark.parametrize("target_std", [1.0, 3.0])
def test_data_dependent_init_standardises_each_code(target_std):
    torch.manual_seed(0)
    model = DVAE(DVAEConfig(resolution=32, n_hid=8, n_blk_per_group=1, codebook_size=16))
    x = torch.rand(8, 3, 32, 32) * 0.8 + 0.1
    standardise_logits(model.encoder, x, target_std)
    logits = model.encoder(x)  # (N, K, g, g)
    torch.testing.assert_close(logits.mean((0, 2, 3)), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.std((0, 2, 3)), torch.full((16,), target_std), atol=1e-3, rtol=1e-3)


def test_dead_codes_are_restarted_as_halves_of_busy_ones():
    torch.manual_seed(0)
    model = DVAE(TINY)
    x = torch.rand(8, 3, 16, 16) * 0.8 + 0.1
    with torch.no_grad():
        model.encoder.blocks.output.conv.b[0] = 1e3  # a collapsed codebook: code 0 everywhere
    assert set(model.encoder(x).argmax(1).unique().tolist()) == {0}
    before = model.decoder.blocks.input.w.detach().clone()
    made = split_codes(model.encoder, model.decoder, x, 4, torch.Generator().manual_seed(0))
    codes = model.encoder(x).argmax(1)
    assert made == 4 and len(codes.unique()) >= 4  # new codes took positions from code 0 (a later split may take
    # all of an earlier one's, as in k-means)
    after = model.decoder.blocks.input.w
    changed = [k for k in range(TINY.codebook_size) if not torch.equal(after[:, k], before[:, k])]
    assert len(changed) == 4 and set(codes.unique().tolist()) <= {0, *changed}
    for k in changed:  # the decoder reads a new code as the code it was split from (all descend from code 0)
        torch.testing.assert_close(model.decoder.blocks.input.w[:, k], before[:, 0])
    restarts = CodeRestarts(x, every=3, until_step=7, max_per_check=2)
    assert [s for s in range(10) if restarts.due(s)] == [3, 6]


def test_the_decoder_learns_at_a_multiple_of_the_rate(tmp_path):
    trainer = make_trainer(tmp_path / "run", steps=2, lr=1e-3, lr_min=1e-3)
    trainer.run()
    encoder, decoder = trainer.opt.param_groups
    assert encoder["lr"] == pytest.approx(1e-3) and decoder["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in decoder["params"]} == {id(p) for p in trainer.model.decoder.parameters()}


class _Clock:
    """A stand-in for time.perf_counter that moves only when a training update runs (1 s each)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _timed(task_cls, clock, seconds_per_update=1.0, first_updates=()):
    """``task_cls`` whose updates take ``seconds_per_update`` on ``clock``, the first ones ``first_updates``."""
    class Timed(task_cls):
        calls = 0

        def loss(self, model, batch, step):
            slow = self.calls < len(first_updates)
            clock.now += first_updates[self.calls] if slow else seconds_per_update
            self.calls += 1
            return super().loss(model, batch, step)
    return Timed


def test_time_limit_measures_the_speed_after_the_first_updates(tmp_path, monkeypatch):
    import dalle.training.loop as loop

    clock = _Clock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    task = _timed(DVAETask, clock, first_updates=(5.0, 5.0, 5.0))  # start-up: three slow updates, then 1 s each
    trainer = make_trainer(tmp_path / "run", task, restart_every=0, steps=80, eval_every=1000, time_limit=60.0)
    # After 10 updates 22 s are spent and 38 s left, at 1 s per update (not the 2.2 s of the first ten): 37 more fit,
    # and every later plan agrees, so the schedules never change on the way.
    assert trainer.run().step == 47


def test_time_limit_waits_for_the_speed_to_settle_before_cutting_the_run(tmp_path, monkeypatch):
    import dalle.training.loop as loop

    clock = _Clock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    monkeypatch.setattr(loop, "PLAN_SETTLE", 20)
    monkeypatch.setattr(loop, "PLAN_SETTLE_FRACTION", 0.5)
    # A slow start that outlasts PLAN_AFTER: 12 updates of 1.5 s, then 1 s each, 86 s for all 80 within 100 s. Planned
    # from the first ten the run would be cut to 65 updates (and restored later, its schedules changed on the way).
    task = _timed(DVAETask, clock, first_updates=(1.5,) * 12)
    plans = []
    task.set_steps = lambda self, steps, _set=task.set_steps: (plans.append(steps), _set(self, steps))[1]
    trainer = make_trainer(tmp_path / "run", task, restart_every=0, steps=80, eval_every=1000, time_limit=100.0)
    assert trainer.run().step == 80 and plans == []


@pytest.mark.parametrize("limit, expected", [(60.0, 59), (10_000.0, 80)])
def test_time_limit_lays_the_run_out_over_the_updates_that_fit(tmp_path, monkeypatch, limit, expected):
    import dalle.training.loop as loop

    clock = _Clock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    out = tmp_path / "run"
    trainer = make_trainer(out, _timed(DVAETask, clock), restart_every=0, steps=80, eval_every=1000,
                           time_limit=limit)
    result = trainer.run()
    # 10 updates of 1 s measured (from the 3rd), 50 s left: 49 more fit (2% kept in reserve); a limit that does not
    # bind leaves --steps as given.
    assert result.status == "complete" and result.step == expected
    saved = json.loads((latest_checkpoint(out) / "config.json").read_text())
    assert saved["train"]["steps"] == expected and saved["train"]["time_limit"] == limit
    # Every schedule ends where it would in a run of --steps N: the learning rate at its minimum, τ annealed.
    last = rows(out / "metrics.csv")[-1]
    assert int(last["step"]) == expected
    assert trainer.task.cfg.steps == expected
    assert trainer.task.tau(expected) == pytest.approx(trainer.task.dvae.tau_end)
    assert float(last["lr"]) == pytest.approx(loop.learning_rate(expected - 1, expected, 3e-3, 1e-5), rel=1e-6)
