"""Tokenizers: BPE for captions (``text``) and the dVAE's pixels ↔ code grid (``image``)."""
