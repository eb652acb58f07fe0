"""The contrastive reranker: encoders, padding, InfoNCE against its formula, files, training on shapes, CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import shapes_tokenizer
from dalle.cli import main
from dalle.errors import ConfigError, UserError
from dalle.models.reranker import (
    MAX_LOGIT_SCALE,
    ContrastiveModel,
    Reranker,
    RerankerConfig,
    describe_checkpoint,
    inspect_checkpoint,
    load_reranker,
)
from dalle.tokenizers.text import TextTokenizer
from dalle.training.reranker_task import (
    caption_positives,
    chance_top_k,
    contrastive_loss,
    retrieval_metrics,
)

SMALL = dict(resolution=32, image_patch=4, image_width=8, image_stages=2, text_dim=32, text_n_layers=2,
             text_n_heads=2, embed_dim=16, vocab_size=50, text_len=12)
# What the CLI test trains: small enough for seconds, large enough to beat chance after a few dozen steps.
CLI_MODEL = ["--image-width", "16", "--text-dim", "64", "--embed-dim", "64", "--data-resolution", "32"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = shapes_tokenizer(records=2000, vocab_size=400, text_len=32)
    return tok.save(tmp_path_factory.mktemp("tokenizer"))


def _ids(batch, length, vocab, n_real):
    ids = torch.randint(1, vocab, (batch, length))
    pad_mask = torch.arange(length)[None, :] >= torch.tensor(n_real)[:, None]  # (B, L), padding at the end
    return ids.masked_fill(pad_mask, 0), pad_mask


@pytest.mark.parametrize("attention,pooling", [("causal", "eot"), ("full", "mean"), ("causal", "mean")])
def test_embeddings_are_unit_vectors_and_ignore_padding(attention, pooling):
    model = ContrastiveModel(RerankerConfig(**SMALL, text_attention=attention, text_pooling=pooling)).eval()
    images = torch.rand(3, 3, 32, 32)
    assert model.encode_image(images).shape == (3, 16)
    assert torch.allclose(model.encode_image(images).norm(dim=-1), torch.ones(3), atol=1e-5)
    ids, pad_mask = _ids(3, 12, 50, [5, 12, 1])
    emb = model.encode_text(ids, pad_mask)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    scrambled = torch.where(pad_mask, torch.randint(0, 50, ids.shape), ids)  # other ids at padded positions only
    assert torch.allclose(model.encode_text(scrambled, pad_mask), emb, atol=1e-5)
    assert torch.allclose(model.encode_text(ids[:, :7], pad_mask[:, :7])[0], emb[0], atol=1e-5)  # shorter padding
    assert not torch.allclose(model.encode_text(ids.roll(1, dims=1), pad_mask)[1], emb[1], atol=1e-3)
    score = model.score(images, ids, pad_mask)
    assert torch.allclose(score, model.scale() * (model.encode_image(images) * emb).sum(-1), atol=1e-5)


def test_logit_scale_starts_at_clip_value_and_is_clamped():
    model = ContrastiveModel(RerankerConfig(**SMALL))
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == pytest.approx(math.exp(MAX_LOGIT_SCALE), rel=1e-5)


def test_inputs_are_checked():
    model = ContrastiveModel(RerankerConfig(**SMALL))
    with pytest.raises(ValueError, match="shape"):
        model.encode_image(torch.rand(2, 3, 64, 64))
    ids, pad_mask = _ids(2, 12, 50, [3, 4])
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(ids.masked_fill(~pad_mask, 50), pad_mask)
    with pytest.raises(ValueError, match="text_len"):
        model.encode_text(torch.ones(2, 13, dtype=torch.long), torch.zeros(2, 13, dtype=torch.bool))


@pytest.mark.parametrize("field,value", [("image_width", 6), ("resolution", 36), ("text_dim", 33),
                                         ("text_pooling", "max"), ("image_stages", 0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        RerankerConfig(**{**SMALL, field: value})


def _infonce_by_hand(img, txt, scale, pos):
    """The definition, one term at a time: −Σ_j t_ij log softmax_j(s·<img_i, txt_j>), t uniform over positives."""
    b = len(img)
    sims = [[scale * float(img[i] @ txt[j]) for j in range(b)] for i in range(b)]
    def direction(rows):
        total = 0.0
        for i in range(b):
            log_z = math.log(sum(math.exp(v) for v in rows[i]))
            mates = [j for j in range(b) if pos[i][j]]
            total += -sum(rows[i][j] - log_z for j in mates) / len(mates)
        return total / b
    cols = [[sims[i][j] for i in range(b)] for j in range(b)]
    return direction(sims), direction(cols)


def test_infonce_matches_the_formula_single_and_multi_positive():
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    captions = ["a", "b", "a", "c", "a"]
    for pos in (torch.eye(5, dtype=torch.bool), caption_positives(captions)):
        loss, i2t, t2i = contrastive_loss(img, txt, 7.5, pos)
        want_i2t, want_t2i = _infonce_by_hand(img, txt, 7.5, pos.tolist())
        assert float(i2t) == pytest.approx(want_i2t, rel=1e-5)
        assert float(t2i) == pytest.approx(want_t2i, rel=1e-5)
        assert float(loss) == pytest.approx((want_i2t + want_t2i) / 2, rel=1e-5)
    plain = contrastive_loss(img, txt, 7.5)[0]
    assert float(plain) == pytest.approx(float(contrastive_loss(img, txt, 7.5, torch.eye(5, dtype=torch.bool))[0]))
    with pytest.raises(ValueError, match="diagonal"):
        contrastive_loss(img, txt, 7.5, torch.zeros(5, 5, dtype=torch.bool))


def test_retrieval_metrics_count_equal_captions_as_hits():
    emb = F.normalize(torch.randn(4, 8), dim=-1)
    captions = ["x", "y", "x", "z"]
    perfect = retrieval_metrics(emb, emb, captions, scale=10.0)
    assert perfect["i2t_top1"] == perfect["t2i_top1"] == 1.0
    assert perfect["score_matched"] == pytest.approx(10.0, rel=1e-5)
    swapped = retrieval_metrics(emb, emb[[2, 1, 0, 3]], captions, scale=10.0)  # images 0 and 2 share caption "x"
    assert swapped["i2t_top1"] == 1.0 and swapped["t2i_top1"] == 1.0
    shifted = retrieval_metrics(emb, emb.roll(1, 0), ["p", "q", "r", "s"], scale=1.0)
    assert shifted["i2t_top1"] == 0.0 and shifted["i2t_top5"] == 1.0  # top-5 of 4 candidates holds everything
    # Chance: "x" rows have 2 of 4 candidates right, the others 1 of 4.
    assert chance_top_k(caption_positives(captions), 1) == pytest.approx((0.5 + 0.25 + 0.5 + 0.25) / 4)
    assert chance_top_k(caption_positives(captions), 2) == pytest.approx((5 / 6 + 0.5 + 5 / 6 + 0.5) / 4)


def test_save_load_round_trip_and_rerank(tokenizer_dir, tmp_path):
    tok = TextTokenizer.load(tokenizer_dir)
    reranker = Reranker(ContrastiveModel(RerankerConfig(**{**SMALL, "vocab_size": tok.vocab_size})).eval(), tok)
    images = torch.rand(6, 3, 48, 48)  # resized to the model's 32 px by the reranker
    captions = ["a small red circle in the center"] * 3 + ["a large blue square above a small green cross"] * 3
    scores = reranker.score(images, captions)
    reranker.save_pretrained(tmp_path / "model")
    loaded = Reranker.from_pretrained(tmp_path / "model")
    assert loaded.config == reranker.config
    assert torch.allclose(loaded.score(images, captions), scores, atol=1e-5)
    order = loaded.rerank(images, captions[0], keep=4)
    own = loaded.score(images, captions[:1] * 6)
    assert order.tolist() == own.argsort(descending=True)[:4].tolist()
    uint8 = (images.permute(0, 2, 3, 1) * 255).round().byte()  # (B, H, W, 3) uint8 are accepted too
    assert torch.allclose(loaded.score(uint8, captions), scores, atol=0.05)


def test_foreign_checkpoints_are_recognised_with_a_clear_error(tmp_path):
    clip = {"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "visual.transformer.resblocks.0.attn.in_proj_weight":
            torch.zeros(12, 4), "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4),
            "logit_scale": torch.zeros(())}
    save_file(clip, str(tmp_path / "clip.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in clip.items()}}, tmp_path / "clip.pt")
    (tmp_path / "bare").mkdir()
    torch.save(clip, tmp_path / "bare" / "weights.bin")
    for path in (tmp_path / "clip.safetensors", tmp_path / "clip.pt", tmp_path / "bare"):
        assert "OpenAI CLIP / open_clip ViT" in describe_checkpoint(path)
        assert inspect_checkpoint(path)[0] == "clip-vit"
        with pytest.raises(UserError, match="not a reranker model directory.*load_reranker"):
            Reranker.from_pretrained(path)
        with pytest.raises(UserError, match="not a CLIP state dict: no tensor"):  # recognised, but incomplete
            load_reranker(path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert inspect_checkpoint(tmp_path / "hf")[0] == "hf-clip"
    with pytest.raises(UserError, match="Hugging Face transformers CLIP"):
        Reranker.from_pretrained(tmp_path / "hf")
    (tmp_path / "other").mkdir()
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other" / "weights.bin")
    assert inspect_checkpoint(tmp_path / "other")[0] == "unknown"
    with pytest.raises(UserError, match="weights.bin: its 1 tensors .* match no known"):
        load_reranker(tmp_path / "other")
    with pytest.raises(UserError, match="does not exist"):
        Reranker.from_pretrained(tmp_path / "missing")


@pytest.fixture(scope="module")
def trained(tokenizer_dir, tmp_path_factory):
    """A few dozen steps of the CLI's training on 32-pixel shapes."""
    out = tmp_path_factory.mktemp("run")
    rc = main(["reranker", "train", "--tokenizer", str(tokenizer_dir), "--out", str(out), "--steps", "80",
               "--batch-size", "32", "--eval-every", "80", "--eval-pairs", "128", "--no-progress",
               "--no-tensorboard", "--data-size", "2560", *CLI_MODEL])
    assert rc == 0
    last = {}
    for line in (out / "eval.csv").read_text().splitlines()[1:]:
        last = dict(zip((out / "eval.csv").read_text().splitlines()[0].split(","), line.split(",")))
    return out, {k: float(v) for k, v in last.items()}


def test_a_short_training_retrieves_above_chance(trained):
    _, metrics = trained
    assert metrics["step"] == 80
    for key in ("i2t_top5", "t2i_top5"):
        assert metrics[key] > 2 * metrics["chance_top5"], metrics
    assert metrics["score_matched"] > metrics["score_mismatched"]


def test_cli_eval_prints_the_training_metrics(trained, capsys):
    out, metrics = trained
    capsys.readouterr()
    args = ["reranker", "eval", "--model", str(out / "model"), "--pairs", "128", "--data-size", "2560"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["pairs"] == 128
    for key in ("i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5", "chance_top5"):
        assert result[key] == pytest.approx(metrics[key], abs=1e-3)  # the exported EMA model is the one evaluated
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "image→text top-5" in text and "chance" in text


def test_cli_train_needs_a_tokenizer(tmp_path, capsys):
    assert main(["reranker", "train", "--out", str(tmp_path / "run")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
