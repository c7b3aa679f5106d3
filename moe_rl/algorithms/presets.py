"""Named algorithms as sets of axis values (docs/algorithms.md, "Named presets").

A preset is only a dict of ``AlgorithmConfig`` field values; fields it does not name
take ``config.BASE_DEFAULTS``, and any field the user sets wins over both. No preset adds
code: "GSPO + clip-higher + no KL + TIS" is ``preset=gspo clip_high=0.28 kl_beta=0
mismatch=tis``. This module is data only: ``config.py`` imports it and resolves a preset
(``AlgorithmConfig(preset=...)``, ``config.preset_config``); nothing here imports back.

Choices where the papers leave room, and why:
- grpo: beta=0.04 with k3 in the loss (DeepSeekMath); seq-mean-token-mean aggregation.
- dr_grpo: L_max must still be set (``max_response_len``); it is a constant of the run, not
  of the algorithm, so the preset cannot know it (an RL run sets it to
  ``rollout.max_new_tokens``: ``RunConfig.fill_unset``).
- dapo: overlong shaping is on; the preset sets the DAPO paper's 20480 / 4096, which an RL
  run replaces by its own length and a fifth of it unless the user sets them.
- cispo: MiniMax-M1 leaves the lower bound open: clip_low=1.0 (lower bound 0, never hit);
  clip_high=0.28 is our choice (the report does not state epsilon_high).
- gmpo: the paper's clip range (e^-0.4, e^0.4) in log space, i.e. clip_low=clip_high=0.4.
- reinforce_pp: KL in the reward with k1 (REINFORCE++ paper), beta=0.01.
- gdpo: the reward names are the user's; the preset sets none, and the config then asks
  for ``reward_names`` and ``reward_weights``.
- gfpo: the paper's 16 -> 8 retention by length; the rollout must sample G' > gfpo_keep.
- sapo: the paper's temperatures tau+ = 1.0, tau- = 1.05 (TRL's defaults) and
  seq-mean-token-mean, which verl forces for sapo whatever its agg mode; here it is only
  the preset's value.
- opo: pg, since OPO is exactly on-policy (one optimizer step per rollout batch, so the
  ratio is 1 and a clip would never act); token-mean as verl's recipe.
- gpg: pg, as verl's "gpg" policy loss (-A * logp), token-mean.
- pass_at_k: the grpo preset with the pass@k advantage (verl grpo_passk).
"""

from __future__ import annotations

from typing import Any, Dict

_CLIP_SYM = {"clip_low": 0.2, "clip_high": 0.2}

PRESETS: Dict[str, Dict[str, Any]] = {
    "grpo": {
        "advantage": "grpo", "policy_loss": "ppo", **_CLIP_SYM,
        "loss_agg": "seq-mean-token-mean", "kl_beta": 0.04, "kl_estimator": "k3", "kl_placement": "loss",
    },
    "dr_grpo": {
        "advantage": "dr_grpo", "policy_loss": "ppo", **_CLIP_SYM,
        "loss_agg": "seq-mean-token-sum-norm", "kl_beta": 0.0,
    },
    "dapo": {
        "advantage": "grpo", "policy_loss": "ppo", "clip_low": 0.2, "clip_high": 0.28,
        "loss_agg": "token-mean", "kl_beta": 0.0, "dynamic_sampling": True, "max_extra_rounds": 3,
        "overlong_shaping": True, "max_response_len": 20480, "overlong_cache_len": 4096,
    },
    "gspo": {
        "advantage": "grpo", "policy_loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4,
        "loss_agg": "seq-mean-token-mean", "kl_beta": 0.0,
    },
    "gspo_token": {
        "advantage": "grpo", "policy_loss": "gspo_token", "clip_low": 3e-4, "clip_high": 4e-4,
        "loss_agg": "seq-mean-token-mean", "kl_beta": 0.0,
    },
    "cispo": {
        "advantage": "grpo", "policy_loss": "cispo", "clip_low": 1.0, "clip_high": 0.28,
        "loss_agg": "token-mean", "kl_beta": 0.0,
    },
    "gmpo": {
        "advantage": "grpo", "policy_loss": "gmpo", "clip_low": 0.4, "clip_high": 0.4,
        "loss_agg": "seq-mean-token-mean", "kl_beta": 0.0,
    },
    "rloo": {
        "advantage": "rloo", "policy_loss": "ppo", **_CLIP_SYM,
        "loss_agg": "token-mean", "kl_beta": 0.0,
    },
    "reinforce_pp": {
        "advantage": "reinforce_pp", "policy_loss": "ppo", **_CLIP_SYM,
        "loss_agg": "token-mean", "kl_beta": 0.01, "kl_estimator": "k1", "kl_placement": "reward",
    },
    "gdpo": {
        "advantage": "gdpo", "policy_loss": "ppo", **_CLIP_SYM,
        "loss_agg": "seq-mean-token-mean", "kl_beta": 0.0,
    },
    "gfpo": {
        "advantage": "grpo", "policy_loss": "ppo", **_CLIP_SYM,
        "loss_agg": "token-mean", "kl_beta": 0.0, "gfpo_keep": 8, "gfpo_metric": "length",
    },
    "sapo": {
        "advantage": "grpo", "policy_loss": "sapo", "sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05,
        "loss_agg": "seq-mean-token-mean", "kl_beta": 0.0,
    },
    "opo": {"advantage": "opo", "policy_loss": "pg", "loss_agg": "token-mean", "kl_beta": 0.0},
    "gpg": {"advantage": "gpg", "policy_loss": "pg", "loss_agg": "token-mean", "kl_beta": 0.0},
}
PRESETS["pass_at_k"] = {**PRESETS["grpo"], "advantage": "pass_at_k"}

