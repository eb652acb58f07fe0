"""The contrastive reranker as a :class:`~dalle.training.loop.Task`: CLIP's recipe on our own captioned images.

Loss: symmetric InfoNCE (Radford et al. 2021) — over a batch of B (image, caption) pairs, the B × B matrix of scaled
cosine similarities is read as B image→text classifications (rows) and B text→image classifications (columns), and the
two cross-entropies are averaged. Plain InfoNCE assumes each image matches only its own caption. Shapes captions
repeat ("a small red circle in the center" is drawn many times), so a batch can hold two images with the same caption;
plain InfoNCE would push each away from the other's (identical, equally correct) caption. With ``multi_positive`` every
caption equal to the image's own (after the tokenizer's normalisation) is a positive: the target of a row is uniform
over its equal-caption columns (soft targets). The loss then has a floor above zero for such rows (the entropy of the
target), which is fine: only its gradient matters. Paraphrases ("A above B" vs "B below A") stay negatives.

Evaluation (EMA weights) on a fixed set of ``eval_pairs`` validation pairs: image→text and text→image retrieval
top-1/top-5 over the whole set, where a retrieved caption (or image) counts as correct when its caption text equals
the query's (captions repeat, so any of the equal ones is right), the chance level of the same rule, and the mean
contrastive score of matched and of mismatched (different-caption) pairs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dalle.config import check, option, to_dict
from dalle.data.config import DataConfig
from dalle.data.loader import TrainingEpochs, make_loader
from dalle.data.records import SkipStats
from dalle.data.transforms import to_float
from dalle.errors import UserError
from dalle.models.reranker import PRESETS, ContrastiveModel, Reranker, RerankerConfig, ResBlock, TextBlock
from dalle.tokenizers.text import TextTokenizer
from dalle.training.config import TrainConfig, with_defaults
from dalle.training.distributed import gather_batch, gather_list
from dalle.training.loop import Task

TOP_K = (1, 5)

# Defaults of `dalle reranker train`: the tiny preset on 64-pixel shapes, a few minutes on 2 CPU cores. AdamW with
# decoupled weight decay 0.1 and a short warm-up, as CLIP trains (its 0.2 decay and 2k-step warm-up are for 32 epochs
# of 400M pairs). The learning rate matters most: at the start every image (mostly white background) and every caption
# embed almost alike, and from 2e-3 up Adam's steps often collapse both towers to constant embeddings instead (loss
# stuck at ln B; 4 of 6 seeds at 3e-3 in the test configuration, and slow starts at 2e-3); 1e-3 and 5e-4 never did.
RerankerTrainLoopConfig = with_defaults(TrainConfig, "RerankerTrainLoopConfig", out=Path("runs/reranker"), steps=1000,
                                        batch_size=64, lr=1e-3, lr_min=1e-5, warmup_fraction=0.05, weight_decay=0.1,
                                        eval_every=250, checkpoint_every=250, log_every=25)


@dataclasses.dataclass
class RerankerTrainConfig:
    tokenizer: Path | None = option(None, "text tokenizer directory written by `dalle tokenizer train` (required)")
    preset: str = option("tiny", "reranker architecture preset", choices=tuple(PRESETS))
    image_width: int | None = option(None, "channels of the first image stage (default: the preset's)")
    image_depth: int | None = option(None, "residual blocks per image stage (default: the preset's)")
    text_dim: int | None = option(None, "width of the text transformer (default: the preset's)")
    text_n_layers: int | None = option(None, "text transformer blocks (default: the preset's)")
    text_len: int | None = option(None, "text positions read (default: the preset's, at most the tokenizer's)")
    embed_dim: int | None = option(None, "joint embedding dimension (default: the preset's)")
    multi_positive: bool = option(True, "treat identical captions in a batch as positives of each other (soft "
                                  "InfoNCE targets); --no-multi-positive gives plain InfoNCE")
    eval_pairs: int = option(512, "validation (image, caption) pairs for the retrieval evaluation")

    def __post_init__(self) -> None:
        check(self.tokenizer is not None, self, "tokenizer", "is required (--tokenizer DIR, from `dalle tokenizer "
              "train --data-source shapes --out DIR`)")
        self.tokenizer = Path(self.tokenizer)
        check(self.preset in PRESETS, self, "preset", f"must be one of {', '.join(PRESETS)}")
        for name in ("image_width", "image_depth", "text_dim", "text_n_layers", "text_len", "embed_dim"):
            check(getattr(self, name) is None or getattr(self, name) >= 1, self, name, "must be at least 1")
        check(self.eval_pairs >= 2, self, "eval_pairs", "must be at least 2")

    def model_config(self, vocab_size: int, tokenizer_text_len: int, resolution: int) -> RerankerConfig:
        """The preset with this config's overrides, the tokenizer's vocabulary and the data's resolution."""
        base = PRESETS[self.preset]
        overrides = {k: getattr(self, k) for k in ("image_width", "image_depth", "text_dim", "text_n_layers",
                                                     "embed_dim") if getattr(self, k) is not None}
        text_len = min(self.text_len or base.text_len, tokenizer_text_len)
        return dataclasses.replace(base, vocab_size=vocab_size, text_len=text_len, resolution=resolution, **overrides)


