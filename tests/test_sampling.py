"""KV-cached sampling: cached logits equal a full forward pass for every mask kind, the cache reads exactly the keys
each mask allows, top-k / top-p, Gumbel-max draws, seeds, prompts, and the uncached reference."""

import copy
import math

import pytest
import torch

from dalle.errors import ConfigError, UserError
from dalle.models import sampling
from dalle.models.attention import KINDS, Layout, dense_mask
from dalle.models.sampling import (
    GumbelNoise,
    PriorDecoder,
    SampleConfig,
    draw,
    filter_logits,
    layer_plan,
    packed_linears_available,
    sample_codes,
    sample_codes_uncached,
)
from dalle.models.transformer import PriorTransformer, preset

SCHEDULES = [*KINDS, "paper"]  # "paper" on the test preset's 3 layers: row, column, conv


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def model_and_text(schedule: str = "paper", batch: int = 3, device: torch.device | str = "cpu", **overrides):
    torch.manual_seed(0)
    model = PriorTransformer(preset("test", attn_schedule=schedule, **overrides)).eval()
    cfg = model.config
    ids = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len))
    lengths = torch.tensor([2, cfg.text_len, 5, 1][:batch])
    pad_mask = torch.arange(cfg.text_len)[None, :] >= lengths[:, None]  # (B, T), different paddings
    return model.to(device), ids.to(device), pad_mask.to(device)


# Both ways of running a step's matmuls: oneDNN with pre-packed weights (CPU default) and plain F.linear.
PACKED = [False] + ([True] if packed_linears_available(torch.device("cpu"), torch.float32) else [])
PACKED_BF16 = [False] + ([True] if packed_linears_available(torch.device("cpu"), torch.bfloat16) else [])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prompt_len", [0, 6])
@pytest.mark.parametrize("packed", PACKED)
def test_cached_logits_equal_full_forward_at_every_step(schedule, prompt_len, packed, device):
    if packed and device.type != "cpu":
        pytest.skip("packed oneDNN linears are a CPU path")
    model, ids, pad_mask = model_and_text(schedule, device=device)
    cfg = model.config
    codes = torch.randint(0, cfg.codebook_size, (3, cfg.grid_size, cfg.grid_size), device=device)
    with torch.no_grad():
        full = model(ids, pad_mask, codes).image  # (B, N, K) teacher-forced
    flat = codes.flatten(1)
    decoder = PriorDecoder(model, packed=packed)
    logits = decoder.prefill(ids, pad_mask, flat[:, :prompt_len])
    torch.testing.assert_close(logits, full[:, prompt_len], atol=1e-5, rtol=1e-5)
    for j in range(prompt_len, cfg.image_len - 1):
        logits = decoder.step(flat[:, j])
        torch.testing.assert_close(logits, full[:, j + 1], atol=1e-5, rtol=1e-5, msg=f"cell {j + 1}")


