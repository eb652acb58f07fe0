"""DALL-E: zero-shot text-to-image generation (Ramesh et al., 2021).

The package follows the paper's Figure 1: ``tokenizers`` (BPE text, dVAE image codes), ``models`` (dVAE, sparse
transformer prior, contrastive reranker), ``data``, ``training``, ``sampling``, ``evaluation``, ``serving`` and ``cli``.
"""

__version__ = "0.1.0"
