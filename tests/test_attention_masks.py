"""Attention masks against the paper's Figure 11 and a brute-force reference; every fast path against the dense one."""

import warnings

import pytest
import torch

from dalle.errors import UserError
from dalle.models import attention as A

# Figure 11's layout: 6 text tokens and a 4×4 image (conv with a 3×3 kernel). Rows are queries, columns keys;
# text keys | image keys in groups of one image row. Written out by hand from the definitions in attention.py.
FIGURE_11 = {
    "row": [  # (a): the previous 4 image tokens and itself, so the farthest is the same column one row up
        "100000 | 0000 0000 0000 0000",
        "110000 | 0000 0000 0000 0000",
        "111000 | 0000 0000 0000 0000",
        "111100 | 0000 0000 0000 0000",
        "111110 | 0000 0000 0000 0000",
        "111111 | 0000 0000 0000 0000",
        "111111 | 1000 0000 0000 0000",
        "111111 | 1100 0000 0000 0000",
        "111111 | 1110 0000 0000 0000",
        "111111 | 1111 0000 0000 0000",
        "111111 | 1111 1000 0000 0000",
        "111111 | 0111 1100 0000 0000",
        "111111 | 0011 1110 0000 0000",
        "111111 | 0001 1111 0000 0000",
        "111111 | 0000 1111 1000 0000",
        "111111 | 0000 0111 1100 0000",
        "111111 | 0000 0011 1110 0000",
        "111111 | 0000 0001 1111 0000",
        "111111 | 0000 0000 1111 1000",
        "111111 | 0000 0000 0111 1100",
        "111111 | 0000 0000 0011 1110",
        "111111 | 0000 0000 0001 1111",
    ],
    "column": [  # (b): the same column in this and earlier rows
        "100000 | 0000 0000 0000 0000",
        "110000 | 0000 0000 0000 0000",
        "111000 | 0000 0000 0000 0000",
        "111100 | 0000 0000 0000 0000",
        "111110 | 0000 0000 0000 0000",
        "111111 | 0000 0000 0000 0000",
        "111111 | 1000 0000 0000 0000",
        "111111 | 0100 0000 0000 0000",
        "111111 | 0010 0000 0000 0000",
        "111111 | 0001 0000 0000 0000",
        "111111 | 1000 1000 0000 0000",
        "111111 | 0100 0100 0000 0000",
        "111111 | 0010 0010 0000 0000",
        "111111 | 0001 0001 0000 0000",
        "111111 | 1000 1000 1000 0000",
        "111111 | 0100 0100 0100 0000",
        "111111 | 0010 0010 0010 0000",
        "111111 | 0001 0001 0001 0000",
        "111111 | 1000 1000 1000 1000",
        "111111 | 0100 0100 0100 0100",
        "111111 | 0010 0010 0010 0010",
        "111111 | 0001 0001 0001 0001",
    ],
    "conv": [  # (d): causal 3×3 with wraparound, raster offsets {0, 1, 3, 4, 5}
        "100000 | 0000 0000 0000 0000",
        "110000 | 0000 0000 0000 0000",
        "111000 | 0000 0000 0000 0000",
        "111100 | 0000 0000 0000 0000",
        "111110 | 0000 0000 0000 0000",
        "111111 | 0000 0000 0000 0000",
        "111111 | 1000 0000 0000 0000",
        "111111 | 1100 0000 0000 0000",
        "111111 | 0110 0000 0000 0000",
        "111111 | 1011 0000 0000 0000",
        "111111 | 1101 1000 0000 0000",
        "111111 | 1110 1100 0000 0000",
        "111111 | 0111 0110 0000 0000",
        "111111 | 0011 1011 0000 0000",
        "111111 | 0001 1101 1000 0000",
        "111111 | 0000 1110 1100 0000",
        "111111 | 0000 0111 0110 0000",
        "111111 | 0000 0011 1011 0000",
        "111111 | 0000 0001 1101 1000",
        "111111 | 0000 0000 1110 1100",
        "111111 | 0000 0000 0111 0110",
        "111111 | 0000 0000 0011 1011",
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def parse(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r if c in "01"] for r in rows])