# --- loss ----------------------------------------------------------------------------------------------------------


def caption_positives(captions: Sequence[str]) -> torch.Tensor:
    """``(B, B)`` bool: True where captions i and j are the same text."""
    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(c, len(index)) for c in captions])  # (B,) one id per distinct caption
    return ids[:, None] == ids[None, :]


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float,
                     positives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE: ``(loss, image→text loss, text→image loss)``.

    ``image_emb``, ``text_emb``: ``(B, D)`` unit vectors of B pairs; ``positives``: ``(B, B)`` symmetric bool with a
    True diagonal marking which captions are right for which images (default: only the pair's own). Each row's target
    is uniform over its positives.
    """
    logits = scale * image_emb.float() @ text_emb.float().T  # (B, B): rows images, columns captions
    b = logits.shape[0]
    if positives is None:
        labels = torch.arange(b, device=logits.device)
        loss_i2t, loss_t2i = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    else:
        if positives.shape != (b, b) or not bool(positives.diagonal().all()):
            raise ValueError("positives must be a (B, B) bool matrix with a True diagonal")
        if not torch.equal(positives, positives.T):
            raise ValueError("positives must be symmetric (caption i matches image j iff caption j matches image i)")
        targets = positives.to(logits.dtype)
        targets = targets / targets.sum(1, keepdim=True)  # (B, B), rows sum to 1
        loss_i2t = F.cross_entropy(logits, targets)
        loss_t2i = F.cross_entropy(logits.T, targets)  # targets is symmetric, so its rows serve the columns too
    return (loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i


# --- retrieval metrics ---------------------------------------------------------------------------------------------


def chance_top_k(positives: torch.Tensor, k: int) -> float:
    """Expected top-k accuracy of a random ranking: a query with m of N candidates correct misses with probability
    C(N − m, k) / C(N, k)."""
    n = positives.shape[1]
    counts = positives.sum(1).tolist()
    return sum(1 - math.comb(n - m, k) / math.comb(n, k) for m in counts) / len(counts)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                      scale: float) -> dict[str, float]:
    """Retrieval over N pairs (unit embeddings ``(N, D)``), counting a hit when the captions are equal (module doc)."""
    n = len(captions)
    if image_emb.shape[0] != n or text_emb.shape[0] != n:
        raise ValueError(f"{image_emb.shape[0]} images, {text_emb.shape[0]} texts and {n} captions")
    sims = image_emb.float() @ text_emb.float().T  # (N, N): rows images, columns captions
    same = caption_positives(captions).to(sims.device)  # (N, N)
    out: dict[str, float] = {}
    for k in TOP_K:
        kk = min(k, n)
        i2t = sims.topk(kk, dim=1).indices  # (N, k) captions retrieved for each image
        t2i = sims.T.topk(kk, dim=1).indices  # (N, k) images retrieved for each caption
        out[f"i2t_top{k}"] = float(same.gather(1, i2t).any(1).float().mean())
        out[f"t2i_top{k}"] = float(same.gather(1, t2i).any(1).float().mean())
        out[f"chance_top{k}"] = chance_top_k(same, kk)
    out["score_matched"] = scale * float(sims.diagonal().mean())
    out["score_mismatched"] = scale * float(sims[~same].mean()) if bool((~same).any()) else math.nan
    out["pairs"], out["distinct_captions"] = float(n), float(len(set(captions)))
    return out


def load_pairs(data: DataConfig, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` (image, caption) pairs of a split in file order: ``(N, H, W, 3)`` uint8 and N captions."""
    images, captions = [], []
    for batch in make_loader(data, min(n, 256), workers=0):
        images.append(batch["images"])
        captions += batch["captions"]
        if len(captions) >= n:
            break
    if len(captions) < 2:
        raise UserError(f"the {data.split!r} split of {data.source} has {len(captions)} usable pair(s); retrieval "
                        "needs at least 2")
    return torch.cat(images)[:n], captions[:n]


def evaluate_retrieval(reranker: Reranker, images: torch.Tensor, captions: Sequence[str],
                       batch_size: int = 256) -> dict[str, float]:
    """:func:`retrieval_metrics` of a reranker on pairs from :func:`load_pairs`."""
    normalised = [reranker.normalize(c) for c in captions]  # equal for the model ⇔ equal here
    image_emb = reranker.embed_images(images, batch_size)
    text_emb = reranker.embed_captions(list(captions), batch_size)
    return retrieval_metrics(image_emb, text_emb, normalised, reranker.scale)


# --- the task ------------------------------------------------------------------------------------------------------


class RerankerTask(Task):
    progress_keys = ("acc", "scale")

    def __init__(self, reranker: RerankerTrainConfig, data: DataConfig, model: RerankerConfig | None = None):
        self.rr, self.data = reranker, data
        self.tokenizer = TextTokenizer.load(reranker.tokenizer)
        self.model_cfg = model or reranker.model_config(self.tokenizer.vocab_size, self.tokenizer.text_len,
                                                        data.resolution)
        if self.model_cfg.resolution != data.resolution:
            raise ValueError(f"model resolution {self.model_cfg.resolution} != data resolution {data.resolution}")
        self.epochs: TrainingEpochs | None = None  # epochs after the first decode no image again
        self.stats = SkipStats()
        self._val: tuple[torch.Tensor, list[str]] | None = None

    def config(self) -> dict[str, Any]:
        return {"model": to_dict(self.model_cfg), "reranker": to_dict(self.rr), "data": to_dict(self.data)}

    def build_model(self) -> nn.Module:
        # channels_last: the batches arrive as (B, H, W, 3) permuted, and oneDNN convolutions are faster in NHWC.
        return ContrastiveModel(self.model_cfg).to(memory_format=torch.channels_last)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # As CLIP: no weight decay on gains, biases, embeddings and the temperature; only on conv / linear weights.
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            is_matrix = p.ndim >= 2 and "embedding" not in name
            (decay if is_matrix else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def train_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        if self.epochs is None:  # made on first use: the run's batch size, workers and device are set by then
            self.epochs = TrainingEpochs(self.data, self.cfg.batch_size, self.cfg.workers,
                                         pin_memory=self.device.type == "cuda")
        return self.epochs.epoch(epoch, self.stats)

    def _reranker(self, model: nn.Module) -> Reranker:
        return Reranker(model, self.tokenizer)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        images = to_float(batch["images"].to(self.device, non_blocking=True))  # (B, 3, H, W) in [0, 1]
        ids, pad_mask = self._reranker(model).tokenize(batch["captions"])  # (B, L)
        image_emb, text_emb, scale = model(images, ids, pad_mask)
        # With several processes the loss is over the whole batch: every process gathers all embeddings (CLIP's
        # gathered loss), so it is the loss a single process computes on the same batch.
        image_emb, text_emb, captions = gather_batch(image_emb), gather_batch(text_emb), gather_list(batch["captions"])
        positives = None
        if self.rr.multi_positive:
            positives = caption_positives([self.tokenizer.normalize(c) for c in captions]).to(self.device)
        loss, loss_i2t, loss_t2i = contrastive_loss(image_emb, text_emb, scale, positives)
        with torch.no_grad():
            best = (image_emb @ text_emb.T).argmax(1)  # (B,) caption chosen for each image in the batch
            right = positives if positives is not None else torch.eye(len(best), dtype=torch.bool, device=self.device)
            acc = right[torch.arange(len(best), device=self.device), best].float().mean()
        return loss, {"loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(), "scale": scale.detach(),
                      "acc": acc}

    def val_pairs(self) -> tuple[torch.Tensor, list[str]]:
        if self._val is None:
            self._val = load_pairs(dataclasses.replace(self.data, split="val", crop="center"), self.rr.eval_pairs)
        return self._val

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        images, captions = self.val_pairs()
        return evaluate_retrieval(self._reranker(model), images, captions, batch_size=256)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The residual blocks: units of sharding, activation checkpointing and per-block gradient scaling."""
        return [m for m in model.modules() if isinstance(m, ResBlock | TextBlock)]

    def export(self, model: nn.Module, path: Path) -> None:
        self._reranker(model).save_pretrained(path)

    def data_summary(self) -> str:
        return self.stats.summary()
