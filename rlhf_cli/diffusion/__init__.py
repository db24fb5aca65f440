"""DDPO for text-to-image diffusion: DDIM step log-probabilities, per-prompt advantages, the clipped loss."""
