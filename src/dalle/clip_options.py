"""The two options that go with a CLIP checkpoint wherever a command takes one as its reranker (`dalle generate
--reranker`, `dalle eval --reranker`, `dalle reranker eval --model`). Kept free of torch so the CLI starts fast."""

from __future__ import annotations

from typing import Any

from dalle.config import option

ACTIVATIONS = ("quick_gelu", "gelu")


def clip_vocab(flag: str) -> Any:
    return option(None, f"CLIP's bpe_simple_vocab_16e6.txt.gz, when {flag} is a CLIP checkpoint (default: beside the "
                        "checkpoint or from an installed open_clip)")


def clip_activation() -> Any:
    return option(None, "MLP activation of a CLIP checkpoint: quick_gelu (OpenAI's models) or gelu (most open_clip "
                        "models); default: OpenAI's archives quick_gelu, an open_clip directory its config, a bare "
                        "state dict gelu", choices=ACTIVATIONS)
