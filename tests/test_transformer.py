"""The prior: shapes, padding, causality, loss weighting, training steps, presets on the meta device, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from dalle.errors import ConfigError, UserError
from dalle.models.transformer import (
    PRESETS,
    PriorConfig,
    PriorTransformer,
    count_parameters,
    preset,
    prior_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def batch(config: PriorConfig, b: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.text_vocab_size, (b, config.text_len), generator=gen)
    lengths = torch.tensor([config.text_len, 3, 1, 5][:b])
    pad_mask = torch.arange(config.text_len)[None, :] >= lengths[:, None]  # (B, T)
    ids = ids.masked_fill(pad_mask, 0)  # the tokenizer puts 0 under padding
    codes = torch.randint(0, config.codebook_size, (b, config.grid_size, config.grid_size), generator=gen)
    return ids, pad_mask, codes


@pytest.fixture
def model():
    return PriorTransformer(preset("test")).eval()


def test_shapes_and_initial_loss(model):
    c = model.config
    ids, pad_mask, codes = batch(c)
    logits = model(ids, pad_mask, codes)
    assert logits.text.shape == (3, c.text_len - 1, c.text_vocab_size + 1)
    assert logits.image.shape == (3, c.grid_size**2, c.codebook_size)
    loss = model.loss(ids, pad_mask, codes)
    # Small initial weights give near-uniform predictions.
    assert loss.text.item() == pytest.approx(math.log(c.text_vocab_size + 1), rel=0.05)
    assert loss.image.item() == pytest.approx(math.log(c.codebook_size), rel=0.05)


def test_layer_kinds_follow_the_schedule(model):
    assert [b.attn.kind for b in model.blocks] == ["row", "column", "conv"]
    dense = PriorTransformer(preset("test", attn_schedule="dense"))
    assert [b.attn.kind for b in dense.blocks] == ["dense"] * 3


def test_ids_under_padding_are_ignored(model):
    ids, pad_mask, codes = batch(model.config)
    other = ids.clone()
    other[pad_mask] = torch.randint(1, model.config.text_vocab_size, (int(pad_mask.sum()),))
    a, b = model(ids, pad_mask, codes), model(other, pad_mask, codes)
    torch.testing.assert_close(a.text, b.text, rtol=0, atol=0)
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    torch.testing.assert_close(model.loss(ids, pad_mask, codes), model.loss(other, pad_mask, codes), rtol=0, atol=0)


def test_each_padded_position_uses_its_own_embedding(model):
    ids, pad_mask, codes = batch(model.config)  # sample 1 is padded from position 3 on, sample 0 not at all
    before = model(ids, pad_mask, codes).image
    with torch.no_grad():
        model.text_pad[4] += 1.0
    after = model(ids, pad_mask, codes).image
    assert torch.equal(before[0], after[0])  # no padding: the pad embeddings are unused
    assert not torch.allclose(before[1], after[1])  # position 4 is padded in sample 1
    # The padded position embeddings are distinct parameters, one per position.
    assert model.text_pad.shape == (model.config.text_len, model.config.dim)


def test_causality(model):
    """Changing a code changes only predictions after it; changing a caption token changes text after it and
    every image prediction. This holds through all layer kinds (row, column, conv)."""
    c = model.config
    ids, pad_mask, codes = batch(c)
    base = model(ids, pad_mask, codes)
    cell = 6
    changed = codes.clone()
    changed.view(3, -1)[:, cell] = (changed.view(3, -1)[:, cell] + 1) % c.codebook_size
    out = model(ids, pad_mask, changed)
    diff = (out.image - base.image).abs().amax(dim=(0, 2))  # (N,)
    assert torch.all(diff[: cell + 1] == 0) and torch.all(diff[cell + 1:] > 0)
    assert torch.equal(out.text, base.text)
    token = 2
    ids2 = ids.clone()
    ids2[0, token] = ids2[0, token] % (c.text_vocab_size - 1) + 1
    out = model(ids2, pad_mask, codes)
    text_diff = (out.text[0] - base.text[0]).abs().amax(dim=-1)  # (T − 1,), position j predicts token j + 1
    assert torch.all(text_diff[:token] == 0) and torch.all(text_diff[token:] > 0)
    assert torch.all((out.image[0] - base.image[0]).abs().amax(dim=-1) > 0)


def test_prefix_states_equal_full_sequence_states(model):
    """What a sampler without cache computes: states for a prefix of the codes match the full pass."""
    c = model.config
    ids, pad_mask, codes = batch(c)
    flat = codes.flatten(1)
    full = model.hidden_states(ids, pad_mask, flat[:, :-1])  # (B, T + N, dim)
    prefix = model.hidden_states(ids, pad_mask, flat[:, :5])  # (B, T + 6, dim)
    torch.testing.assert_close(prefix, full[:, : c.text_len + 6], rtol=1e-5, atol=1e-5)


def test_attention_implementations_agree(model):
    ids, pad_mask, codes = batch(model.config)
    model.set_attn_impl("dense")
    ref = model(ids, pad_mask, codes)
    model.set_attn_impl("gather")
    out = model(ids, pad_mask, codes)
    torch.testing.assert_close(out.image, ref.image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text, ref.text, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="implementation"):
        model.set_attn_impl("fast")


def test_loss_weighting_matches_a_direct_computation(model):
    c = model.config
    ids, pad_mask, codes = batch(c)
    logits = model(ids, pad_mask, codes)
    text_logp = F.log_softmax(logits.text, -1)  # (B, T − 1, V + 1)
    image_logp = F.log_softmax(logits.image, -1)  # (B, N, K)
    text_nll, image_nll = [], []
    for b in range(ids.shape[0]):
        for j in range(1, c.text_len):
            target = c.text_vocab_size if pad_mask[b, j] else ids[b, j]  # padding is a target of its own class
            text_nll.append(-text_logp[b, j - 1, target])
        for i, code in enumerate(codes[b].flatten()):
            image_nll.append(-image_logp[b, i, code])
    text_loss, image_loss = torch.stack(text_nll).mean(), torch.stack(image_nll).mean()
    loss = prior_loss(logits, ids, pad_mask, codes)
    torch.testing.assert_close(loss.text, text_loss)
    torch.testing.assert_close(loss.image, image_loss)
    torch.testing.assert_close(loss.total, text_loss / 8 + image_loss * 7 / 8)
    half = prior_loss(logits, ids, pad_mask, codes, text_weight=0.5)
    torch.testing.assert_close(half.total, (text_loss + image_loss) / 2)
    with pytest.raises(UserError, match="text_weight"):
        prior_loss(logits, ids, pad_mask, codes, text_weight=1.5)


def test_a_few_steps_reduce_the_loss():
    model = PriorTransformer(preset("test"))
    ids, pad_mask, codes = batch(model.config, b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.loss(ids, pad_mask, codes)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(loss.total.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_weight_decay_groups(model):
    decay, no_decay = model.weight_decay_groups()
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert {id(p) for p in decay}.isdisjoint(id(p) for p in no_decay)
    assert all(p.dim() == 2 for p in decay)
    for p in (model.text_emb.weight, model.text_pad, model.image_row, model.image_boi, model.ln_f.weight):
        assert any(p is q for q in no_decay)
    assert any(p is model.blocks[0].attn.qkv.weight for p in decay)


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = PriorTransformer(preset("test"))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    ids, pad_mask, codes = batch(model.config)
    loss = model.loss(ids, pad_mask, codes)
    assert torch.isfinite(loss.total)
    assert loss.image.item() == pytest.approx(math.log(model.config.codebook_size), rel=0.05)


@pytest.mark.parametrize(("name", "effective"), [("paper-2.8b", 2.8e9), ("paper-5.6b", 5.6e9), ("paper-12b", 12.0e9)])
def test_paper_presets_on_meta_device(name, effective):
    """The PowerSGD table's "effective" counts are the blocks, 12·n_layers·dim² (PAPER.md)."""
    with torch.device("meta"):
        model = PriorTransformer(preset(name))
    c = model.config
    assert c.n_layers == 64 and c.head_dim == 64 and c.n_heads * c.head_dim == c.dim
    blocks = count_parameters(model.blocks)
    assert blocks == pytest.approx(12 * c.n_layers * c.dim**2, rel=1e-3)  # plus LayerNorm gains and biases
    assert blocks == pytest.approx(effective, rel=0.02)
    extra = count_parameters(model) - blocks  # embeddings and heads
    assert 0.05e9 < extra < 0.25e9
    print(f"{name}: blocks {blocks / 1e9:.3f}e9, total {count_parameters(model) / 1e9:.3f}e9")