def test_gathered_conv_keys_give_the_full_forward_logits():
    """A conv kernel too sparse for a ring (3×3 on 16 columns) gathers its keys; its steps still equal a full
    forward pass, with candidates in blocks sharing their caption's keys."""
    model, ids, pad_mask = model_and_text("row,conv", grid_size=16, n_layers=2)
    assert PriorDecoder(model).layers[1].plan.mode == "gather"
    cfg, order = model.config, torch.tensor([0, 0, 2, 2])
    codes = torch.randint(0, cfg.codebook_size, (4, cfg.image_len))
    with torch.no_grad():
        full = model(ids[order], pad_mask[order], codes.view(4, cfg.grid_size, cfg.grid_size)).image
    decoder = PriorDecoder(model)
    torch.testing.assert_close(decoder.prefill(ids[order], pad_mask[order]), full[:, 0], atol=1e-5, rtol=1e-5)
    for j in range(cfg.image_len - 1):
        torch.testing.assert_close(decoder.step(codes[:, j]), full[:, j + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", PACKED_BF16)
def test_bf16_steps_follow_the_fp32_forward_and_draw_the_same_codes(packed):
    """A bf16 copy of the prior, sampled step by step, stays within bf16 rounding of the fp32 model's full forward
    pass, and from one seed it draws the fp32 sampler's codes but for rare near-ties."""
    model, ids, pad_mask = model_and_text("paper", batch=4)
    cfg = model.config
    half = copy.deepcopy(model).to(torch.bfloat16)
    codes = torch.randint(0, cfg.codebook_size, (4, cfg.image_len))
    with torch.no_grad():
        full = model(ids, pad_mask, codes.view(4, cfg.grid_size, cfg.grid_size)).image  # (B, N, K) fp32
    decoder = PriorDecoder(half, packed=packed)
    logits = [decoder.prefill(ids, pad_mask)] + [decoder.step(codes[:, j]) for j in range(cfg.image_len - 1)]
    logits = torch.stack(logits, 1)  # (B, N, K)
    assert logits.dtype == torch.bfloat16
    error = (logits.float() - full).abs().max()
    assert error < 0.02 * full.abs().max(), (error, full.abs().max())
    many_ids, many_pad = ids.repeat(16, 1), pad_mask.repeat(16, 1)
    fp32 = PriorDecoder(model).sample(many_ids, many_pad, seed=3, temperature=0.5)
    bf16 = PriorDecoder(half, packed=packed).sample(many_ids, many_pad, seed=3, temperature=0.5)
    assert (fp32 == bf16).float().mean() > 0.9


@pytest.mark.parametrize("prompt_len", [0, 6])
def test_repeated_captions_are_prefilled_once_and_step_like_distinct_ones(prompt_len):
    model, ids, pad_mask = model_and_text("paper")
    cfg = model.config
    order = torch.tensor([0, 1, 0, 2, 1, 0])  # three captions, candidates interleaved
    prompt = torch.randint(0, cfg.codebook_size, (3, prompt_len))[order]
    rows = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    decoder = PriorDecoder(model)
    logits = decoder.prefill(ids[order], pad_mask[order], prompt)
    assert rows == [3]  # the six rows' prefix ran once per distinct caption
    reference = PriorDecoder(model)
    for k, i in enumerate(order.tolist()):
        torch.testing.assert_close(logits[k], reference.prefill(ids[i:i + 1], pad_mask[i:i + 1], prompt[k:k + 1])[0],
                                   atol=1e-5, rtol=1e-5)
    codes = torch.randint(0, cfg.codebook_size, (6,))
    step = decoder.step(codes)  # the rows diverge from here: each has its own cache entries
    with torch.no_grad():
        full = model(ids[order], pad_mask[order], torch.cat([prompt, codes[:, None]], 1).repeat(
            1, cfg.image_len)[:, :cfg.image_len].view(6, cfg.grid_size, cfg.grid_size)).image
    torch.testing.assert_close(step, full[:, prompt_len + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_len", [0, 6])
def test_candidates_in_blocks_share_one_copy_of_their_captions_keys(prompt_len):
    """Rows in blocks of one caption (a caption's candidates, as Generator draws them) keep the caption's keys and
    values once per block, and every step still equals a full forward pass."""
    model, ids, pad_mask = model_and_text("paper")
    cfg = model.config
    order = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    prompt = torch.randint(0, cfg.codebook_size, (3, prompt_len))[order]
    codes = torch.randint(0, cfg.codebook_size, (9, cfg.image_len))
    codes[:, :prompt_len] = prompt
    with torch.no_grad():
        full = model(ids[order], pad_mask[order], codes.view(9, cfg.grid_size, cfg.grid_size)).image
    decoder = PriorDecoder(model)
    logits = decoder.prefill(ids[order], pad_mask[order], prompt)
    assert [b.shape[1] for b in decoder.cache.text] == [3] * cfg.n_layers  # one copy per caption
    assert [b.shape[1] for b in decoder.cache.image] == [9] * cfg.n_layers
    torch.testing.assert_close(logits, full[:, prompt_len], atol=1e-5, rtol=1e-5)
    for j in range(prompt_len, cfg.image_len - 1):
        torch.testing.assert_close(decoder.step(codes[:, j]), full[:, j + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,expected", [([0, 0, 1, 1], 2), ([0, 0, 0, 1, 1, 1], 3), ([0, 0, 1, 1, 1, 1], 2),
                                           ([0, 1, 0], 1), ([0, 0, 0], 3), ([0, 0, 1], 1), ([5], 1)])
def test_group_size_is_the_largest_block_of_identical_consecutive_rows(rows, expected):
    table = torch.tensor([[7, 7], [8, 9], [1, 0], [2, 2], [3, 3], [4, 4]])
    assert sampling.group_size(table[torch.tensor(rows)]) == expected


@pytest.mark.parametrize("group", [1, 4])
def test_attend_step_equals_attention_over_the_joined_keys(group):
    torch.manual_seed(0)
    b, h, d, t, m = 8, 2, 16, 5, 7
    q = torch.randn(b, h, d)
    text = torch.randn(2, b // group, h, t, d)
    keys, values = torch.randn(b, h, m, d), torch.randn(b, h, m, d)
    mask = torch.zeros(1, m).index_fill_(1, torch.tensor([1, 4]), -math.inf)
    joined_k = torch.cat([text[0].repeat_interleave(group, 0), keys], 2)  # (B, H, t + m, D)
    joined_v = torch.cat([text[1].repeat_interleave(group, 0), values], 2)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), joined_k, joined_v, attn_mask=torch.cat([torch.zeros(1, t), mask], 1)).squeeze(2)
    torch.testing.assert_close(sampling.attend_step(q, text, keys, values, mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [Layout(8, 4, 3), Layout(5, 8, 5), Layout(16, 32, 11), Layout(3, 6, 13),
                                    Layout(4, 16, 3)])
def test_cache_reads_exactly_the_keys_the_mask_allows(kind, layout):
    """Every step's image keys (after its mask) are the allowed set of mask_function: no fewer, and no masked-out
    extras beyond a ring's wrap-around columns (text keys are always read whole)."""
    plan = layer_plan(kind, layout, torch.device("cpu"), torch.float32)
    t, n = layout.text_len, layout.image_len
    allowed = dense_mask(kind, layout)[t:, t:]  # (N, N) image queries → image keys
    assert dense_mask(kind, layout)[t:, :t].all()
    assert len(set(plan.slots)) == n or plan.mode == "ring"  # only a ring reuses slots
    assert max(plan.slots) < plan.window
    for i in range(n):
        stored = {}  # slot → the latest position ≤ i written there
        for p in range(i + 1):
            stored[plan.slots[p]] = p
        if plan.index[i] is not None:
            read = [stored[s] for s in plan.index[i].tolist()]
            assert len(read) == len(plan.index[i])
        else:
            lo, hi = plan.spans[i]
            held = [stored[s] for s in range(lo, hi)]  # every slot read holds a written position
            assert len(set(held)) == len(held)
            visible = [True] * len(held) if plan.masks[i] is None else (plan.masks[i][0] == 0).tolist()
            read = [p for p, ok in zip(held, visible) if ok]
        expected = allowed[i].nonzero().flatten().tolist()
        assert sorted(read) == expected, f"{kind} image position {i}"
    if kind in ("dense", "row", "column"):
        assert plan.mode == {"dense": "prefix", "row": "ring", "column": "strided"}[kind]
    if kind == "row":
        assert plan.window == layout.grid_size + 1  # Figure 11(a): back to the same column of the previous row


def test_conv_layers_use_a_masked_ring_or_gather_by_density():
    small = layer_plan("conv", Layout(8, 8, 5), torch.device("cpu"), torch.float32)
    assert (small.mode, small.window) == ("ring", 2 * 8 + 2 + 1)  # offsets up to h·g + h with h = 2
    assert any(m is not None for m in small.masks)  # the wrap-around columns outside the kernel are masked
    # The paper's 11×11 kernel on 32 columns allows 11 of every 32 keys in its span: still a ring; a 3×3 kernel on
    # 16 columns allows 3 of 16: gathered instead.
    assert layer_plan("conv", Layout(16, 32, 11), torch.device("cpu"), torch.float32).mode == "ring"
    assert layer_plan("conv", Layout(8, 16, 3), torch.device("cpu"), torch.float32).mode == "gather"


def test_filter_logits_top_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, 3.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).sum(-1).tolist() == [2, 2]
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [1, 3]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [2, 4]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept logits unchanged
    assert torch.equal(filter_logits(logits, top_k=5), logits)


@pytest.mark.parametrize("top_p,kept", [(0.4, [0]), (0.5, [0]), (0.6, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]),
                                        (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3]), (1e-9, [0])])
def test_filter_logits_top_p_keeps_the_smallest_nucleus(top_p, kept):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    order = torch.tensor([2, 0, 3, 1])  # shuffled, so sorting is exercised
    logits = probs.log()[:, order]
    out = filter_logits(logits, top_p=top_p)
    assert sorted(order[torch.isfinite(out[0])].tolist()) == kept


def test_top_k_then_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.999)).sum() == 3
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.5)).sum() == 1


