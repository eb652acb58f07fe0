"""OpenAI's CLIP and open_clip's CLIP models in plain torch, loaded from a checkpoint the user already has.

The paper reranks its samples with a pretrained CLIP. None can be downloaded here, so by default we train our own
(:mod:`dalle.models.reranker`); a user who has CLIP weights on disk can rerank and evaluate with them instead, wherever
a reranker is accepted (``dalle generate --reranker``, ``dalle reranker eval --model``, ``dalle eval --reranker``).

What loads (the architecture is read from the tensor shapes, as OpenAI's ``clip.model.build_model`` does):

* OpenAI's released files (``ViT-B-32.pt``, ``RN50.pt``, ...): TorchScript archives. They are read by
  :func:`dalle.checkpoint.read_torchscript_tensors`, which takes the tensors out of the archive without running its
  code or unpickling anything but tensors and module containers;
* open_clip checkpoints: a state dict in ``.bin`` / ``.pt`` (loaded with ``weights_only=True``) or ``.safetensors``,
  a training checkpoint (``{"state_dict": ...}``, a ``module.`` prefix is removed), or a model directory with
  ``open_clip_config.json`` (its ``quick_gelu`` and head sizes are used);
* image towers: the vision transformer and the "modified ResNet" (RN50, RN101, RN50x4, ...); text tower: the causal
  transformer pooled at the end-of-text token. Other open_clip towers (timm, Hugging Face text) are refused by name.

The BPE vocabulary is not in the checkpoints: :func:`dalle.tokenizers.clip_bpe.find_vocab` looks for
``bpe_simple_vocab_16e6.txt.gz`` beside the checkpoint, in an installed ``open_clip`` or ``clip`` package, or takes
``--clip-vocab``. Parity with open_clip (same embeddings for the same weights and inputs) is tested with random weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle.checkpoint import read_torchscript_tensors
from dalle.clip_options import ACTIVATIONS
from dalle.errors import UserError
from dalle.models.reranker import (
    CLIP_KINDS,
    WEIGHT_SUFFIXES,
    Scorer,
    inspect_checkpoint,
    is_torchscript_archive,
    read_state_dict,
    weight_files,
)
from dalle.tokenizers.clip_bpe import ClipTokenizer, find_vocab

# The normalisation CLIP's image encoders were trained with (OpenAI's preprocessing).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # every released CLIP uses 64-dimensional heads in both towers
# Keys in released checkpoints that are not weights (OpenAI's JIT files keep these as attributes).
NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, ...]  # an int: vision transformer; a tuple: blocks per ResNet stage
    vision_width: int
    vision_patch_size: int | None  # None for the ResNet
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    activation: str = "quick_gelu"

    @property
    def is_vit(self) -> bool:
        return isinstance(self.vision_layers, int)

    def describe(self) -> str:
        tower = (f"ViT {self.vision_layers} layers, width {self.vision_width}, patch {self.vision_patch_size}"
                 if self.is_vit else f"ResNet {'-'.join(map(str, self.vision_layers))}, width {self.vision_width}")
        return (f"CLIP ({tower}, {self.image_resolution} px; text {self.text_layers} layers, width {self.text_width}, "
                f"{self.context_length} tokens; embedding {self.embed_dim}; {self.activation})")

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], activation: str = "quick_gelu",
                        vision_heads: int | None = None, text_heads: int | None = None) -> ClipConfig:
        """Read the architecture from tensor shapes (raises ``UserError`` naming what is missing)."""
        def shape(key: str) -> torch.Size:
            if key not in state:
                raise UserError(f"not a CLIP state dict: no tensor {key!r}")
            return state[key].shape

        def count(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

        text_width = shape("ln_final.weight")[0]
        text = dict(embed_dim=shape("text_projection")[1], context_length=shape("positional_embedding")[0],
                    vocab_size=shape("token_embedding.weight")[0], text_width=text_width,
                    text_heads=text_heads or max(1, text_width // HEAD_WIDTH),
                    text_layers=count("transformer.resblocks."), activation=activation)
        if "visual.proj" in state:  # vision transformer
            width, _, patch, _ = shape("visual.conv1.weight")
            grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
            return cls(image_resolution=patch * grid, vision_layers=count("visual.transformer.resblocks."),
                       vision_width=width, vision_patch_size=patch,
                       vision_heads=vision_heads or max(1, width // HEAD_WIDTH), **text)
        if "visual.layer1.0.conv1.weight" in state:  # modified ResNet
            width = shape("visual.layer1.0.conv1.weight")[0]
            grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
            layers = tuple(count(f"visual.layer{i}.") for i in range(1, 5))
            return cls(image_resolution=grid * 32, vision_layers=layers, vision_width=width, vision_patch_size=None,
                       vision_heads=vision_heads or max(1, width * 32 // HEAD_WIDTH), **text)
        raise UserError("unsupported CLIP image tower: only the vision transformer (visual.proj) and the modified "
                        "ResNet (visual.layer1...) of OpenAI / open_clip load")


# --- towers ----------------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, batch first, through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise UserError(f"CLIP width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(width), Attention(width, heads), nn.LayerNorm(width)
        act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", act)
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str, causal: bool):
        super().__init__()
        self.causal = causal
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, activation) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, width)
        for block in self.resblocks:
            x = block(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        w, p = c.vision_width, c.vision_patch_size
        grid = c.image_resolution // p
        self.conv1 = nn.Conv2d(3, w, p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, c.vision_layers, c.vision_heads, c.activation, causal=False)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, c.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, R, R) normalised
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid², w)
        cls = self.class_embedding.expand(len(x), 1, -1)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding)
        return self.ln_post(self.transformer(x)[:, 0]) @ self.proj  # (B, E)


class Bottleneck(nn.Module):
    """CLIP's ResNet block: stride by an average pool after the 3×3 conv, and before the shortcut's 1×1 conv."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool(nn.Module):
    """Attention pooling of the last feature map, queried by its mean (the mean token's output is the embedding)."""

    def __init__(self, grid: int, width: int, heads: int, out: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding  # (B, HW + 1, C)
        b, n, c = x.shape
        heads = lambda t: t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.c_proj(y.transpose(1, 2).reshape(b, c))  # (B, out)


class ModifiedResNet(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        w = c.vision_width
        self.conv1, self.bn1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w // 2)
        self.conv2, self.bn2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False), nn.BatchNorm2d(w // 2)
        self.conv3, self.bn3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        inplanes = w
        for i, blocks in enumerate(c.vision_layers):
            planes = w * 2**i
            stage = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            stage += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * 4
        self.attnpool = AttentionPool(c.image_resolution // 32, w * 32, c.vision_heads, c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = F.avg_pool2d(x, 2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class ClipModel(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = c = config
        self.visual = VisionTransformer(c) if c.is_vit else ModifiedResNet(c)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.activation, causal=True)
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, R, R)`` images already normalised with MEAN / STD → ``(B, E)`` unit embeddings."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, context_length)`` token ids with end-of-text as the largest id → ``(B, E)`` unit embeddings."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.ln_final(self.transformer(x))
        pooled = x[torch.arange(len(x), device=x.device), ids.argmax(-1)]  # the end-of-text token
        return F.normalize(pooled @ self.text_projection, dim=-1)


# --- checkpoints -----------------------------------------------------------------------------------------------------


def is_clip_checkpoint(path: str | Path) -> bool:
    """Whether :func:`load_clip_state` would recognise ``path`` (cheap: reads names, not tensors)."""
    return inspect_checkpoint(path)[0] in CLIP_KINDS


def load_clip_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(float32 state dict, options of an ``open_clip_config.json``) of a CLIP checkpoint; no pickled code is run."""
    path = Path(path)
    options: dict[str, object] = {}
    if path.is_dir():
        cfg_file = path / "open_clip_config.json"
        if cfg_file.is_file():
            try:
                model_cfg = json.loads(cfg_file.read_text()).get("model_cfg", {})
            except (OSError, ValueError, AttributeError) as e:
                raise UserError(f"cannot read {cfg_file}: {e}") from None
            options = {"quick_gelu": bool(model_cfg.get("quick_gelu", False)),
                       "vision_heads": _heads(model_cfg.get("vision_cfg", {})),
                       "text_heads": model_cfg.get("text_cfg", {}).get("heads")}
        files = weight_files(path)
        if not files:
            raise UserError(f"{path} holds no weights file ({', '.join(WEIGHT_SUFFIXES)})")
        path = files[0]
    if is_torchscript_archive(path):
        state = read_torchscript_tensors(path)
        options.setdefault("quick_gelu", True)  # OpenAI's own models
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path} as safetensors: {e}") from None
    else:
        state = read_state_dict(path)
        if state is None:
            raise UserError(f"cannot read {path} as a state dict (loaded with weights_only=True)")
    state = {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()
             if isinstance(v, torch.Tensor) and k.removeprefix("module.") not in NOT_WEIGHTS}
    return state, options


def _heads(vision_cfg: dict) -> int | None:
    width, head_width = vision_cfg.get("width"), vision_cfg.get("head_width", HEAD_WIDTH)
    if not isinstance(width, int):
        return None
    layers = vision_cfg.get("layers")
    return width * 32 // head_width if isinstance(layers, list) else width // head_width


def load_clip_model(path: str | Path, activation: str | None = None) -> ClipModel:
    """A :class:`ClipModel` with the checkpoint's weights (eval mode, float32, CPU)."""
    state, options = load_clip_state(path)
    if activation is None:
        activation = "quick_gelu" if options.get("quick_gelu", False) else "gelu"
    if activation not in ACTIVATIONS:
        raise UserError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    config = ClipConfig.from_state_dict(state, activation, options.get("vision_heads"), options.get("text_heads"))
    with torch.device("meta"):
        model = ClipModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # BatchNorm's counters are not weights (and absent from OpenAI's ResNet archives).
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserError(f"{path} does not match {config.describe()}: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]} (open_clip towers other than ViT / modified ResNet are not supported)")
    for name, buf in model.named_buffers():
        if buf.is_meta:  # num_batches_tracked of BatchNorm, when the checkpoint lacks it
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, torch.zeros((), dtype=buf.dtype))
    return model.eval()


class ClipReranker(Scorer):
    """A pretrained CLIP behind the same interface as our own reranker (``embed_images``, ``score``, ``rerank``)."""

    def __init__(self, model: ClipModel, tokenizer: ClipTokenizer, name: str = "CLIP"):
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", vocab: str | Path | None = None,
                        activation: str | None = None) -> ClipReranker:
        model = load_clip_model(path, activation).to(device)
        tokenizer = ClipTokenizer(find_vocab(vocab, beside=Path(path)), model.config.context_length)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise UserError(f"the BPE vocabulary has {tokenizer.vocab_size} tokens but {path} was trained with "
                            f"{model.config.vocab_size}: give the vocabulary the model was trained with (--clip-vocab)")
        return cls(model, tokenizer, f"CLIP {Path(path).name}")

    @property
    def resolution(self) -> int:
        return self.model.config.image_resolution

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    def normalize(self, caption: str) -> str:
        return self.tokenizer.normalize(caption)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images → CLIP's input: resized (bicubic) to its resolution, normalised with its mean and std."""
        x = self.resize(images, self.resolution, mode="bicubic")
        mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for v in (MEAN, STD))
        return (x - mean) / std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer.encode_batch(list(captions)).to(self.device))
