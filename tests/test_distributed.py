"""Training on several processes: 2 CPU processes with the gloo backend against single-process runs on the same
global batches, checkpoints moving between process counts, data sharding, and PowerSGD's compression figures.

The 2-process runs share one spawn (module fixture ``two_process_runs``): each job is a full ``Trainer.run`` of a small
prior in both processes, and the tests compare the losses rank 0 logged with those of single-process runs here.
"""

import csv
import os
import socket
import tarfile
import traceback
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import shapes_tokenizer
from dalle.data.config import DataConfig
from dalle.data.loader import data_ranks, make_loader, whole_data
from dalle.data.token_cache import TokenCache, cache_batches, encode_dataset
from dalle.errors import UserError
from dalle.models.dvae import DVAE, preset
from dalle.models.transformer import PRESETS, PriorTransformer
from dalle.training.config import TrainConfig
from dalle.training.distributed import Processes, powersgd_compression, powersgd_elements
from dalle.training.loop import EpochStream, Trainer
from dalle.training.prior_task import PriorTask, PriorTrainConfig

SMALL = dict(dim=32, n_layers=2, n_heads=2, head_dim=16)
STEPS = 4


# --- a token cache and a tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    shapes_tokenizer(text_len=12).save(root / "tokenizer")
    torch.manual_seed(0)
    DVAE(preset("tiny-32")).save_pretrained(root / "dvae")
    dvae = DVAE.from_pretrained(root / "dvae")
    for split, size in (("train", 64), ("val", 16)):
        encode_dataset(dvae, root / "dvae", DataConfig(resolution=32, size=size, split=split), root / split,
                       batch_size=32, progress=False)
    return root


def prior_config(files):
    return PriorTrainConfig(cache=files / "train", val_cache=files / "val", tokenizer=files / "tokenizer",
                            bpe_dropout=0.0, eval_examples=16, **SMALL)


def train_config(out, **kw):
    options = dict(out=out, steps=STEPS, batch_size=8, lr=3e-3, adam_betas=(0.9, 0.96), weight_decay=4.5e-2,
                   grad_clip=4.0, warmup_fraction=0.25, log_every=1, eval_every=STEPS, checkpoint_every=2,
                   progress=False, tensorboard=False, device="cpu", threads=1, ema_warmup=True,
                   amp="none")  # fp32 on every machine: the spawned processes do not see the tests' own `auto`
    return TrainConfig(**{**options, **kw})


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def column(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


# --- two processes -----------------------------------------------------------------------------------------------

# name → (TrainConfig overrides, run directory to copy a checkpoint from before starting or None)
JOBS = {
    "ddp": (dict(grad_accum=2), None),
    "powersgd": (dict(powersgd_rank=1, powersgd_start=2), None),
    "powersgd_16bit": (dict(powersgd_rank=1, powersgd_start=2, powersgd_16bit=True), None),
    "fsdp": (dict(parallel="fsdp", meta_init=False, grad_accum=2), None),
    "fsdp_stopped": (dict(parallel="fsdp", meta_init=False, stop_at_step=2), None),
    "fsdp_resumed": (dict(parallel="fsdp", meta_init=False, resume=True), "single_stopped"),
    "fsdp_meta": (dict(parallel="fsdp", steps=2), None),
    "hsdp": (dict(parallel="fsdp", meta_init=False, fsdp_shard_size=1), None),  # 2 replicas of 1 shard
    # fp16 compute copies of the sharded weights, a gradient scale per block, activations recomputed.
    "fsdp_fp16": (dict(parallel="fsdp", meta_init=False, amp="fp16", activation_checkpointing=True), None),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, files: Path, out: Path) -> None:
    import datetime
    import shutil

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # A job that fails in one process leaves the other waiting in a collective: fail fast instead of in 60 minutes.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    _contrastive_share(rank, world, out)
    for name, (overrides, start_from) in JOBS.items():
        try:
            if start_from is not None and rank == 0:
                shutil.copytree(out / start_from, out / name)
            dist.barrier()
            Trainer(PriorTask(prior_config(files)), train_config(out / name, **overrides)).run()
        except Exception:
            (out / f"{name}.rank{rank}.error").write_text(traceback.format_exc())
            raise
    dist.destroy_process_group()


def _embeddings(n: int = 8, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(5)
    image, text = (F.normalize(torch.randn(n, dim, generator=g), dim=1) for _ in range(2))
    return image, text, [f"caption {i % 3}" for i in range(n)]  # repeated captions: several positives per row


def _contrastive_share(rank: int, world: int, out: Path) -> None:
    """The reranker's loss on this process's half of a batch, gathered (reranker_task.py), and its gradient."""
    from dalle.training.distributed import gather_batch, gather_list
    from dalle.training.reranker_task import caption_positives, contrastive_loss

    image, text, captions = _embeddings()
    share = slice(rank * len(captions) // world, (rank + 1) * len(captions) // world)
    mine = image[share].clone().requires_grad_(True)
    all_captions = gather_list(captions[share])
    loss = contrastive_loss(gather_batch(mine), gather_batch(text[share]), 10.0, caption_positives(all_captions))[0]
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine.grad, "captions": all_captions}, out / f"contrastive{rank}.pt")


@pytest.fixture(scope="module")
def two_process_runs(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    # The single-process checkpoint that the "fsdp_resumed" job continues on two processes.
    Trainer(PriorTask(prior_config(files)), train_config(out / "single_stopped", stop_at_step=2)).run()
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), files, out), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def single_runs(files, tmp_path_factory):
    """Single-process references, keyed like the jobs they are compared with."""
    out = tmp_path_factory.mktemp("single")
    for name, overrides in (("plain", {}), ("accum", dict(grad_accum=2))):
        Trainer(PriorTask(prior_config(files)), train_config(out / name, **overrides)).run()
    return out