def test_gumbel_max_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40_000, 4)
    gen = torch.Generator().manual_seed(0)
    noise = GumbelNoise(gen, 40_000, 1, 4, torch.device("cpu"))(0)
    codes = draw(logits, SampleConfig(temperature=0.5), noise)
    freq = torch.bincount(codes, minlength=4).float() / len(codes)
    torch.testing.assert_close(freq, (logits[0] / 0.5).softmax(-1), atol=0.01, rtol=0)


def test_sampled_codes_stay_in_the_top_k_of_their_logits():
    model, ids, pad_mask = model_and_text()
    codes = sample_codes(model, ids, pad_mask, top_k=3, seed=1)  # (B, g, g)
    with torch.no_grad():
        logits = model(ids, pad_mask, codes).image  # (B, N, K) given the sampled prefix
    top3 = logits.topk(3, dim=-1).indices  # (B, N, 3)
    assert (top3 == codes.flatten(1)[..., None]).any(-1).all()
    greedy = sample_codes(model, ids, pad_mask, top_k=1)
    with torch.no_grad():
        assert torch.equal(model(ids, pad_mask, greedy).image.argmax(-1), greedy.flatten(1))


def test_seed_determinism_and_per_row_generators(device):
    model, ids, pad_mask = model_and_text(device=device)
    a, b = sample_codes(model, ids, pad_mask, seed=7), sample_codes(model, ids, pad_mask, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_codes(model, ids, pad_mask, seed=8))
    gens = [torch.Generator(device).manual_seed(s) for s in (11, 12, 13)]
    batched = sample_codes(model, ids, pad_mask, generator=gens)
    alone = sample_codes(model, ids[1:2], pad_mask[1:2], generator=[torch.Generator(device).manual_seed(12)])
    assert torch.equal(batched[1:2], alone)  # a row's draws do not depend on its batch-mates