def brute_force_mask(kind: str, text_len: int, grid: int, kernel: int) -> torch.Tensor:
    """The masks written the long way, with 2-D coordinates where the paper describes them that way."""
    n = text_len + grid * grid
    mask = torch.zeros(n, n, dtype=torch.bool)
    h = kernel // 2
    for q in range(n):
        for kv in range(q + 1):
            if kv < text_len:  # causal text, and every image token sees all text
                mask[q, kv] = True
                continue
            if q < text_len:
                continue
            (qr, qc), (kr, kc) = divmod(q - text_len, grid), divmod(kv - text_len, grid)
            if kind == "dense":
                ok = True
            elif kind == "row":  # earlier in this row, or at / right of this column in the previous row
                ok = (kr == qr and kc <= qc) or (kr == qr - 1 and kc >= qc)
            elif kind == "column":
                ok = kc == qc
            else:  # a k×k window of raster offsets, wrapping across the edges like the row band
                ok = any(q - kv == dr * grid + dc for dr in range(h + 1) for dc in range(-h, h + 1))
            mask[q, kv] = ok
    return mask


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_figure_11(kind):
    expected = parse(FIGURE_11[kind])
    assert torch.equal(A.dense_mask(kind, A.Layout(text_len=6, grid_size=4, conv_kernel=3)), expected)


@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize(("text_len", "grid", "kernel"), [(5, 3, 3), (5, 6, 5), (6, 4, 3), (2, 6, 11), (3, 5, 1)])
def test_masks_match_brute_force(kind, text_len, grid, kernel):
    layout = A.Layout(text_len, grid, kernel)
    assert torch.equal(A.dense_mask(kind, layout), brute_force_mask(kind, text_len, grid, kernel))


def test_mask_rows_for_a_cache_are_rows_of_the_full_mask():
    layout = A.Layout(5, 6, 5)
    full = A.dense_mask("conv", layout)
    assert torch.equal(A.dense_mask("conv", layout, q_len=3, kv_len=20, q_start=17), full[17:20, :20])


def test_paper_schedule_for_64_layers():
    kinds = A.layer_kinds("paper", 64)
    columns = [i for i, k in enumerate(kinds, start=1) if k == "column"]
    assert columns == list(range(2, 63, 4))  # (i − 2) mod 4 == 0
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert kinds.count("row") == 64 - 16 - 1
    assert A.layer_kinds("dense", 3) == ("dense",) * 3
    assert A.layer_kinds("row, column", 5) == ("row", "column", "row", "column", "row")
    with pytest.raises(UserError, match="axial"):
        A.layer_kinds("row,axial", 4)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_gather_blocks_cover_exactly_the_mask_at_paper_size(kind):
    """Each gathered block holds every key its queries may see: allowed-key counts equal the dense mask's."""
    layout = A.Layout(text_len=256, grid_size=32, conv_kernel=11)
    plan = A._plan(kind, layout)
    blocks = A._gather_plan(kind, layout, plan, 1, torch.device("cpu"), torch.float32)
    counts = (blocks.mask == 0).sum(-1).squeeze(1)  # (n_blocks, block queries)
    q_pos = blocks.index.split(blocks.sizes)[1].view(blocks.n_blocks, -1) // 3  # positions of those queries
    dense_counts = A.dense_mask(kind, layout).sum(-1)  # (L,)
    assert torch.equal(counts, dense_counts[q_pos])


def test_auto_gathers_at_paper_length_only():
    paper, peer = A.Layout(256, 32, 11), A.Layout(32, 8, 5)
    assert all(A.resolve_impl("auto", k, paper) == "gather" for k in ("row", "column", "conv"))
    assert A.resolve_impl("auto", "row", peer) == "dense"
    assert A.resolve_impl("gather", "dense", paper) == "causal"
    with pytest.raises(UserError, match="implementation"):
        A.resolve_impl("fast", "row", paper)


def _reference_and_grad(qkv: torch.Tensor, kind: str, layout: A.Layout):
    out = A.attend(qkv, kind, layout, "dense")
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    return out, grad_out, grad


def _assert_equals_reference(kind: str, layout: A.Layout, impl: str) -> None:
    """``impl``'s outputs and gradients equal the dense reference's, on the full sequence and on a prefix."""
    for seq_len in (layout.seq_len, layout.seq_len - 5):
        qkv = torch.randn(2, seq_len, 3, 3, 8, requires_grad=True)
        ref, grad_out, ref_grad = _reference_and_grad(qkv, kind, layout)
        out = A.attend(qkv, kind, layout, impl)
        (grad,) = torch.autograd.grad(out, qkv, grad_out)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize(("text_len", "grid", "kernel"), [(6, 4, 3), (5, 6, 5), (7, 8, 11)])