def test_contrastive_loss_gathered_over_processes_is_the_whole_batch_loss(two_process_runs):
    from dalle.training.reranker_task import caption_positives, contrastive_loss

    image, text, captions = _embeddings()
    image.requires_grad_(True)
    loss = contrastive_loss(image, text, 10.0, caption_positives(captions))[0]
    loss.backward()
    parts = [torch.load(two_process_runs / f"contrastive{r}.pt", weights_only=True) for r in range(2)]
    for rank, part in enumerate(parts):
        assert part["captions"] == captions
        torch.testing.assert_close(part["loss"], loss.detach())
        # Every process backpropagates the same loss, so its rows get 2× their gradient; DDP's mean halves it.
        torch.testing.assert_close(part["grad"] / 2, image.grad[rank * 4:(rank + 1) * 4])


def test_ddp_matches_one_process_on_the_same_global_batches(two_process_runs, single_runs):
    # Each process takes 4 of the 8 examples of every micro-batch, and 2 micro-batches are accumulated.
    assert losses(two_process_runs / "ddp") == pytest.approx(losses(single_runs / "accum"), rel=1e-5)
    assert (two_process_runs / "ddp" / "model" / "model.safetensors").is_file()


def test_fsdp_matches_one_process(two_process_runs, single_runs):
    assert losses(two_process_runs / "fsdp") == pytest.approx(losses(single_runs / "accum"), rel=1e-5)
    exported = PriorTransformer.from_pretrained(two_process_runs / "fsdp" / "model")
    reference = PriorTransformer.from_pretrained(single_runs / "accum" / "model")
    for (name, a), b in zip(exported.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_powersgd_is_plain_until_it_starts_then_close_and_compressing(two_process_runs, single_runs):
    got, want = losses(two_process_runs / "powersgd"), losses(single_runs / "plain")
    # Updates 1 and 2 use plain all-reduce: the losses after them (logged at steps 2 and 3) are the same.
    assert got[:3] == pytest.approx(want[:3], rel=1e-5)
    assert got[3] == pytest.approx(want[3], rel=0.05) and got[3] != pytest.approx(want[3], rel=1e-7)
    saving = column(two_process_runs / "powersgd", "powersgd_saving")
    assert saving and 0.5 < saving[-1] < 1.0  # rank-1 factors of the weight matrices instead of the matrices
    # The same in bf16 (factors, error buffers and the uncompressed vectors): half the bytes again.
    half = losses(two_process_runs / "powersgd_16bit")
    assert half[:3] == pytest.approx(want[:3], rel=1e-2) and half[3] == pytest.approx(want[3], rel=0.05)
    assert column(two_process_runs / "powersgd_16bit", "powersgd_saving")[-1] == pytest.approx(
        1 - (1 - saving[-1]) / 2)


def test_hsdp_replicas_match_one_process(two_process_runs, single_runs):
    assert losses(two_process_runs / "hsdp") == pytest.approx(losses(single_runs / "plain"), rel=1e-5)


def test_fsdp_fp16_with_block_scales_trains(two_process_runs, single_runs):
    run, fp32 = losses(two_process_runs / "fsdp_fp16"), losses(single_runs / "plain")
    assert run[0] == pytest.approx(fp32[0], rel=2e-3)  # the same weights, computed in fp16
    # Early overflows skip updates and lower the scales (dynamic scaling); the others make progress.
    assert all(np.isfinite(run)) and run[-1] < run[0]
    assert sum(column(two_process_runs / "fsdp_fp16", "skipped_updates")) < STEPS


def test_checkpoint_of_two_fsdp_processes_resumes_on_one(two_process_runs, single_runs, files):
    run = two_process_runs / "fsdp_stopped"
    Trainer(PriorTask(prior_config(files)), train_config(run, resume=True)).run()
    assert losses(run) == pytest.approx(losses(single_runs / "plain"), rel=1e-5)


def test_checkpoint_of_one_process_resumes_on_two_fsdp_processes(two_process_runs, single_runs):
    assert losses(two_process_runs / "fsdp_resumed") == pytest.approx(losses(single_runs / "plain"), rel=1e-5)


def test_fsdp_meta_init_starts_from_the_models_own_initialisation(two_process_runs):
    run = two_process_runs / "fsdp_meta"
    assert all(np.isfinite(losses(run)))
    model = PriorTransformer.from_pretrained(run / "model")
    qkv = model.blocks[0].attn.qkv.weight
    half = qkv.shape[0] // 2  # each process initialised one half: they must not be copies of each other
    assert not torch.allclose(qkv[:half], qkv[half:])
    assert 0.01 < float(qkv.detach().std()) < 0.04  # init_std 0.02 plus two updates


# --- single-process pieces ---------------------------------------------------------------------------------------


def test_single_process_needs_no_process_group():
    procs = Processes.from_env(torch.device("cpu"))
    assert (procs.rank, procs.world_size, procs.enabled) == (0, 1, False)
    assert procs.mean({"loss": 2.0}) == {"loss": 2.0} and procs.local_batch_size(7) == 7


def test_batch_size_must_split_evenly_between_processes():
    with pytest.raises(UserError, match="not divisible by the 4 processes"):
        Processes(world_size=4).local_batch_size(30)
    assert Processes(world_size=4).local_batch_size(32) == 8


def test_powersgd_needs_ddp():
    with pytest.raises(UserError, match="powersgd_rank"):
        TrainConfig(parallel="fsdp", powersgd_rank=4)


def test_token_cache_ranks_together_see_the_single_process_batches(files):
    cache = TokenCache(files / "train")
    whole = [set(b["indices"].tolist()) for b in cache_batches(cache, 8, seed=3, epoch=1)]
    shares = []
    for rank in range(2):
        with data_ranks(rank, 2):
            shares.append([set(b["indices"].tolist()) for b in cache_batches(cache, 4, seed=3, epoch=1)])
    assert len(shares[0]) == len(shares[1]) == len(whole)
    for i, batch in enumerate(whole):
        assert shares[0][i] | shares[1][i] == batch and not shares[0][i] & shares[1][i]
    with data_ranks(1, 2), whole_data():  # evaluation on rank 0 reads everything
        assert [set(b["indices"].tolist()) for b in cache_batches(cache, 8, seed=3, epoch=1)] == whole


def _write_shards(root: Path, n_shards: int, per_shard: int) -> None:
    for s in range(n_shards):
        with tarfile.open(root / f"data-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = BytesIO()
                Image.new("RGB", (16, 16), (10 * s, 20 * i, 0)).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"shard {s} image {i}".encode())):
                    info = tarfile.TarInfo(f"{s:03d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))


@pytest.mark.parametrize("n_shards", [8, 3])  # whole shards per rank / every shard read, every other sample kept
def test_webdataset_shards_are_split_between_ranks(tmp_path, n_shards):
    _write_shards(tmp_path, n_shards, 4)
    cfg = DataConfig(source=str(tmp_path), resolution=16, val_fraction=0.0)
    keys = []
    for rank in range(2):
        with data_ranks(rank, 2):
            keys.append([k for b in make_loader(cfg, batch_size=2) for k in b["keys"]])
    assert not set(keys[0]) & set(keys[1])
    assert len(keys[0]) + len(keys[1]) == 4 * n_shards


def test_epoch_ends_for_every_process_when_the_first_runs_out():
    # This process has 3 batches per epoch; another one runs out after 2, so both move to the next epoch together.
    others_ended = iter([False, False, True, False])
    stream = EpochStream(lambda epoch: iter([(epoch, i) for i in range(3)]),
                         any_process=lambda ended: ended or next(others_ended))
    assert [next(stream), next(stream), next(stream)] == [(0, 0), (0, 1), (1, 0)]
    assert stream.position() == {"epoch": 1, "batch": 1}


# --- PowerSGD's compression in the paper's table (§2.5) ---------------------------------------------------------


def test_powersgd_elements_follow_torchs_hook():
    assert powersgd_elements((64,), 4) == (64, 64)  # vectors are sent whole
    assert powersgd_elements((256, 64), 4) == (256 * 64, 4 * (256 + 64))
    assert powersgd_elements((8, 8), 4) == (64, 64)  # factors would be no smaller: sent whole
    assert powersgd_elements((16, 3, 3, 3), 2) == (16 * 27, 2 * (16 + 27))  # first dimension × the rest


@pytest.mark.parametrize("name, rank, paper, whole_model", [("paper-2.8b", 512, 0.833, 0.804),
                                                            ("paper-5.6b", 640, 0.851, 0.841),
                                                            ("paper-12b", 896, 0.859, 0.849)])
def test_powersgd_compression_of_the_paper_presets(name, rank, paper, whole_model):
    with torch.device("meta"):
        model = PriorTransformer(PRESETS[name])
    # The paper's figures are those of the d_model × 4·d_model MLP matrices, 16-bit factors vs 32-bit gradients.
    mlp = [p.shape for n, p in model.named_parameters() if ".mlp." in n]
    assert {tuple(s) for s in mlp} == {(4 * model.config.dim, model.config.dim), (model.config.dim,
                                                                                 4 * model.config.dim)}
    assert powersgd_compression(mlp, rank) == pytest.approx(paper, abs=5e-4)
    # Over every parameter (attention d × 3d and d × d, embeddings, heads, vectors) it is lower.
    everything = powersgd_compression([p.shape for p in model.parameters()], rank)
    assert everything == pytest.approx(whole_model, abs=5e-4) and everything < paper


def test_gather_helpers_are_identities_in_one_process():
    from dalle.training.distributed import gather_batch, gather_list

    x = torch.randn(3, 2, requires_grad=True)
    assert gather_batch(x) is x and gather_list(["a", "b"]) == ["a", "b"]
