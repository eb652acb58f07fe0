"""The prior's attention masks (paper §2.2 and appendix B.1, Figure 11) and three ways to compute masked attention.

The joint sequence is ``[text (text_len) | image (grid_size²)]`` with the image in raster order. In every layer:

* text → text is causal; text never sees the image (it comes first);
* every image token sees **all** text tokens;
* image → image is causal and restricted by the layer's **kind**:

  ``dense``   every earlier image token (plain causal attention);
  ``row``     Figure 11(a): the previous ``grid_size`` image tokens and itself, in raster order. The caption: "each
              image token attends to the previous 5 image tokens in raster order [4×4 image]. The extent is chosen
              to be 5, so that the last token being attended to is the one in the same column of the previous row".
              So a row layer is a band of width ``grid_size + 1`` (it wraps into the end of the previous row), not
              the Sparse Transformer's "current row only".
  ``column``  Figure 11(b): earlier image tokens in the same column (offsets that are multiples of ``grid_size``).
              The paper computes it on the transposed image, where it becomes block-causal within each transposed
              row (Figure 11(c)); our ``gather`` path does exactly that.
  ``conv``    Figure 11(d): "a causal convolutional attention pattern with wraparound behavior (similar to the row
              attention)": the raster offsets ``dr·grid_size + dc`` with ``0 ≤ dr ≤ k//2`` and ``|dc| ≤ k//2`` of a
              ``k×k`` kernel, keeping only earlier positions (the paper: k = 3 in the figure, 11 in the model). Like
              the row band, offsets wrap across the image's left and right edges.

All image→image rules depend only on the raster offset ``q − kv``, so they read the same whether a position is
thought of as the code it holds or the code it predicts. Each mask is defined **once**, by :func:`mask_function`,
as ``(q_idx, kv_idx) -> bool`` made of broadcasting tensor ops; FlexAttention's block masks, the dense reference
masks and (later) a cached sampler all evaluate that one function.

Implementations (``impl``), all exact; tests hold them to the dense reference in outputs and gradients:

``dense``   SDPA with the full boolean mask: the reference; also what a KV cache uses (:func:`attend_cached`).
``gather``  saves compute on any device. The image is cut into blocks of whole rows (for ``column``, rows of the
            transposed image, i.e. columns). Each block attends, with ordinary SDPA and a small mask, to the text
            plus the few image rows its mask can reach: row → its rows and the one before, column → its own
            (transposed) rows, conv → its rows and ``k//2 + 1`` before. One ``index_select`` builds all blocks, with
            a hand-written backward (sums and strided adds, no scatter); text queries use causal SDPA.
``flex``    ``torch.nn.attention.flex_attention`` with a block mask, compiled on first use. torch 2.13 has no
            FlexAttention backward on CPU, so there it serves inference only. Not measured on a GPU yet.
``matmul``  the scores as one matrix: two batched matrix products in the inputs' dtype (bf16 under autocast) around
            an fp32 softmax with the additive mask. On CPU it beats the SDPA kernels while the scores are small
            (forward and backward, 96 to 576 tokens in batches of 1,536: 1.1-1.6× in fp32, 1.3-2.1× in bf16,
            whose SDPA backward is slow there), and falls far behind once they pass glibc's 32 MiB reuse limit.
``auto``    ``gather`` where :func:`gather_pays` (long sequences: the paper's 256 + 32×32), else ``dense``; layers
            of kind ``dense`` use causal SDPA. On CPU both become ``matmul`` while :func:`matmul_pays`.
            Measured on CPU: bench/prior_attention.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalle.errors import UserError

KINDS = ("dense", "row", "column", "conv")
IMPLS = ("auto", "dense", "gather", "flex", "matmul")

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Compile flex_attention on first use (without compile it materialises the full score matrix); tests switch it off.
FLEX_COMPILE = True


@dataclass(frozen=True)
class Layout:
    """Where text and image sit in the joint sequence; hashable, so plans and masks are cached per layout."""

    text_len: int
    grid_size: int
    conv_kernel: int = 11

    def __post_init__(self) -> None:
        if self.text_len < 1 or self.grid_size < 1:
            raise UserError(f"attention layout needs text_len >= 1 and grid_size >= 1, got {self}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise UserError(f"conv_kernel must be a positive odd number, got {self.conv_kernel}")

    @property
    def image_len(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len


# ----------------------------------------------------------------------------------------------------- masks


def _image_rule(kind: str, layout: Layout, d: torch.Tensor) -> torch.Tensor:
    """Which raster offsets ``d = q − kv ≥ 0`` between two image positions a ``kind`` layer may attend over."""
    g = layout.grid_size
    if kind == "row":
        return d <= g  # Figure 11(a): a band of grid_size + 1, ending at the same column of the previous row
    if kind == "column":
        return d % g == 0  # Figure 11(b): same column, earlier rows
    if kind == "conv":
        # Figure 11(d): d = dr·g + dc with 0 <= dr <= h and |dc| <= h  ⇔  (d + h) mod g <= 2h  and  d <= h·g + h.
        h = layout.conv_kernel // 2
        return ((d + h) % g <= 2 * h) & (d <= h * g + h)
    raise UserError(f"unknown attention kind {kind!r}; choose one of: {', '.join(KINDS)}")


def mask_function(kind: str, layout: Layout) -> MaskFn:
    """The mask of a ``kind`` layer as ``allowed(q_idx, kv_idx)`` over joint-sequence positions (broadcasting)."""
    if kind not in KINDS:
        raise UserError(f"unknown attention kind {kind!r}; choose one of: {', '.join(KINDS)}")
    t = layout.text_len

    def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        causal = kv_idx <= q_idx
        if kind == "dense":
            return causal
        # Text keys are visible to every later query: text queries see earlier text, image queries all of it.
        return causal & ((kv_idx < t) | _image_rule(kind, layout, q_idx - kv_idx))

    return allowed


def dense_mask(kind: str, layout: Layout, q_len: int | None = None, kv_len: int | None = None, q_start: int = 0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """``(q_len, kv_len)`` bool mask (True = attend) for queries at positions ``q_start ...`` and keys at ``0 ...``."""
    kv_len = layout.seq_len if kv_len is None else kv_len
    q_len = kv_len - q_start if q_len is None else q_len
    q_idx = torch.arange(q_start, q_start + q_len, device=device)[:, None]  # (q_len, 1)
    kv_idx = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
    return mask_function(kind, layout)(q_idx, kv_idx)  # (q_len, kv_len)


def layer_kinds(schedule: str, n_layers: int) -> tuple[str, ...]:
    """Attention kind of each layer: ``paper``, ``dense``, one kind, or a comma-separated list repeated to depth.

    ``paper`` (appendix B.1), layers counted from 1: column where (i − 2) mod 4 = 0, row elsewhere, and conv on
    the last layer.
    """
    if n_layers < 1:
        raise UserError(f"n_layers must be at least 1, got {n_layers}")
    if schedule == "paper":
        kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]
        kinds[-1] = "conv"
        return tuple(kinds)
    pattern = [s.strip() for s in schedule.split(",")]
    unknown = [k for k in pattern if k not in KINDS]
    if unknown:
        raise UserError(f"attention schedule {schedule!r}: unknown kind {unknown[0]!r}; use 'paper' or a "
                        f"comma-separated list of {', '.join(KINDS)}")
    return tuple(pattern[i % len(pattern)] for i in range(n_layers))


# ----------------------------------------------------------------------------------------------- dispatching


def resolve_impl(impl: str, kind: str, layout: Layout) -> str:
    """What ``impl`` means for a ``kind`` layer: ``dense`` layers use causal SDPA (it already skips the masked
    half) unless ``dense`` is asked for; ``auto`` picks ``gather`` where :func:`gather_pays`, else ``dense``."""
    if impl not in IMPLS:
        raise UserError(f"unknown attention implementation {impl!r}; choose one of: {', '.join(IMPLS)}")
    if kind == "dense" and impl != "dense":
        return "causal"
    if impl == "auto":
        return "gather" if gather_pays(kind, layout) else "dense"
    return impl


def attend(qkv: torch.Tensor, kind: str, layout: Layout, impl: str = "auto") -> torch.Tensor:
    """Masked multi-head attention of a ``kind`` layer: fused ``(B, L, 3, H, D)`` q, k, v → ``(B, L, H, D)``.

    Positions start at 0 and ``L <= layout.seq_len``; a prefix is fine, since the masks are causal and later
    positions never change earlier outputs. A KV cache, whose queries start later, uses :func:`attend_cached`.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attend expects fused qkv of shape (B, L, 3, H, D), got {tuple(qkv.shape)}")
    seq_len = qkv.shape[1]
    if seq_len > layout.seq_len:
        raise ValueError(f"sequence of {seq_len} tokens is longer than the layout's {layout.seq_len}")
    chosen, impl = impl, resolve_impl(impl, kind, layout)
    if chosen == "matmul" or (chosen == "auto" and impl in ("causal", "dense") and matmul_pays(qkv)):
        with torch.autocast(qkv.device.type, enabled=False):  # the caller's dtype for the products, fp32 softmax
            return _attend_matmul(qkv, kind, layout)
    if impl == "gather":
        if seq_len < layout.seq_len:  # pad a prefix to the full layout; causality keeps the padding out
            qkv = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, layout.seq_len - seq_len))
        return _gather_attention(qkv, kind, layout)[:, :seq_len]
    if qkv.device.type == "cpu" and (qkv.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        # CPU's half-precision SDPA kernels (the backward above all) run slower than the fp32 ones at our sizes
        # (bench/prior_train.py); attention is a small share of the FLOPs, so it runs in fp32 outside autocast.
        with torch.autocast("cpu", enabled=False):
            return _attend_sdpa(qkv.float(), kind, layout, impl).to(qkv.dtype)
    return _attend_sdpa(qkv, kind, layout, impl)


def _attend_sdpa(qkv: torch.Tensor, kind: str, layout: Layout, impl: str) -> torch.Tensor:
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))  # (B, H, L, D) views
    if impl == "causal":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif impl == "dense":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_mask(kind, layout, q.shape[2], q.device))
    else:
        out = _flex_attention(q, k, v, kind, layout)
    return out.transpose(1, 2)  # (B, L, H, D)


