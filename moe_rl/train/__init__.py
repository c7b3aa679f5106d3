"""The Megatron side: policy/reference build, log-probs, forward/backward, optimizer."""
