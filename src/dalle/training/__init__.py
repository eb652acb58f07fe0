"""Training: a model-agnostic loop, per-stage tasks, losses, schedules and checkpoints."""