# ``matmul`` computes the scores of a CPU batch with at most this many entries (B·H·L²): 32 MiB of fp32, glibc's
# largest reusable block (dalle.runtime); past it fresh pages make it 3-4× slower than SDPA (1,152 tokens, batch 1).
MATMUL_MAX_SCORES = 8 << 20


def matmul_pays(qkv: torch.Tensor) -> bool:
    """Whether ``auto`` computes this ``(B, L, 3, H, D)`` batch's attention as one score matrix (see ``matmul``)."""
    b, length, _, h, _ = qkv.shape
    return qkv.device.type == "cpu" and b * h * length * length <= MATMUL_MAX_SCORES


def _attend_matmul(qkv: torch.Tensor, kind: str, layout: Layout) -> torch.Tensor:
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))  # (B, H, L, D) views
    length = q.shape[2]
    mask = _cached_additive_mask(kind, layout, length, q.device)  # (L, L) fp32: 0 or −inf
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, L, L) in the inputs' dtype
    # mask + scale·scores in one fp32 kernel; the softmax in fp32 too, as SDPA's kernels accumulate.
    probs = torch.softmax(torch.add(mask, scores.float(), alpha=q.shape[-1] ** -0.5), dim=-1)
    return torch.matmul(probs.to(q.dtype), v).transpose(1, 2)  # (B, L, H, D)


