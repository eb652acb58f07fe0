"""Datasets: sources of (image, caption) records, the one preprocessing pipeline, and the token cache."""