@pytest.mark.parametrize("schedule", ["dense", "paper"])
def test_cached_and_uncached_samplers_agree(schedule, device):
    model, ids, pad_mask = model_and_text(schedule, device=device)
    prompt = torch.randint(0, model.config.codebook_size, (3, 5), device=device)
    cached = sample_codes(model, ids, pad_mask, SampleConfig(temperature=0.9, top_k=20, seed=3), prompt=prompt)
    reference = sample_codes_uncached(model, ids, pad_mask, SampleConfig(temperature=0.9, top_k=20, seed=3),
                                      prompt=prompt)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("n", [0, 1, 4, 7, 16])
def test_prompt_codes_come_back_unchanged(n):
    model, ids, pad_mask = model_and_text()
    prompt = torch.randint(0, model.config.codebook_size, (3, n))
    codes = sample_codes(model, ids, pad_mask, prompt=prompt, seed=0)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert torch.equal(codes.flatten(1)[:, :n], prompt)
    assert codes.requires_grad is False and not codes.is_inference()  # usable in autograd code afterwards


@pytest.mark.parametrize("block", [64, 5])
def test_prompt_cells_use_the_noise_of_plain_generation(monkeypatch, block):
    """A prompt equal to a sample's own first codes reproduces that sample: cell j always draws noise j, also when
    the prompt skips whole blocks of noise."""
    monkeypatch.setattr(sampling, "NOISE_BLOCK", block)
    model, ids, pad_mask = model_and_text()
    plain = sample_codes(model, ids, pad_mask, seed=5)
    for n in (6, 11):
        resumed = sample_codes(model, ids, pad_mask, seed=5, prompt=plain.flatten(1)[:, :n])
        assert torch.equal(plain, resumed)
    assert torch.equal(plain, sample_codes_uncached(model, ids, pad_mask, seed=5))