@functools.lru_cache(maxsize=64)
def _cached_additive_mask(kind: str, layout: Layout, seq_len: int, device: torch.device) -> torch.Tensor:
    allowed = dense_mask(kind, layout, seq_len, seq_len, 0, device)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, layout: Layout) -> torch.Tensor:
    """Attention of the last ``Lq`` positions over keys ``0 … Lk − 1`` (a KV cache): ``(B, H, L, D)`` in, out
    ``(B, H, Lq, D)``.

    Uses the dense mask rows of :func:`mask_function`, so cached decoding sees exactly what training saw.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = dense_mask(kind, layout, q_len, kv_len, kv_len - q_len, q.device)  # (Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=64)
def _cached_mask(kind: str, layout: Layout, seq_len: int, device: torch.device) -> torch.Tensor:
    return dense_mask(kind, layout, seq_len, seq_len, 0, device)


# ---------------------------------------------------------------------------------------------- gather path

# Image queries per block (rounded to whole rows that divide grid_size). Blocks of one row copy the text keys most
# often; blocks of many rows compute more masked-out scores. Measured on CPU at 128 text + 32×32 image tokens
# (bench/prior_attention.py): 2 rows best for row and column layers, 4 for conv.
QUERIES_PER_BLOCK = {"row": 64, "column": 64, "conv": 128}
# ``auto`` gathers only when that computes at most this fraction of the scores causal attention would (below it,
# the copies cost more than the scores saved; at the peer's 32 text + 8×8 image tokens the dense mask wins).
GATHER_MAX_SCORE_FRACTION = 0.8


@dataclass(frozen=True)
class _Plan:
    """How ``gather`` cuts the image: raster or transposed rows, ``rows`` per query block, ``n_back`` rows of reach."""

    transpose: bool
    n_back: int
    rows: int


def _plan(kind: str, layout: Layout) -> _Plan:
    g = layout.grid_size
    target = max(1, min(g, QUERIES_PER_BLOCK[kind] // g))
    rows = max(r for r in range(1, target + 1) if g % r == 0)
    if kind == "column":
        return _Plan(transpose=True, n_back=0, rows=rows)  # Figure 11(c): causal within each transposed row
    max_offset = g if kind == "row" else (layout.conv_kernel // 2) * (g + 1)
    return _Plan(transpose=False, n_back=min(g - rows, math.ceil(max_offset / g)), rows=rows)


def gather_pays(kind: str, layout: Layout) -> bool:
    """Whether ``gather`` computes few enough scores, compared with causal attention, to be the faster path."""
    plan = _plan(kind, layout)
    window = layout.text_len + (plan.n_back + plan.rows) * layout.grid_size  # keys per image query
    scores = layout.image_len * window + layout.text_len**2 / 2
    return scores <= GATHER_MAX_SCORE_FRACTION * layout.seq_len**2 / 2


@dataclass(frozen=True)
class _Gather:
    """Index of every row that ``gather`` copies out of the flattened ``(B·L·3, H, D)`` qkv, and the block masks."""

    index: torch.Tensor  # rows holding the text q/k/v, then each block's queries, keys and values
    sizes: tuple[int, int, int, int]

    @property
    def sizes_split(self) -> tuple[int, int, int]:
        return self.sizes[0] + self.sizes[1], self.sizes[2], self.sizes[3]
    mask: torch.Tensor  # (B·n_blocks, 1, block queries, S): 0 where allowed, −inf elsewhere
    n_blocks: int


@functools.lru_cache(maxsize=64)
def _gather_plan(kind: str, layout: Layout, plan: _Plan, batch: int, device: torch.device,
                 dtype: torch.dtype) -> _Gather:
    g, t, seq = layout.grid_size, layout.text_len, layout.seq_len
    n_blocks = g // plan.rows
    cells = t + torch.arange(layout.image_len, device=device).view(g, g)  # (g, g) positions in raster order
    if plan.transpose:
        cells = cells.t()  # rows of the transposed image are the image's columns
    q_pos = cells.reshape(n_blocks, plan.rows * g)  # (n_blocks, Mq)
    padded = torch.cat([cells.new_full((plan.n_back, g), -1), cells])  # (n_back + g, g); -1 = before the image
    reach = torch.arange(n_blocks, device=device)[:, None] * plan.rows + torch.arange(plan.n_back + plan.rows,
                                                                                         device=device)
    kv_pos = torch.cat([torch.arange(t, device=device).expand(n_blocks, t),
                        padded[reach].flatten(1)], dim=1)  # (n_blocks, S)
    mask = mask_function(kind, layout)(q_pos[:, :, None], kv_pos[:, None, :]) & (kv_pos[:, None, :] >= 0)
    base = torch.arange(batch, device=device).view(batch, 1, 1) * seq  # (B, 1, 1) first position of each sample
    kv_rows = (base + kv_pos.clamp(min=0)) * 3  # (B, n_blocks, S)
    text_rows = ((base[:, 0] + torch.arange(t, device=device)) * 3)[..., None] + torch.arange(3, device=device)
    index = (text_rows.flatten(), ((base + q_pos) * 3).flatten(),  # text q/k/v, then image q, k and v rows
             (kv_rows + 1).flatten(), (kv_rows + 2).flatten())
    # Additive, in the activations' dtype: SDPA would otherwise convert a bool mask in every forward and backward.
    mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    mask = mask.unsqueeze(1).repeat(batch, 1, 1, 1)  # (B·n_blocks, 1, Mq, S)
    return _Gather(torch.cat(index), tuple(len(i) for i in index), mask, n_blocks)


class _GatherBlocks(torch.autograd.Function):
    """``(B, L, 3, H, D)`` qkv → text qkv ``(B, T, 3, H, D)``, image query blocks ``(B·nb, Mq, H, D)`` and key and
    value windows ``(B·nb, S, H, D)``.

    Forward is one ``index_select``. The backward is written out because autograd's (an ``index_add``
    per output, plus a zero-filled full-size gradient per slice) is several times slower on CPU, and stalls badly
    when other processes compete for the cores: here the windows' text parts are summed over blocks, their own rows
    copied back in one go and the ``n_back`` earlier rows added with strided adds, all into one gradient buffer.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, layout: Layout, plan: _Plan, gp: _Gather):  # type: ignore[override]
        b, seq, _, h, d = qkv.shape
        ctx.layout, ctx.plan, ctx.shape = layout, plan, qkv.shape
        flat = qkv.reshape(b * seq * 3, h, d)  # (B·L·3, H, D): row (b·L + position)·3 + (0 q | 1 k | 2 v)
        # Three copies rather than one: glibc serves allocations above 32 MB with fresh mmaps, whose page faults
        # cost as much as the copy (the paper-like shape of bench/prior_attention.py crosses that line at batch 2).
        text_q, k, v = (flat.index_select(0, index) for index in gp.index.split(gp.sizes_split))
        text, q = text_q.split(gp.sizes[:2])
        q, k, v = (x.view(b * gp.n_blocks, -1, h, d) for x in (q, k, v))
        return text.view(b, layout.text_len, 3, h, d), q, k, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_text, d_q, d_k, d_v):  # type: ignore[override]
        layout, plan = ctx.layout, ctx.plan
        b, _, _, h, d = ctx.shape
        t, g = layout.text_len, layout.grid_size
        n_blocks = g // plan.rows
        grad = torch.empty(ctx.shape, dtype=d_q.dtype, device=d_q.device)  # (B, L, 3, H, D); every entry is set
        grad[:, :t] = d_text

        def image_rows(which: int) -> torch.Tensor:  # view of grad's image rows in block order: (B, g, g, H, D)
            cells = grad[:, t:, which].unflatten(1, (g, g))
            return cells.transpose(1, 2) if plan.transpose else cells

        # unflatten, not reshape: the incoming gradients are strided views and a reshape would copy them first.
        d_q = d_q.unflatten(0, (b, n_blocks)).unflatten(2, (plan.rows, g))  # (B, nb, rows, g, H, D)
        image_rows(0).unflatten(1, (n_blocks, plan.rows)).copy_(d_q)
        for which, d_win in ((1, d_k), (2, d_v)):
            d_win = d_win.unflatten(0, (b, n_blocks))  # (B, nb, S, H, D)
            grad[:, :t, which] += d_win[:, :, :t].sum(1)  # text keys: every block saw them
            windows = d_win[:, :, t:].unflatten(2, (plan.n_back + plan.rows, g))  # (B, nb, n_back + rows, g, H, D)
            target = image_rows(which)
            # A block's own rows are the last ``rows`` of its window: together they cover the image once.
            target.unflatten(1, (n_blocks, plan.rows)).copy_(windows[:, :, plan.n_back:])
            for w in range(plan.n_back):  # window row w of block j is image row j·rows + w − n_back (if ≥ 0)
                first = -((w - plan.n_back) // plan.rows)  # first block whose row w lies inside the image
                start = first * plan.rows + w - plan.n_back
                if first < n_blocks:
                    target[:, start:: plan.rows][:, : n_blocks - first] += windows[:, first:, w]
        return grad, None, None, None


def _gather_attention(qkv: torch.Tensor, kind: str, layout: Layout) -> torch.Tensor:
    """Exact sparse attention as dense SDPA per block of image rows (see the module docstring). ``(B, L, 3, H, D)``."""
    b, _, _, h, d = qkv.shape
    g = layout.grid_size
    plan = _plan(kind, layout)
    gp = _gather_plan(kind, layout, plan, b, qkv.device, qkv.dtype)
    text, q_img, k_win, v_win = _GatherBlocks.apply(qkv, layout, plan, gp)
    q_t, k_t, v_t = (x.transpose(1, 2) for x in text.unbind(2))  # (B, H, T, D)
    text_out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True)  # (B, H, T, D)
    q_img, k_win, v_win = (x.transpose(1, 2) for x in (q_img, k_win, v_win))  # (B·nb, H, Mq | S, D)
    image_out = F.scaled_dot_product_attention(q_img, k_win, v_win, attn_mask=gp.mask)  # (B·nb, H, Mq, D)
    image_out = image_out.transpose(1, 2).reshape(b, g, g, h, d)  # (B, g, g, H, D) in block order
    if plan.transpose:
        image_out = image_out.transpose(1, 2)
    return torch.cat([text_out.transpose(1, 2), image_out.reshape(b, g * g, h, d)], dim=1)  # (B, L, H, D)


# ------------------------------------------------------------------------------------------------ flex path


@functools.lru_cache(maxsize=2)
def _flex_fn(compiled: bool) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@functools.lru_cache(maxsize=64)
def _flex_block_mask(kind: str, layout: Layout, seq_len: int, device: torch.device):  # -> BlockMask
    from torch.nn.attention.flex_attention import create_block_mask
    allowed = mask_function(kind, layout)
    return create_block_mask(lambda b, h, q_idx, kv_idx: allowed(q_idx, kv_idx), None, None, seq_len, seq_len,
                             device=device)


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, layout: Layout) -> torch.Tensor:
    """FlexAttention with the block mask of :func:`mask_function`: ``(B, H, L, D)`` → ``(B, H, L, D)``."""
    block_mask = _flex_block_mask(kind, layout, q.shape[2], q.device)
    return _flex_fn(FLEX_COMPILE)(q, k, v, block_mask=block_mask)
