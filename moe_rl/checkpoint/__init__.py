"""Save and resume of the whole run (``run_state.py``: model and optimizer in Megatron-Core's
distributed format, RNG of every rank, data position, step, weight version, config)."""