def test_cache_is_preallocated_and_reused():
    model, ids, pad_mask = model_and_text("paper")
    decoder = PriorDecoder(model)
    decoder.sample(ids, pad_mask, seed=0)
    pointers = [b.data_ptr() for b in decoder.cache.buffers]
    decoder.sample(ids, pad_mask, seed=1)
    assert [b.data_ptr() for b in decoder.cache.buffers] == pointers
    cfg = model.config
    windows = [cfg.image_len, cfg.grid_size + 1, cfg.image_len]  # test preset: row (ring), column (all), conv (ring)
    windows[2] = layer_plan("conv", cfg.layout, torch.device("cpu"), torch.float32).window
    expected = sum(2 * 3 * cfg.n_heads * (cfg.text_len + w) * cfg.head_dim * 4 for w in windows)
    assert decoder.cache.memory_bytes() == expected


def test_bad_inputs_raise_clear_errors():
    model, ids, pad_mask = model_and_text()
    with pytest.raises(UserError, match="longer than the 16"):
        sample_codes(model, ids, pad_mask, prompt=torch.zeros(3, 17, dtype=torch.long))
    with pytest.raises(UserError, match=r"\(B, n\)"):
        sample_codes(model, ids, pad_mask, prompt=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(UserError, match=r"\[0, 32\)"):
        sample_codes(model, ids, pad_mask, prompt=torch.full((3, 2), 32))
    with pytest.raises(UserError, match="text ids"):
        sample_codes(model, ids[:, :5], pad_mask[:, :5])
    with pytest.raises(UserError, match="unknown sampling option"):
        sample_codes(model, ids, pad_mask, temprature=2.0)
    with pytest.raises(UserError, match="eval mode"):
        PriorDecoder(model.train())


@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("temperature", math.inf), ("top_k", 0),
                                         ("top_p", 0.0), ("top_p", 1.5), ("seed", -1)])
def test_sample_config_is_validated(field, value):
    with pytest.raises(ConfigError, match=f"SampleConfig.{field}"):
        SampleConfig(**{field: value})


def test_small_batches_decode_on_one_thread_and_give_the_count_back(monkeypatch):
    model, ids, pad_mask = model_and_text()  # 3 rows of width 64: far below ONE_THREAD_WORK
    decoder = PriorDecoder(model)
    seen, step = [], decoder.step
    monkeypatch.setattr(decoder, "step", lambda code: seen.append(torch.get_num_threads()) or step(code))
    torch.set_num_threads(2)  # the one_thread fixture gives the count back afterwards
    decoder.sample(ids, pad_mask, seed=0)
    assert set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    monkeypatch.setattr(sampling, "ONE_THREAD_WORK", 0)  # as if the batch were large: the caller's threads
    decoder.sample(ids, pad_mask, seed=0)
    assert set(seen) == {2} and torch.get_num_threads() == 2
