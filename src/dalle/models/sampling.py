"""Autoregressive sampling of image codes from the prior, with a key/value cache that respects the sparse masks.

The paper (§2.2, "Sampling and evaluation") draws up to N = 512 images per caption, one image token at a time. Run
naively, each of the grid_size² steps pushes the whole prefix through the model again (:func:`sample_codes_uncached`,
kept as the reference). :class:`PriorDecoder` runs the caption (and any known leading codes) once, then one new
position per step, attending over keys and values kept from earlier steps in a :class:`KVCache`.

**What a step attends to.** Every image query sees all text keys (§2.2) and the image keys its layer's mask allows
(:func:`dalle.models.attention.mask_function`, the one definition also used in training). The caption's keys and
values are kept apart from the image positions', once per block of consecutive rows with the same caption (a
caption's candidates) rather than once per row, and a step reads them as one matrix product with the block's queries
(:func:`attend_step`). The image keys never need the whole prefix masked; each layer gets a plan derived from that
mask function:

* ``prefix`` (dense layers): image keys ``0 … i``, a prefix of the buffer;
* ``ring`` (row and conv layers): the allowed image keys all lie within the last ``window`` positions (row:
  grid_size + 1 of them, Figure 11(a)), so image position ``i`` is stored in slot ``i mod window`` and a step reads
  the buffer's first ``min(i + 1, window)`` slots. Attention has no notion of order (positions live in the
  embeddings), so the ring's rotation does not matter. A conv layer's window also holds positions its kernel skips
  (the wrap-around columns), which a small additive mask removes;
* ``strided`` (column layers): the allowed keys are ``i, i − g, i − 2g, …`` (Figure 11(b)), so positions are stored
  column by column and a step reads its column's earlier rows as one contiguous run of slots;
* ``gather`` (any other sparse mask, e.g. the paper's 11×11 conv on 32 columns): the allowed keys are copied out
  with one ``index_select``.

Buffers are allocated once per batch size and reused; every per-step index, slot and mask is computed in advance, and
the loop never reads a tensor back to Python (no ``.item()``), so a step is a fixed list of tensor operations. A
step multiplies only B rows by each weight matrix, so reading the weights bounds it; on CPU they are re-packed once
for oneDNN, with GELU and the residual adds fused into the matmuls (:class:`_Linear`).

**Randomness.** A code is drawn by the Gumbel-max trick, ``argmax(logits / T + G)``, the same distribution as a
categorical draw from the (filtered) softmax. The Gumbel noise of cell ``j`` comes from the sample's own generator in
blocks of cells, so a sample's codes depend only on its generator and seed, not on which other samples share its
batch, and completing from a prompt uses for cell ``j`` the noise plain generation would have used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dalle.config import check, option
from dalle.errors import UserError
from dalle.models.attention import Layout, attend, dense_mask
from dalle.models.transformer import PriorTransformer

# Gumbel noise is drawn for this many cells at a time: one call per sample per block, and bounded memory at the
# paper's size (8 samples × 64 cells × 8192 codes × 4 bytes = 16 MiB).
NOISE_BLOCK = 64
# A ring buffer with a mask is used while at least this share of the keys in its window are allowed; below it the
# allowed keys are gathered instead. A gather reads each allowed key, writes it and reads the copy again, where the
# ring reads 1 / density keys per allowed one: the ring moves less memory above about one in three.
RING_MIN_DENSITY = 1 / 3
# A step of a small batch is a few hundred small ops, and below this much work per dim × dim linear (rows · dim²
# multiply-adds) a CPU's intra-op threads cost more in hand-offs than they share: decoding then runs on one thread.
# On 2 cores, ms per step with one / two threads: dim 256, 8 rows 2.45 / 4.30, 32 rows 5.87 / 6.60, 64 rows 11.1 /
# 9.9, 256 rows 27.0 / 20.2; dim 512, 8 rows 6.22 / 5.95, 16 rows 9.24 / 8.00.
ONE_THREAD_WORK = 32 * 256 * 256

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SampleConfig:
    temperature: float = option(1.0, "divide the logits by this before sampling (below 1: safer, less varied)")
    top_k: int | None = option(None, "sample only among the k most likely codes (default: all)")
    top_p: float | None = option(None, "nucleus sampling: only the most likely codes whose probabilities add up to "
                                 "p (default: all)")
    seed: int | None = option(0, "random seed: the same seed gives the same images (None: fresh randomness)")

    def __post_init__(self) -> None:
        check(self.temperature > 0 and math.isfinite(self.temperature), self, "temperature", "must be positive")
        check(self.top_k is None or self.top_k >= 1, self, "top_k", "must be at least 1")
        check(self.top_p is None or 0.0 < self.top_p <= 1.0, self, "top_p", "must be in (0, 1]")
        check(self.seed is None or self.seed >= 0, self, "seed", "must be >= 0")


def resolve_config(config: SampleConfig | None, overrides: dict[str, Any]) -> SampleConfig:
    """``config`` (default: :class:`SampleConfig`) with fields replaced by keyword ``overrides``."""
    try:
        return dataclasses.replace(config or SampleConfig(), **overrides)
    except TypeError as e:  # an unknown keyword
        raise UserError(f"unknown sampling option: {e}") from None


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``(B, K)`` logits with everything outside the top-k and then the top-p nucleus set to −inf.

    Top-p keeps the smallest set of most likely codes whose probability reaches ``p`` (always at least one).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)  # (B, K) each
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # (B, K) mass of the more likely codes
        ordered = ordered.masked_fill(before >= top_p, -math.inf)  # the most likely code has 0 before it: kept
        logits = torch.empty_like(logits).scatter_(-1, order, ordered)
    return logits


def draw(logits: torch.Tensor, config: SampleConfig, gumbel: torch.Tensor) -> torch.Tensor:
    """Codes ``(B,)`` from logits ``(B, K)``: temperature, top-k / top-p, then Gumbel-max with noise ``(B, K)``."""
    logits = logits.float() if config.temperature == 1.0 else logits.float() / config.temperature
    return (filter_logits(logits, config.top_k, config.top_p) + gumbel).argmax(-1)


class GumbelNoise:
    """Gumbel noise per (sample, cell): ``generators`` is one generator for the batch, one per sample, or None
    (torch's global generator). Blocks of :data:`NOISE_BLOCK` cells are drawn in order (cells must be asked for in
    increasing order), so cell ``j`` always gets the same noise whatever the prompt length."""

    def __init__(self, generators: Generators, batch: int, n_cells: int, n_codes: int, device: torch.device):
        if isinstance(generators, Sequence) and len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        self.generators, self.batch, self.n_cells, self.n_codes = generators, batch, n_cells, n_codes
        self.device = device
        self.block, self.next_block = None, 0  # the latest block only: memory stays at one block

    def _block(self, start: int) -> torch.Tensor:
        size = min(NOISE_BLOCK, self.n_cells - start)
        shape = (size, self.n_codes)
        # Uniform draws, not exponential_: six times faster on CPU, where the noise was a tenth of a step.
        if isinstance(self.generators, Sequence):
            u = torch.stack([torch.empty(shape, device=self.device).uniform_(generator=g)
                             for g in self.generators])  # (B, size, K)
        else:
            u = torch.empty((self.batch, *shape), device=self.device).uniform_(generator=self.generators)
        # −log(−log U) ~ Gumbel(0, 1); U in [tiny, 1) keeps it finite (U = 0 would give −inf)
        return u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()

    def __call__(self, cell: int) -> torch.Tensor:
        """``(B, K)`` noise of ``cell``."""
        wanted = cell // NOISE_BLOCK
        if wanted < self.next_block - 1:
            raise ValueError(f"noise of cell {cell} was asked for after later cells")
        while self.next_block <= wanted:  # skipped blocks (a long prompt) are drawn too, to stay in step
            self.block = self._block(self.next_block * NOISE_BLOCK)
            self.next_block += 1
        return self.block[:, cell % NOISE_BLOCK]


def make_generators(config: SampleConfig, device: torch.device, generator: Generators) -> Generators:
    """The caller's generator(s), else one seeded with ``config.seed``, else None (torch's global generator)."""
    if generator is not None or config.seed is None:
        return generator
    return torch.Generator(device).manual_seed(config.seed)


# --- the cache -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """Where a layer stores image position ``i`` and which image keys a query at ``i`` reads (module docstring)."""

    mode: str  # "prefix", "ring", "strided" or "gather"
    window: int  # image slots in the buffer
    slots: tuple[int, ...]  # per image position: the image slot of its key and value
    spans: tuple[tuple[int, int], ...]  # per image position: the image slots [lo, hi) it reads (all but gather)
    masks: tuple[torch.Tensor | None, ...]  # per image position: additive (1, hi − lo) mask, or None if all allowed
    index: tuple[torch.Tensor | None, ...]  # per image position: the image slots to gather (gather mode)


def _stride(allowed: torch.Tensor) -> int | None:
    """``s`` if every image query ``i`` may read exactly the keys ``i, i − s, i − 2s, …`` (column layers), else None."""
    n = allowed.shape[0]
    offsets = (torch.arange(n)[:, None] - torch.arange(n)[None, :])[allowed]
    positive = offsets[offsets > 0]
    if len(positive) == 0:
        return None
    s = int(positive.min())
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return s if torch.equal(allowed, (j <= i) & ((i - j) % s == 0)) else None


@functools.lru_cache(maxsize=64)
def layer_plan(kind: str, layout: Layout, device: torch.device, dtype: torch.dtype) -> LayerPlan:
    """The cache plan of a ``kind`` layer, derived from :func:`~dalle.models.attention.mask_function` alone."""
    t, n = layout.text_len, layout.image_len
    full = dense_mask(kind, layout)  # (L, L) bool
    if not bool(full[t:, :t].all()):
        raise ValueError(f"{kind} layers hide text from image queries; the cache assumes every image query sees "
                         "all text (paper §2.2)")
    allowed = full[t:, t:]  # (N, N) image → image
    offsets = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # (N, N) i − j
    window = int(offsets[allowed].max()) + 1
    visible = torch.arange(n).clamp(max=window - 1) + 1  # (N,) keys a ring of `window` slots would hold
    density = float(allowed.sum()) / float(visible.sum())
    stride = _stride(allowed)
    if density == 1.0:
        mode = "prefix" if window == n else "ring"
    elif density >= RING_MIN_DENSITY:
        mode = "ring"
    else:
        mode = "strided" if stride is not None else "gather"
    masks: list[torch.Tensor | None] = [None] * n
    index: list[torch.Tensor | None] = [None] * n
    if mode == "strided":  # column-major: one column's rows lie side by side
        rows = -(-n // stride)
        window = stride * rows
        slots = [i % stride * rows + i // stride for i in range(n)]
        spans = [(i % stride * rows, i % stride * rows + i // stride + 1) for i in range(n)]
    elif mode == "gather":
        window = n
        slots, spans = list(range(n)), [(0, 0)] * n
        index = [allowed[i].nonzero().flatten().to(device) for i in range(n)]
    else:  # prefix: a ring that never wraps
        slots = [i % window for i in range(n)]
        spans = [(0, min(i + 1, window)) for i in range(n)]
        for i in range(n):
            if not bool(allowed[i, max(0, i - window + 1):i + 1].all()):
                held = i - (i - torch.arange(min(i + 1, window))) % window  # image position in each slot
                masks[i] = torch.zeros(1, len(held), dtype=dtype).masked_fill_(~allowed[i, held], -math.inf
                                                                                ).to(device)
    return LayerPlan(mode, window, tuple(slots), tuple(spans), tuple(masks), tuple(index))


def group_size(rows: torch.Tensor) -> int:
    """The largest ``n`` such that ``rows`` ``(B, ...)`` come in blocks of ``n`` identical consecutive rows."""
    if len(rows) < 2:
        return len(rows)
    changes = (rows[1:] != rows[:-1]).flatten(1).any(1).nonzero().flatten() + 1  # first row of each later run
    bounds = [0, *changes.tolist(), len(rows)]
    return functools.reduce(math.gcd, (b - a for a, b in zip(bounds, bounds[1:])))


class KVCache:
    """Preallocated keys and values of every layer: the caption's ``(2, U, H, text_len, D)``, one copy per group of
    ``B / U`` consecutive rows that share it (a caption's candidates), and each row's image positions
    ``(2, B, H, window, D)``."""

    def __init__(self, plans: Sequence[LayerPlan], text_len: int, batch: int, groups: int, n_heads: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype):
        self.plans, self.text_len, self.batch, self.groups = tuple(plans), text_len, batch, groups
        self.text = [torch.empty(2, groups, n_heads, text_len, head_dim, device=device, dtype=dtype) for _ in plans]
        self.image = [torch.empty(2, batch, n_heads, p.window, head_dim, device=device, dtype=dtype) for p in plans]

    @property
    def buffers(self) -> list[torch.Tensor]:
        return self.text + self.image

    def fits(self, batch: int, groups: int, device: torch.device, dtype: torch.dtype) -> bool:
        b = self.image[0]
        return (self.batch, self.groups) == (batch, groups) and b.device == device and b.dtype == dtype

    def fill(self, layer: int, text: torch.Tensor, image: torch.Tensor) -> None:
        """Store the caption's keys and values ``(2, U, H, text_len, D)`` and those of image positions
        ``0 … m − 1``, ``(2, B, H, m, D)``."""
        plan, buf = self.plans[layer], self.image[layer]
        self.text[layer].copy_(text)
        m = image.shape[3]
        first = max(0, m - plan.window)  # older ones fall out of a ring
        slots = torch.tensor(plan.slots[first:m], device=buf.device)
        buf.index_copy_(3, slots, image[:, :, :, first:])

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


def attend_step(q: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row, ``q`` ``(B, H, D)``, over the caption's keys and values ``text``
    ``(2, U, H, t, D)`` (shared by blocks of ``B / U`` consecutive rows) and the row's own image ``keys`` and
    ``values`` ``(B, H, m, D)`` behind an additive ``mask`` ``(1, m)``; → ``(B, H, D)``.

    One softmax over both parts, as SDPA over their concatenation would give, without copying either: the shared
    caption keys are read once per group, as a matrix product with the group's queries.
    """
    b, h, d = q.shape
    u, t, m = text.shape[1], text.shape[3], keys.shape[2]
    q = q * d ** -0.5
    grouped = q.view(u, b // u, h, d).transpose(1, 2)  # (U, H, n, D)
    s_text = torch.matmul(grouped, text[0].transpose(-1, -2)).transpose(1, 2).reshape(b, h, t)  # (B, H, t)
    s_image = torch.matmul(q.unsqueeze(2), keys.transpose(-1, -2)).squeeze(2)  # (B, H, m)
    if mask is not None:
        s_image = s_image + mask
    p = torch.cat([s_text, s_image], -1).softmax(-1, dtype=torch.float32).to(q.dtype)  # (B, H, t + m)
    p_text, p_image = p.split([t, m], -1)
    out = torch.matmul(p_text.view(u, b // u, h, t).transpose(1, 2), text[1]).transpose(1, 2)  # (U, n, H, D)
    return out.reshape(b, h, d) + torch.matmul(p_image.unsqueeze(2), values).squeeze(2)


# --- the decoder -----------------------------------------------------------------------------------------------


def packed_linears_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can run our one-position matmuls from pre-packed weights: on the CPU, in fp32, or in bf16 where
    oneDNN supports it, with torch built with it."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        if supported is None or not supported():
            return False
    elif dtype != torch.float32:
        return False
    return hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _Linear:
    """``x @ weight.T`` for the few rows of a step, optionally fused with GELU or a residual add.

    A step multiplies only B rows by each weight matrix: little work per weight read, where generic GEMM kernels are
    inefficient. On CPU, oneDNN with the weights re-packed once into its blocked layout (what ``torch.compile`` uses
    for frozen CPU models) ran the tiny preset's 16 matmuls of a step in 0.92 ms instead of 1.45 ms with
    ``F.linear`` (batch 8, one thread, measured on the project's 2-core machine), and it fuses GELU and the residual
    add. The packed copy is taken when the decoder is built; other devices and dtypes use plain ``F.linear``.
    """

    __slots__ = ("weight", "packed")

    def __init__(self, weight: torch.Tensor, packed: bool, batch_hint: int = 8):
        self.weight = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint) if packed else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.gelu(F.linear(x, self.weight))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "gelu", [], "none")  # exact (erf) GELU

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + x @ weight.T``."""
        if self.packed is None:
            return torch.addmm(residual, x, self.weight.t())
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, None, "add")


class _Layer:
    """One block's weights, its plan and cache buffers, laid out for a one-position step."""

    __slots__ = ("ln_1", "qkv", "proj", "ln_2", "fc", "out", "plan", "text", "image", "writes", "keys", "n_heads",
                 "head_dim")

    def __init__(self, block: torch.nn.Module, plan: LayerPlan, packed: bool):
        self.ln_1, self.ln_2 = ((m.normalized_shape, m.weight, m.bias, m.eps) for m in (block.ln_1, block.ln_2))
        self.qkv, self.proj = _Linear(block.attn.qkv.weight, packed), _Linear(block.attn.proj.weight, packed)
        self.fc, self.out = _Linear(block.mlp.fc.weight, packed), _Linear(block.mlp.proj.weight, packed)
        self.n_heads, self.head_dim = block.attn.n_heads, block.attn.head_dim
        self.plan = plan
        self.text, self.image, self.writes, self.keys = None, None, (), ()

    def attach(self, text: torch.Tensor, image: torch.Tensor) -> None:
        """Use the buffers ``text`` (2, U, H, t, D) and ``image`` (2, B, H, W, D), with the views every step
        writes and reads made once here."""
        plan = self.plan
        self.text, self.image = text, image
        self.writes = [image[:, :, :, s] for s in plan.slots]  # (2, B, H, D) per image position
        self.keys = [None if index is not None else image[:, :, :, lo:hi].unbind(0)  # (B, H, m, D) keys and values
                     for (lo, hi), index in zip(plan.spans, plan.index)]

    def step(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The block on image position ``i`` alone: ``(B, dim)`` → ``(B, dim)``; stores its key and value."""
        b, plan = x.shape[0], self.plan
        qkv = self.qkv(torch.layer_norm(x, *self.ln_1)).view(b, 3, self.n_heads, self.head_dim)  # (B, 3, H, D)
        self.writes[i].copy_(qkv[:, 1:].transpose(0, 1))  # (2, B, H, D) into the cache
        keys = self.keys[i]
        if keys is None:
            keys = self.image.index_select(3, plan.index[i])  # (2, B, H, m, D): the allowed keys only
        y = attend_step(qkv[:, 0], self.text, keys[0], keys[1], plan.masks[i])  # (B, H, D)
        x = self.proj.add(y.reshape(b, -1), x)  # x + attention
        return self.out.add(self.fc.gelu(torch.layer_norm(x, *self.ln_2)), x)  # x + MLP


class PriorDecoder:
    """Runs a :class:`PriorTransformer` one image position at a time with a :class:`KVCache`.

    ``prefill(text_ids, pad_mask, prompt)`` runs the caption, the begin-of-image token and ``prompt`` (``(B, n)``
    known leading codes) in one pass and returns the logits ``(B, codebook_size)`` of cell ``n``; each
    ``step(codes)`` feeds the codes ``(B,)`` of the next cell and returns the logits of the one after. The model
    must be in eval mode (no dropout) and is not copied: build a new decoder after changing its weights.
    """

    def __init__(self, model: PriorTransformer, packed: bool | None = None):
        if model.training:
            raise UserError("sampling needs the prior in eval mode (call model.eval()): dropout would make it random")
        self.model, cfg = model, model.config
        self.text_len, self.grid_size, self.image_len = cfg.text_len, cfg.grid_size, cfg.image_len
        param = model.image_head.weight
        self.device, self.dtype = param.device, param.dtype
        self.packed = packed_linears_available(self.device, self.dtype) if packed is None else packed
        self.layers = [_Layer(b, layer_plan(b.attn.kind, cfg.layout, self.device, self.dtype), self.packed)
                       for b in model.blocks]
        self.head = _Linear(model.image_head.weight, self.packed)
        g = cfg.grid_size
        cells = torch.arange(cfg.image_len, device=self.device)
        with torch.no_grad():  # position of each cell (§2.2: row + column embedding), added once per step
            self.cell_pos = (model.image_row[cells // g] + model.image_col[cells % g]).detach()  # (N, dim)
        self.ln_f = (model.ln_f.normalized_shape, model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
        self.code_emb = model.image_emb.weight.detach()  # (K, dim)
        self.cache: KVCache | None = None
        self.position = 0  # image position the next step feeds

    def _cache_for(self, batch: int, groups: int) -> KVCache:
        if self.cache is None or not self.cache.fits(batch, groups, self.device, self.dtype):
            cfg = self.model.config
            self.cache = KVCache([layer.plan for layer in self.layers], cfg.text_len, batch, groups, cfg.n_heads,
                                 cfg.head_dim, self.device, self.dtype)
            for layer, text, image in zip(self.layers, self.cache.text, self.cache.image):
                layer.attach(text, image)
        return self.cache

    def check_prompt(self, prompt: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``prompt`` as ``(B, n)`` int64 codes on the model's device (``n = 0`` for None), or a UserError."""
        if prompt is None:
            return torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        if prompt.dim() != 2 or prompt.shape[0] != batch or prompt.is_floating_point():
            raise UserError(f"a prompt must be an integer tensor (B, n) of leading codes with B = {batch}, got "
                            f"{tuple(prompt.shape)} {prompt.dtype}")
        if prompt.shape[1] > self.image_len:
            raise UserError(f"a prompt of {prompt.shape[1]} codes is longer than the {self.image_len} of the grid")
        if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= self.model.config.codebook_size):
            raise UserError(f"prompt codes must be in [0, {self.model.config.codebook_size})")
        return prompt.to(self.device, torch.long)

    @torch.inference_mode()
    def prefill(self, text_ids: torch.Tensor, pad_mask: torch.Tensor, prompt: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits ``(B, codebook_size)`` of cell ``n`` after the caption and ``n < grid_size²`` prompt codes."""
        model, batch = self.model, text_ids.shape[0]
        model._check_text(text_ids, pad_mask)
        prompt = self.check_prompt(prompt, batch)
        if prompt.shape[1] >= self.image_len:
            raise UserError("the prompt already fills the grid: nothing is left to predict")
        # Candidates of one caption share its prefix: run each distinct row once and copy its keys and values.
        # Blocks of identical consecutive rows also keep one copy of the caption's keys and values for every step.
        rows = torch.cat([text_ids, pad_mask.long(), prompt], dim=1)  # (B, text_len * 2 + n)
        group = group_size(rows)
        cache = self._cache_for(batch, batch // group)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, ...), (B,)
        t = self.text_len
        if len(unique) == batch:
            inverse = None
        else:
            text_ids, pad_mask, prompt = unique[:, :t], unique[:, t:2 * t].bool(), unique[:, 2 * t:]
        x = torch.cat([model.embed_text(text_ids, pad_mask), model.embed_image(prompt)], dim=1)  # (U, L0, dim)
        b, length, _ = x.shape
        for i, block in enumerate(model.blocks):  # Block.forward, keeping each layer's keys and values
            attn = block.attn
            qkv = attn.qkv(block.ln_1(x)).view(b, length, 3, attn.n_heads, attn.head_dim)  # (U, L0, 3, H, D)
            kv = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)  # (2, U, H, L0, D)
            text, image = kv[:, :, :, :t], kv[:, :, :, t:]
            if inverse is not None:
                text, image = text[:, inverse[::group]], image[:, inverse]
            cache.fill(i, text, image)
            x = x + attn.proj(attend(qkv, attn.kind, attn.layout, attn.impl).reshape(b, length, -1))
            x = x + block.mlp(block.ln_2(x))
        self.position = length - self.text_len  # image positions fed: begin-of-image + n codes
        logits = model.image_head(model.ln_f(x[:, -1]))  # (U, K)
        return logits if inverse is None else logits[inverse]  # (B, K)

    @torch.inference_mode()
    def step(self, codes: torch.Tensor) -> torch.Tensor:
        """Feed the codes ``(B,)`` of the next cell; logits ``(B, codebook_size)`` of the cell after it."""
        i = self.position
        if not 1 <= i < self.image_len:
            raise UserError(f"step at image position {i}: call prefill first, and at most grid_size² − 1 steps")
        x = torch.embedding(self.code_emb, codes) + self.cell_pos[i - 1]  # (B, dim): code of cell i − 1
        for layer in self.layers:
            x = layer.step(x, i)
        self.position = i + 1
        return self.head(torch.layer_norm(x, *self.ln_f))  # (B, K)

    def sample(self, text_ids: torch.Tensor, pad_mask: torch.Tensor, config: SampleConfig | None = None, *,
               prompt: torch.Tensor | None = None, generator: Generators = None, **overrides: Any) -> torch.Tensor:
        """Codes ``(B, grid_size, grid_size)`` for captions ``(B, text_len)``; see :func:`sample_codes`."""
        config = resolve_config(config, overrides)
        with torch.inference_mode(), self._threads(text_ids.shape[0]):
            codes = self._sample(text_ids, pad_mask, config, prompt, generator)
        return codes.clone()  # an ordinary tensor, usable where autograd is on (inference tensors are not)

    @contextlib.contextmanager
    def _threads(self, rows: int) -> Iterator[None]:
        """One intra-op thread while decoding a batch too small to share out on CPU (:data:`ONE_THREAD_WORK`)."""
        threads = torch.get_num_threads()
        if self.device.type != "cpu" or threads == 1 or rows * self.model.config.dim ** 2 > ONE_THREAD_WORK:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _sample(self, text_ids: torch.Tensor, pad_mask: torch.Tensor, config: SampleConfig,
                prompt: torch.Tensor | None, generator: Generators) -> torch.Tensor:
        batch = text_ids.shape[0]
        prompt = self.check_prompt(prompt, batch)
        codes = torch.empty(batch, self.image_len, dtype=torch.long, device=self.device)  # (B, N)
        n = prompt.shape[1]
        codes[:, :n] = prompt
        if n < self.image_len:
            noise = GumbelNoise(make_generators(config, self.device, generator), batch, self.image_len,
                                self.model.config.codebook_size, self.device)
            logits = self.prefill(text_ids, pad_mask, prompt)
            for j in range(n, self.image_len):
                code = draw(logits, config, noise(j))  # (B,)
                codes[:, j] = code
                if j + 1 < self.image_len:
                    logits = self.step(code)
        return codes.view(batch, self.grid_size, self.grid_size)


def sample_codes(model: PriorTransformer, text_ids: torch.Tensor, pad_mask: torch.Tensor,
                 config: SampleConfig | None = None, *, prompt: torch.Tensor | None = None,
                 generator: Generators = None, **overrides: Any) -> torch.Tensor:
    """Image codes ``(B, grid_size, grid_size)`` drawn cell by cell (KV-cached) given captions ``(B, text_len)``.

    ``config`` or keyword overrides (``temperature=``, ``top_k=``, ``top_p=``, ``seed=``) set the sampling;
    ``prompt`` ``(B, n)`` holds known leading codes in raster order, returned unchanged (``n = grid_size²``
    returns the prompt). ``generator`` is one ``torch.Generator`` for the batch or one per row (each row's codes
    then depend on its generator alone); without it ``config.seed`` seeds one.
    """
    return PriorDecoder(model).sample(text_ids, pad_mask, config, prompt=prompt, generator=generator, **overrides)


def sample_codes_uncached(model: PriorTransformer, text_ids: torch.Tensor, pad_mask: torch.Tensor,
                          config: SampleConfig | None = None, *, prompt: torch.Tensor | None = None,
                          generator: Generators = None, **overrides: Any) -> torch.Tensor:
    """The reference for :func:`sample_codes`: the same draws, but every step runs the whole prefix again.

    O(N²) work and no cache, so simple enough to trust: with the same noise, both give the same codes.
    """
    config = resolve_config(config, overrides)
    cfg, batch = model.config, text_ids.shape[0]
    codes = PriorDecoder(model).check_prompt(prompt, batch)  # (B, n)
    noise = GumbelNoise(make_generators(config, codes.device, generator), batch, cfg.image_len, cfg.codebook_size,
                        codes.device)
    with torch.no_grad():
        for j in range(codes.shape[1], cfg.image_len):
            h = model.hidden_states(text_ids, pad_mask, codes)  # (B, text_len + j + 1, dim)
            logits = model.image_head(h[:, -1])  # (B, K): the last position predicts cell j
            codes = torch.cat([codes, draw(logits, config, noise(j))[:, None]], dim=1)  # (B, j + 1)
    return codes.view(batch, cfg.grid_size, cfg.grid_size)
