"""The option that sets the prior's arithmetic wherever a command draws images (`dalle generate`, `dalle complete`,
`dalle serve`, `dalle eval`, `dalle pipeline`). Kept free of torch so the CLI starts fast."""

from __future__ import annotations

from typing import Any

from dalle.config import option

PRECISIONS = ("auto", "fp32", "bf16")


def sampling_precision() -> Any:
    return option("auto", "the arithmetic of the prior while sampling and of the dVAE while decoding: auto (bf16 "
                          "where the device computes it in hardware: a GPU with bf16, or a CPU with AVX512-BF16 or "
                          "AMX; else fp32), fp32 or bf16",
                  choices=PRECISIONS)