@pytest.mark.parametrize("queries_per_block", [1, 12, 64])
def test_gather_equals_dense_reference(kind, text_len, grid, kernel, queries_per_block, monkeypatch):
    monkeypatch.setitem(A.QUERIES_PER_BLOCK, "row", queries_per_block)
    monkeypatch.setitem(A.QUERIES_PER_BLOCK, "column", queries_per_block)
    monkeypatch.setitem(A.QUERIES_PER_BLOCK, "conv", queries_per_block)
    _assert_equals_reference(kind, A.Layout(text_len, grid, kernel), "gather")


@pytest.mark.parametrize("kind", A.KINDS)
def test_matmul_equals_dense_reference(kind):
    _assert_equals_reference(kind, A.Layout(7, 8, 5), "matmul")


def test_auto_computes_small_cpu_batches_as_one_score_matrix(monkeypatch):
    layout = A.Layout(7, 8, 5)
    qkv = torch.randn(2, layout.seq_len, 3, 3, 8)
    assert A.matmul_pays(qkv)
    calls, matmul = [], A._attend_matmul

    def spy(qkv: torch.Tensor, kind: str, layout: A.Layout) -> torch.Tensor:
        calls.append(kind)
        return matmul(qkv, kind, layout)

    monkeypatch.setattr(A, "_attend_matmul", spy)
    for kind in A.KINDS:
        A.attend(qkv, kind, layout, "auto")
    assert calls == list(A.KINDS)
    # Past the limit the scores no longer fit glibc's reusable blocks: SDPA then.
    monkeypatch.setattr(A, "MATMUL_MAX_SCORES", 2 * 3 * layout.seq_len**2 - 1)
    assert not A.matmul_pays(qkv)
    A.attend(qkv, "dense", layout, "auto")
    assert len(calls) == len(A.KINDS)


@pytest.mark.parametrize("kind", A.KINDS)
def test_flex_equals_dense_reference(kind, monkeypatch):
    """Forward only: torch 2.13 has no FlexAttention backward on CPU. Eager flex, so no compile in the fast suite."""
    monkeypatch.setattr(A, "FLEX_COMPILE", False)
    layout = A.Layout(7, 8, 5)
    qkv = torch.randn(2, layout.seq_len, 3, 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow
        out = A.attend(qkv, kind, layout, "flex")
    torch.testing.assert_close(out, A.attend(qkv, kind, layout, "dense"), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["row", "conv"])
def test_compiled_flex_equals_dense_reference(kind):
    layout = A.Layout(32, 8, 5)
    qkv = torch.randn(2, layout.seq_len, 3, 4, 32)
    out = A.attend(qkv, kind, layout, "flex")
    torch.testing.assert_close(out, A.attend(qkv, kind, layout, "dense"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", A.KINDS)
def test_cached_attention_equals_the_last_rows_of_full_attention(kind):
    layout = A.Layout(5, 6, 5)
    qkv = torch.randn(2, 30, 3, 2, 8)
    full = A.attend(qkv, kind, layout, "dense")  # (B, L, H, D)
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))  # (B, H, L, D)
    cached = A.attend_cached(q[:, :, 27:], k, v, kind, layout)  # the last 3 queries over all 30 keys
    torch.testing.assert_close(cached.transpose(1, 2), full[:, 27:], rtol=1e-5, atol=1e-5)


def test_bad_layouts_and_shapes_are_rejected():
    with pytest.raises(UserError, match="conv_kernel"):
        A.Layout(4, 4, conv_kernel=4)
    with pytest.raises(UserError, match="text_len"):
        A.Layout(0, 4)
    with pytest.raises(UserError, match="kind"):
        A.mask_function("diagonal", A.Layout(4, 4))
    with pytest.raises(ValueError, match="longer"):
        A.attend(torch.randn(1, 30, 3, 2, 4), "row", A.Layout(4, 4))


@pytest.mark.parametrize("impl", ["dense", "auto", "matmul"])
def test_attention_under_cpu_autocast_keeps_the_dtype(impl):
    # Half-precision SDPA is slow on CPU, so SDPA computes in fp32 there, and ``matmul`` takes its softmax in fp32;
    # the caller still gets its dtype.
    layout = A.Layout(text_len=5, grid_size=4, conv_kernel=3)
    qkv = torch.randn(2, layout.seq_len, 3, 2, 8, generator=torch.Generator().manual_seed(0))
    reference = A.attend(qkv, "row", layout, impl)
    half = qkv.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = A.attend(half, "row", layout, impl)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()
