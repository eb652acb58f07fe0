"""OpenAI's released dVAE ↔ ours: safe loading of their files, config inference, state-dict mapping.

OpenAI published the dVAE as ``encoder.pkl`` / ``decoder.pkl``: whole ``dall_e`` modules pickled with ``torch.save``.
Unpickling those normally runs whatever the file names, so we never do. :func:`load_openai_file` reads them with
``torch.load(weights_only=True)``, whose restricted unpickler refuses every global not on an allow-list; we add to
that list only the module classes such a file names (``dall_e.encoder.Encoder``, ``torch.nn...Sequential``, ...),
each mapped to :class:`PickledModule`, a stand-in that keeps the parameter tables and nothing else. No ``dall_e``
code is imported or run, and anything else (``os.system``, ...) is refused with a :class:`UserError`.

Our parameter names are OpenAI's (:mod:`dalle.models.dvae`), so the mapping is a prefix (``encoder.``/``decoder.``)
plus a check that every key and shape fits the configuration inferred from the tensors.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dalle.checkpoint import load_tensors
from dalle.errors import UserError
from dalle.models.dvae import DVAE, DVAEConfig

ENCODER, DECODER = "encoder", "decoder"
_BLOCK_KEY = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.")


class PickledModule:
    """Inert stand-in for a pickled ``nn.Module``: keeps its parameter, buffer and child tables, runs no code."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected module state of type {type(state).__name__}")
        self.params = state.get("_parameters") or {}
        self.buffers = state.get("_buffers") or {}
        self.non_persistent = state.get("_non_persistent_buffers_set") or set()
        self.children = state.get("_modules") or {}

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors ``nn.Module.state_dict`` would list, under the same dotted names."""
        out: dict[str, torch.Tensor] = {}
        tables = (self.params.items(), ((k, v) for k, v in self.buffers.items() if k not in self.non_persistent))
        for table in tables:
            for name, tensor in table:
                if tensor is None:
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise UserError(f"pickled module entry {prefix}{name} is a {type(tensor).__name__}, not a tensor")
                out[prefix + name] = tensor.detach()
        for name, child in self.children.items():
            if child is None:
                continue
            if not isinstance(child, PickledModule):
                raise UserError(f"pickled module child {prefix}{name} is a {type(child).__name__}, not a module")
            out.update(child.state_dict(f"{prefix}{name}."))
        return out


# Every class a pickled dall_e Encoder / Decoder names, and nothing else.
_MODULE_CLASSES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)
_STAND_INS = [(PickledModule, name) for name in _MODULE_CLASSES]


def load_openai_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """OpenAI's pickled module, a state-dict ``.pt``/``.pth`` or a ``.safetensors`` file → a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        # Pre-1.6 torch.save stored a module's source code beside it, which the weights-only reader refuses.
        hint = "; modules pickled in torch's pre-1.6 format are not supported" if "persistent_load" in reason else ""
        raise UserError(f"refusing to load {path}: not a dVAE module, state dict or safetensors file that can be "
                        f"read safely ({reason}){hint}") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError, KeyError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(obj, PickledModule):
        return obj.state_dict()
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
        return dict(obj)
    raise UserError(f"{path} holds a {type(obj).__name__}, not a dVAE module or a state dict of tensors")


def _unpickling_reason(error: Exception) -> str:
    """The specific line of torch's long weights-only error message (e.g. "unsupported GLOBAL posix.system")."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    lines = [ln.strip() for ln in str(error).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(boilerplate)]
    return lines[0].removeprefix("WeightsUnpickler error:").strip() if lines else type(error).__name__


def _shape(sd: Mapping[str, torch.Tensor], key: str, which: str) -> tuple[int, ...]:
    if key not in sd:
        raise UserError(f"the {which} weights have no {key!r}; is this an OpenAI dVAE {which}?")
    return tuple(sd[key].shape)


def _layout(sd: Mapping[str, torch.Tensor], which: str) -> tuple[int, int]:
    """``(n_groups, n_blk_per_group)`` from the ``blocks.group_G.block_I.`` keys."""
    found = [(int(m[1]), int(m[2])) for m in map(_BLOCK_KEY.match, sd) if m]
    if not found:
        raise UserError(f"the {which} weights have no blocks.group_*.block_* keys; is this an OpenAI dVAE {which}?")
    return max(g for g, _ in found), max(i for _, i in found)


def infer_config(encoder_sd: Mapping[str, torch.Tensor], decoder_sd: Mapping[str, torch.Tensor],
                 resolution: int = 256) -> DVAEConfig:
    """Read n_hid, n_blk_per_group, n_groups, codebook_size, n_init and in_channels off the tensor shapes."""
    n_hid, in_channels, *_ = _shape(encoder_sd, "blocks.input.w", ENCODER)
    codebook_size = _shape(encoder_sd, "blocks.output.conv.w", ENCODER)[0]
    n_init, dec_codebook, *_ = _shape(decoder_sd, "blocks.input.w", DECODER)
    if dec_codebook != codebook_size:
        raise UserError(f"encoder has {codebook_size} codes but decoder takes {dec_codebook}; not a matching pair")
    n_groups, n_blk = _layout(encoder_sd, ENCODER)
    if _layout(decoder_sd, DECODER) != (n_groups, n_blk):
        raise UserError(f"encoder has {n_groups} groups of {n_blk} blocks but decoder has "
                        "{} groups of {} blocks".format(*_layout(decoder_sd, DECODER)))
    return DVAEConfig(resolution=resolution, n_hid=n_hid, n_blk_per_group=n_blk, n_groups=n_groups,
                      codebook_size=codebook_size, n_init=n_init, in_channels=in_channels)


def _check_fits(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], which: str) -> None:
    problems = [f"missing {k}" for k in expected if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in expected]
    problems += [f"{k} has shape {tuple(given[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in given and given[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"the {which} weights do not fit the inferred config: {'; '.join(problems[:3])}{more}")


def openai_to_ours(encoder_sd: Mapping[str, torch.Tensor], decoder_sd: Mapping[str, torch.Tensor],
                   resolution: int = 256) -> tuple[DVAEConfig, dict[str, torch.Tensor]]:
    """OpenAI's two state dicts → ``(config, state dict for DVAE(config))``; tensors are shared, not copied."""
    config = infer_config(encoder_sd, decoder_sd, resolution)
    with torch.device("meta"):
        model = DVAE(config)
    _check_fits(model.encoder.state_dict(), encoder_sd, ENCODER)
    _check_fits(model.decoder.state_dict(), decoder_sd, DECODER)
    state = {f"{ENCODER}.{k}": v for k, v in encoder_sd.items()}
    state.update({f"{DECODER}.{k}": v for k, v in decoder_sd.items()})
    return config, state


def ours_to_openai(model: DVAE) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our model → OpenAI's ``(encoder_sd, decoder_sd)``, loadable into ``dall_e.Encoder`` / ``dall_e.Decoder``."""
    if model.config.likelihood != "logit-laplace":
        raise UserError(f"OpenAI's decoder outputs the logit-Laplace's μ and ln b; this model was trained with the "
                        f"{model.config.likelihood} likelihood, so its decoder cannot be written in that format")
    return dict(model.encoder.state_dict()), dict(model.decoder.state_dict())
