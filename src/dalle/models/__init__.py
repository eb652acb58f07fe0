"""Models: the discrete VAE, the sparse transformer prior and the contrastive reranker (architecture only)."""