def test_tiny_preset_is_the_peer_benchmark_config():
    c = preset("tiny")
    assert (c.dim, c.n_layers, c.n_heads, c.head_dim, c.text_len, c.grid_size) == (256, 4, 8, 32, 32, 8)
    assert set(PRESETS) >= {"test", "tiny", "paper-2.8b", "paper-5.6b", "paper-12b"}
    with pytest.raises(UserError, match="unknown prior preset"):
        preset("huge")


@pytest.mark.parametrize(("field", "value"), [("dim", 0), ("text_len", 1), ("conv_kernel", 4), ("dropout", 1.0),
                                              ("attn_schedule", "row,diagonal"), ("attn_impl", "fast")])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"PriorConfig.{field}"):
        PriorConfig(**{field: value})


def test_wrong_inputs_are_rejected(model):
    ids, pad_mask, codes = batch(model.config)
    with pytest.raises(UserError, match="text_len"):
        model(ids[:, :-1], pad_mask[:, :-1], codes)
    with pytest.raises(UserError, match="pad_mask"):
        model(ids, pad_mask.long(), codes)
    with pytest.raises(UserError, match="image codes"):
        model(ids, pad_mask, codes[:, :-1])


def test_save_and_load_round_trip(model, tmp_path):
    ids, pad_mask, codes = batch(model.config)
    model.save_pretrained(tmp_path / "prior")
    loaded = PriorTransformer.from_pretrained(tmp_path / "prior").eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(ids, pad_mask, codes).image, model(ids, pad_mask, codes).image)
