"""Save and resume of the whole run (``run_state.py``: model and optimizer in Megatron-Core's
distributed format, RNG of every rank, data position, step, weight version, config), and
checkpoint conversion HF <-> Megatron-Core distributed checkpoint (``convert.py`` over
``hf_format.py`` and ``megatron_format.py``), streaming and atomic; run checkpoints convert to HF."""
