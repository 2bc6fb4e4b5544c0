"""Training: synthetic and LLaVA-style data, trainer loops and checkpoints."""
