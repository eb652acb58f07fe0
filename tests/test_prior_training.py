import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import shapes_tokenizer
from dalle.cli import main
from dalle.data.config import DataConfig
from dalle.data.token_cache import cache_batches, encode_dataset
from dalle.errors import UserError
from dalle.models.dvae import DVAE, preset
from dalle.models.transformer import PriorTransformer
from dalle.tokenizers.text import TextTokenizer
from dalle.training.config import TrainConfig
from dalle.training.loop import Trainer
from dalle.training.prior_task import PriorTask, PriorTrainConfig, sample_codes

# A prior small enough for a few dozen CPU steps per second; grid and codebook come from the cache (8x8 of 512).
SMALL = dict(dim=32, n_layers=2, n_heads=2, head_dim=16)
SMALL_ARGS = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--head-dim", "16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tokenizer, a random tiny-32 dVAE and token caches of 48 train and 16 val shapes records."""
    root = tmp_path_factory.mktemp("prior")
    tok = shapes_tokenizer(records=500, text_len=16)
    tok.save(root / "tokenizer")
    torch.manual_seed(0)
    DVAE(preset("tiny-32")).save_pretrained(root / "dvae")
    dvae = DVAE.from_pretrained(root / "dvae")
    for split, size in (("train", 48), ("val", 16)):
        data = DataConfig(resolution=32, size=size, split=split)
        encode_dataset(dvae, root / "dvae", data, root / split, batch_size=16, progress=False)
    return root


def prior_config(files, **kw):
    options = dict(cache=files / "train", val_cache=files / "val", tokenizer=files / "tokenizer", bpe_dropout=0.0,
                   eval_examples=16, **SMALL)
    return PriorTrainConfig(**{**options, **kw})


def train_config(out, **kw):
    options = dict(out=out, steps=4, batch_size=8, lr=3e-3, adam_betas=(0.9, 0.96), weight_decay=4.5e-2,
                   grad_clip=4.0, warmup_fraction=0.2, log_every=1, eval_every=2, checkpoint_every=2, progress=False,
                   tensorboard=False, device="cpu")
    return TrainConfig(**{**options, **kw})


def test_model_sizes_come_from_tokenizer_and_cache(files):
    task = PriorTask(prior_config(files))
    cfg = task.model_cfg
    assert (cfg.text_len, cfg.text_vocab_size) == (16, task.tokenizer.vocab_size)
    assert (cfg.grid_size, cfg.codebook_size) == (8, 512) and cfg.dim == 32


def test_loss_decreases_on_a_fixed_batch(files):
    task = PriorTask(prior_config(files))
    task.setup(train_config(files / "unused", lr=3e-3), torch.device("cpu"))
    model = task.build_model()
    opt = task.optimizer(model)
    batch = next(iter(cache_batches(task.cache, 4, shuffle=False)))
    losses = []
    for step in range(30):
        loss, metrics = task.loss(model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert set(metrics) == {"text_loss", "image_loss"}
    assert losses[-1] < 0.5 * losses[0]


def test_weight_decay_only_on_linear_weights(files):
    task = PriorTask(prior_config(files))
    task.setup(train_config(files / "unused"), torch.device("cpu"))
    model = task.build_model()
    opt = task.optimizer(model)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert [g["weight_decay"] for g in opt.param_groups] == [4.5e-2, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.96) and opt.defaults["eps"] == 1e-8
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert names == linear
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for name in ("text_emb.weight", "image_emb.weight", "text_pad", "text_pos", "image_row", "image_boi",
                 "ln_f.weight", "ln_f.bias", "blocks.0.ln_1.weight", "blocks.0.ln_1.bias"):
        assert name not in names


@pytest.mark.parametrize("bpe_dropout", [0.0, 0.3])  # BPE dropout's draws are seeded per update and record
def test_resume_is_exact(files, tmp_path, bpe_dropout):
    prior = prior_config(files, bpe_dropout=bpe_dropout)
    straight = Trainer(PriorTask(prior), train_config(tmp_path / "a")).run()
    first = Trainer(PriorTask(prior), train_config(tmp_path / "b", stop_at_step=2)).run()
    assert first.status == "stopped" and first.model_dir is None
    resumed = Trainer(PriorTask(prior), train_config(tmp_path / "b", resume=True)).run()
    assert straight.status == resumed.status == "complete"
    a, b = load_file(straight.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.eval == resumed.eval


def test_sampler_gives_codes_and_respects_top_k(files):
    torch.manual_seed(0)
    model = PriorTransformer(PriorTask(prior_config(files)).model_cfg).eval()
    tok = TextTokenizer.load(files / "tokenizer")
    ids, pad_mask = tok.encode_batch(["a red circle", "a blue square"])
    codes = sample_codes(model, ids, pad_mask, top_k=1)  # top-1 = greedy: must follow the argmax at every cell
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    logits = model(ids, pad_mask, codes).image  # (2, 64, 512): teacher-forced on the sampled codes
    assert torch.equal(logits.argmax(-1), codes.flatten(1))


def test_cli_end_to_end(files, tmp_path, capsys, device):
    out = tmp_path / "run"
    amp = ["--amp", "bf16"] if device.type == "cuda" else []
    rc = main(["train", "--cache", str(files / "train"), "--val-cache", str(files / "val"), "--tokenizer",
               str(files / "tokenizer"), "--dvae", str(files / "dvae"), "--out", str(out), "--steps", "4",
               "--batch-size", "8", "--eval-every", "4", "--log-every", "2", "--sample-captions", "2",
               "--top-k", "20", "--no-progress", "--no-tensorboard", "--device", str(device), *amp, *SMALL_ARGS])
    assert rc == 0
    assert "image loss" in capsys.readouterr().out
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["kind"] == "prior" and config["text_len"] == 16 and config["grid_size"] == 8
    model = PriorTransformer.from_pretrained(out / "model")
    assert TextTokenizer.load(out / "model").vocab_size == model.config.text_vocab_size
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["text_loss"]) > 0 and float(r["image_loss"]) > 0 for r in rows)
    with open(out / "eval.csv") as f:
        assert float(next(csv.DictReader(f))["image_loss"]) > 0
    assert (out / "samples" / "step-00000004.png").is_file()
    assert len((out / "samples" / "step-00000004.txt").read_text().splitlines()) == 2


def test_cli_bad_input(files, tmp_path, capsys):
    base = ["train", "--tokenizer", str(files / "tokenizer"), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*base, "--cache", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--cache", str(files / "train"), "--preset", "test"]) == 2
    assert "leave out --preset" in capsys.readouterr().err
    assert main(["train", "--cache", str(files / "train"), "--tokenizer", str(tmp_path)]) == 2
    assert "no text tokenizer" in capsys.readouterr().err
    assert main(["train", "--cache", str(files / "train")]) == 2
    assert "--tokenizer" in capsys.readouterr().err



def test_attention_schedule_is_an_option(files):
    task = PriorTask(prior_config(files, attn_schedule="dense,row"))
    assert [b.attn.kind for b in task.build_model().blocks] == ["dense", "row"]
    with pytest.raises(UserError, match="attn_schedule"):
        PriorTask(prior_config(files, attn_schedule="diagonal"))


@pytest.mark.slow  # compiling takes about a minute on 2 CPU cores
def test_compiled_blocks_train_and_save_under_the_model_names(files, tmp_path):
    task = PriorTask(prior_config(files, compile=True))
    result = Trainer(task, train_config(tmp_path / "run", steps=2, eval_every=2, checkpoint_every=2)).run()
    assert result.step == 2
    names = set(load_file(tmp_path / "run" / "model" / "model.safetensors"))
    assert names == set(PriorTransformer(task.model_cfg).state_dict())
