"""moe_rl: reinforcement-learning post-training of mixture-of-experts LLMs on Megatron-Core."""

__version__ = "0.1.0"
