"""Rollout: turn prompts into sampled responses with log-probs and routed experts.

Two engines speak the same HTTP protocol (SGLang 0.5.23's ``/generate`` and control
endpoints): the embedded engine (``embedded/``, the HF model class in-process, for CPU
tests and the quickstart) and real SGLang servers (``sglang_backend.py``). The trainer only
talks to them through ``client.py`` and receives :class:`~moe_rl.rollout.types.Sample`.
"""

from moe_rl.rollout.types import FinishReason, RolloutRequest, Sample, SamplingParams

__all__ = ["FinishReason", "RolloutRequest", "Sample", "SamplingParams"]
