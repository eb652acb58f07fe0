"""Evaluation (paper, "Sampling and evaluation"): Fréchet distance and Inception-style score over pluggable feature
extractors, their curves against blur radius and reranking sample size, reconstruction and codebook metrics, a
pixel-reading checker for the shapes dataset, and plots.

Images are ``(B, 3, H, W)`` float in [0, 1] throughout; ``(B, H, W, 3)`` uint8 is accepted and converted.
"""
