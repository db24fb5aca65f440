"""Direct preference optimisation: sequence log-probs of a pair batch (logprobs.py), the losses (losses.py)."""
