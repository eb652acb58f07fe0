"""``dalle serve``: a small web UI and JSON API for text-to-image generation and image completion."""
