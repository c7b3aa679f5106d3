"""``AlgorithmConfig``: every axis of the GRPO family as one typed field.

A named algorithm is only a preset (``presets.py``): a dict of axis values. Resolution
order, lowest to highest: the base defaults below (``BASE_DEFAULTS``), the preset's
values, then every field given explicitly (in YAML, on the command line as
``algorithm.<field>=...`` or in Python). Fields are declared ``Optional[...] = None`` so
that "not given" can be told apart from "given the default value"; after
``__post_init__`` every field holds a concrete value.

Nested in a root config loaded by ``moe_rl.config.load_config``, declare it with
``field(default_factory=AlgorithmConfig.unset)`` (see ``unset``) so that a preset given
in YAML or on the command line can still set the fields.

String-valued axes are plain ``str`` (OmegaConf structured configs do not accept
``Literal``) and are checked in ``__post_init__``; a bad value raises ``ValueError`` naming
the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from moe_rl.algorithms.presets import PRESETS

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gdpo", "opo", "gpg", "pass_at_k")
STD_SCOPES = ("group", "batch")
POLICY_LOSSES = ("ppo", "gspo", "gspo_token", "cispo", "gmpo", "pg", "sapo", "vespo")
SEQUENCE_LEVEL_LOSSES = ("gspo", "gmpo")
# surrogates that read one advantage per response (gspo/gmpo: the sequence loss; vespo: its (k, lambda) branch)
RESPONSE_ADVANTAGE_LOSSES = ("gspo", "gmpo", "vespo")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
KL_PLACEMENTS = ("loss", "reward")
MISMATCH_MODES = ("none", "tis", "icepop", "seq-mis", "seq-tis", "seq-icepop")
SEQUENCE_MISMATCH_MODES = ("seq-mis", "seq-tis", "seq-icepop")  # one weight per response
GFPO_METRICS = ("length", "reward_per_token")

# Values a field takes when neither the preset nor the user sets it.
BASE_DEFAULTS: Dict[str, Any] = {
    "advantage": "grpo",
    "std_eps": 1e-6,
    "std_scope": "group",
    "gamma": 1.0,
    "rloo_normalize": False,
    "reward_names": [],
    "reward_weights": [],
    "process_rewards": False,
    "policy_loss": "ppo",
    "clip_low": 0.2,
    "clip_high": 0.2,
    "dual_clip_c": 0.0,
    "sapo_tau_pos": 1.0,
    "sapo_tau_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "loss_agg": "seq-mean-token-mean",
    "max_response_len": 0,
    "kl_beta": 0.0,
    "kl_estimator": "k3",
    "kl_placement": "loss",
    "kl_ratio_weighted": False,
    "kl_straight_through": False,
    "kl_target": 0.0,
    "kl_horizon": 10000,
    "entropy_coeff": 0.0,
    "top_entropy_quantile": 1.0,
    "dynamic_sampling": False,
    "max_extra_rounds": 0,
    "overlong_shaping": False,
    "overlong_cache_len": 0,
    "overlong_filter": False,
    "gfpo_keep": 0,
    "gfpo_metric": "length",
    "mismatch": "none",
    "tis_cap": 2.0,
    "tis_floor": 0.0,
    "icepop_low": 0.5,
    "icepop_high": 5.0,
    "seq_mis_low": 0.5,
    "seq_mis_high": 2.0,
    "off_policy_mask": 0.0,
}


def _choice(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"algorithm.{name}={value!r} is not one of {', '.join(allowed)}")


@dataclass
class AlgorithmConfig:
    """One point on the algorithm axes (docs/algorithms.md). None = take from preset/base."""

    preset: str = "grpo"  # named preset applied under explicit fields (presets.PRESETS)
    # Axis 1: advantage estimator
    advantage: Optional[str] = None  # grpo|dr_grpo|rloo|reinforce_pp|reinforce_pp_baseline|gdpo|opo|gpg|pass_at_k
    std_eps: Optional[float] = None  # added to the std in grpo/gdpo/pass_at_k/rloo_normalize (verl: 1e-6)
    std_scope: Optional[str] = None  # grpo: std of the group | of the whole global batch (TRL scale_rewards=batch)
    gamma: Optional[float] = None  # reinforce_pp: discount per valid token of the token returns (verl gamma)
    rloo_normalize: Optional[bool] = None  # rloo: re-normalize A over the global batch (TRL normalize_advantages)
    reward_names: Optional[List[str]] = None  # gdpo: names of the rewards combined (empty = one reward)
    reward_weights: Optional[List[float]] = None  # gdpo: weight of each reward in reward_names, same order
    process_rewards: Optional[bool] = None  # per-step rewards, normalized over the group, summed from t on
    # Axis 2: surrogate / ratio granularity
    policy_loss: Optional[str] = None  # ppo | gspo | gspo_token | cispo | gmpo | pg | sapo | vespo
    sapo_tau_pos: Optional[float] = None  # sapo: gate temperature tau where A > 0
    sapo_tau_neg: Optional[float] = None  # sapo: gate temperature tau where A <= 0
    vespo_k_pos: Optional[float] = None  # vespo: shape k of phi(w) = e^lam w^k e^(-lam w) where A_i >= 0
    vespo_lambda_pos: Optional[float] = None  # vespo: rate lambda where A_i >= 0 (floored at 1e-4)
    vespo_k_neg: Optional[float] = None  # vespo: shape k where A_i < 0
    vespo_lambda_neg: Optional[float] = None  # vespo: rate lambda where A_i < 0 (floored at 1e-4)
    # Axis 3: clip width (never one shared epsilon)
    clip_low: Optional[float] = None  # lower clip bound 1 - clip_low (gmpo: log-space bound -clip_low)
    clip_high: Optional[float] = None  # upper clip bound 1 + clip_high (DAPO clip-higher: 0.28)
    dual_clip_c: Optional[float] = None  # dual-clip constant c > 1 for A < 0 (ppo only); 0 = off
    # Axis 4: aggregation
    loss_agg: Optional[str] = None  # token-mean|seq-mean-token-mean|seq-mean-token-sum|seq-mean-token-sum-norm|token-sum
    max_response_len: Optional[int] = None  # L_max: seq-mean-token-sum-norm constant and overlong shaping limit
    # Axis 5: KL to the reference policy
    kl_beta: Optional[float] = None  # KL coefficient; 0 = off and no reference model is built
    kl_estimator: Optional[str] = None  # k1 | k2 | k3 (k3 clamped: x to +-20, value to <= 10) | abs
    kl_placement: Optional[str] = None  # loss (beta*KL added to the token loss) | reward (r_t -= beta*k1)
    kl_ratio_weighted: Optional[bool] = None  # weight k3 by the current ratio rho (DeepSeek-V3.2)
    kl_straight_through: Optional[bool] = None  # the estimator's value with k2's gradient (verl "k3+")
    kl_target: Optional[float] = None  # KL in the reward: adapt beta toward this KL (verl kl_ctrl adaptive); 0 = fixed
    kl_horizon: Optional[int] = None  # adaptive beta: responses over which it moves by at most 20% (verl kl_ctrl.horizon)
    entropy_coeff: Optional[float] = None  # entropy bonus: loss -= coeff * aggregate(entropy) (verl entropy_coeff); 0 = off
    top_entropy_quantile: Optional[float] = None  # train only the top q of tokens by (old-policy) entropy (TRL); 1 = all
    # Axis 6: sampling and length shaping
    dynamic_sampling: Optional[bool] = None  # drop groups whose rewards all equal and regenerate (DAPO)
    max_extra_rounds: Optional[int] = None  # cap on extra generation rounds for dynamic sampling
    overlong_shaping: Optional[bool] = None  # add the DAPO soft overlong penalty to the reward
    overlong_cache_len: Optional[int] = None  # L_c: penalty ramps from L_max - L_c to L_max
    overlong_filter: Optional[bool] = None  # truncated responses get zero loss weight
    gfpo_keep: Optional[int] = None  # GFPO: keep this many responses per group (0 = off)
    gfpo_metric: Optional[str] = None  # GFPO ranking: length (shortest kept) | reward_per_token (highest kept)
    # Axis 7: training-inference mismatch correction
    mismatch: Optional[str] = None  # none | tis | icepop | seq-mis | seq-tis | seq-icepop
    tis_cap: Optional[float] = None  # tis / seq-tis truncation C: loss weight min(w, C) (seq-tis: of the product W_i)
    tis_floor: Optional[float] = None  # tis / seq-tis lower clamp: max(min(w, C), floor) (TRL clip_min); 0 = none
    icepop_low: Optional[float] = None  # icepop / seq-icepop: weight 0 where w (seq: W_i) < icepop_low
    icepop_high: Optional[float] = None  # icepop / seq-icepop: weight 0 where w (seq: W_i) > icepop_high
    seq_mis_low: Optional[float] = None  # seq-mis: drop responses whose geometric-mean w < this
    seq_mis_high: Optional[float] = None  # seq-mis: drop responses whose geometric-mean w > this
    off_policy_mask: Optional[float] = None  # DeepSeek-V3.2 OPSM delta: drop A<0 responses whose mean log(pi_rollout/pi_theta) > delta; 0 = off

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"algorithm.preset={self.preset!r} is not one of {', '.join(sorted(PRESETS))}"
            )
        values = dict(BASE_DEFAULTS)
        values.update(PRESETS[self.preset])
        for f in dataclasses.fields(self):
            if f.name == "preset":
                continue
            given = getattr(self, f.name)
            value = given if given is not None else values[f.name]
            if isinstance(value, (list, dict)):
                value = type(value)(value)
            setattr(self, f.name, value)
        self._validate()

    @classmethod
    def unset(cls) -> "AlgorithmConfig":
        """An instance with every axis still unset (None), without resolving it.

        Use it as the default factory where this config is nested in a root config that
        is loaded with OmegaConf: ``algorithm: AlgorithmConfig = field(default_factory=
        AlgorithmConfig.unset)``. OmegaConf reads the default instance's values; a
        resolved default would make every grpo value look "given", and
        ``algorithm.preset=gspo`` could then not change them. Resolution happens when the
        loader builds the final object (``__post_init__``).
        """
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(obj, f.name, f.default)
        return obj

    @property
    def reward_weight_map(self) -> Dict[str, float]:
        """gdpo: reward name -> weight."""
        return dict(zip(self.reward_names, self.reward_weights))

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference policy must be built and run (KL on)."""
        return self.kl_beta > 0

    @property
    def needs_rollout_logp(self) -> bool:
        """Whether the engine's own log-probs are needed (mismatch correction or the off-policy
        sequence mask on)."""
        return self.mismatch != "none" or self.off_policy_mask > 0

    @property
    def selects_entropy(self) -> bool:
        """Whether the loss keeps only high-entropy tokens (the old pass must keep its entropies)."""
        return self.top_entropy_quantile < 1

    @property
    def sequence_level(self) -> bool:
        """Whether the surrogate is one value per response (needs per-response A)."""
        return self.policy_loss in SEQUENCE_LEVEL_LOSSES

    @property
    def needs_response_advantage(self) -> bool:
        """Whether the surrogate reads one advantage per response (no per-token advantages)."""
        return self.policy_loss in RESPONSE_ADVANTAGE_LOSSES

    def _validate(self) -> None:
        _choice("advantage", self.advantage, ADVANTAGES)
        _choice("std_scope", self.std_scope, STD_SCOPES)
        _choice("policy_loss", self.policy_loss, POLICY_LOSSES)
        _choice("loss_agg", self.loss_agg, LOSS_AGGS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("kl_placement", self.kl_placement, KL_PLACEMENTS)
        _choice("mismatch", self.mismatch, MISMATCH_MODES)
        _choice("gfpo_metric", self.gfpo_metric, GFPO_METRICS)
        for name in ("std_eps", "clip_low", "clip_high", "kl_beta", "dual_clip_c", "vespo_k_pos", "vespo_lambda_pos",
                     "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"algorithm.{name} ({v}) must be finite and >= 0")
        if not (math.isfinite(self.kl_target) and self.kl_target >= 0):
            raise ValueError(f"algorithm.kl_target ({self.kl_target}) must be finite and >= 0 (0 = a fixed kl_beta)")
        if self.kl_target > 0 and (self.kl_placement != "reward" or self.kl_beta <= 0):
            raise ValueError("algorithm.kl_target adapts the KL-in-reward coefficient: it needs kl_placement=reward and "
                             f"kl_beta > 0 as its start (got kl_placement={self.kl_placement}, kl_beta={self.kl_beta})")
        if self.kl_horizon < 1:
            raise ValueError(f"algorithm.kl_horizon ({self.kl_horizon}) must be >= 1")
        if not math.isfinite(self.entropy_coeff):
            raise ValueError(f"algorithm.entropy_coeff ({self.entropy_coeff}) must be finite")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"algorithm.top_entropy_quantile ({self.top_entropy_quantile}) must be in (0, 1]; "
                             "1 trains every token")
        for name in ("sapo_tau_pos", "sapo_tau_neg"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"algorithm.{name} ({v}) must be finite and > 0")
        if self.policy_loss in ("ppo", "gspo", "gspo_token") and self.clip_low >= 1:
            raise ValueError(
                f"algorithm.clip_low ({self.clip_low}) must be < 1 for policy_loss={self.policy_loss} "
                "(the lower bound 1 - clip_low must stay positive)"
            )
        if self.dual_clip_c != 0:
            if self.policy_loss != "ppo":
                raise ValueError(
                    f"algorithm.dual_clip_c ({self.dual_clip_c}) applies only to policy_loss=ppo, "
                    f"got policy_loss={self.policy_loss}"
                )
            if self.dual_clip_c <= 1:  # verl's bound; below 1 + clip_high it also caps ratios inside the band
                raise ValueError(
                    f"algorithm.dual_clip_c ({self.dual_clip_c}) must be > 1 (usually 3), or 0 to turn dual "
                    "clip off"
                )
        if self.loss_agg == "seq-mean-token-sum-norm" and self.max_response_len <= 0:
            raise ValueError(
                "algorithm.max_response_len must be > 0 with loss_agg=seq-mean-token-sum-norm "
                f"(got {self.max_response_len})"
            )
        if self.kl_ratio_weighted and (self.kl_estimator != "k3" or self.kl_placement != "loss"):
            raise ValueError(
                "algorithm.kl_ratio_weighted needs kl_estimator=k3 and kl_placement=loss "
                f"(got kl_estimator={self.kl_estimator}, kl_placement={self.kl_placement})"
            )
        if self.kl_straight_through and self.kl_placement != "loss":
            raise ValueError(
                "algorithm.kl_straight_through only changes the KL's gradient; KL in the reward has none "
                f"(got kl_placement={self.kl_placement})"
            )
        if self.kl_placement == "reward" and self.kl_estimator != "k1":
            raise ValueError(
                f"algorithm.kl_placement=reward uses the k1 estimator (r_t -= beta*k1); "
                f"got kl_estimator={self.kl_estimator}"
            )
        if len(self.reward_names) != len(self.reward_weights):
            raise ValueError(
                f"algorithm.reward_names ({len(self.reward_names)}) and algorithm.reward_weights "
                f"({len(self.reward_weights)}) must have the same length"
            )
        if len(set(self.reward_names)) != len(self.reward_names):
            raise ValueError(f"algorithm.reward_names has duplicates: {self.reward_names}")
        if self.advantage == "gdpo":
            if not self.reward_names:
                raise ValueError("algorithm.reward_names must name at least one reward for advantage=gdpo")
        elif len(self.reward_names) > 1:
            raise ValueError(
                f"algorithm.reward_names has {len(self.reward_names)} rewards; only advantage=gdpo "
                f"combines several (got advantage={self.advantage})"
            )
        if self.process_rewards:
            if self.advantage != "grpo":
                raise ValueError(
                    f"algorithm.process_rewards needs advantage=grpo (got {self.advantage})"
                )
            if self.std_scope != "group":
                raise ValueError("algorithm.process_rewards normalizes step rewards within the group; "
                                 f"std_scope={self.std_scope} is not supported with it")
            if self.needs_response_advantage:
                raise ValueError(
                    f"algorithm.process_rewards gives per-token advantages; policy_loss={self.policy_loss} "
                    "needs one advantage per response (use gspo_token)"
                )
        if self.std_scope != "group" and self.advantage != "grpo":
            raise ValueError(
                f"algorithm.std_scope={self.std_scope} applies only to advantage=grpo (got {self.advantage})"
            )
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise ValueError(f"algorithm.gamma ({self.gamma}) must be in (0, 1]")
        if self.gamma != 1 and self.advantage != "reinforce_pp":
            raise ValueError(
                f"algorithm.gamma ({self.gamma}) applies only to advantage=reinforce_pp (got {self.advantage})"
            )
        if self.rloo_normalize and self.advantage != "rloo":
            raise ValueError(f"algorithm.rloo_normalize applies only to advantage=rloo (got {self.advantage})")
        if self.max_extra_rounds < 0:
            raise ValueError(f"algorithm.max_extra_rounds ({self.max_extra_rounds}) must be >= 0")
        if self.overlong_shaping:
            if not 0 < self.overlong_cache_len < self.max_response_len:
                raise ValueError(
                    "algorithm.overlong_shaping needs 0 < overlong_cache_len < max_response_len "
                    f"(got {self.overlong_cache_len} and {self.max_response_len})"
                )
        if self.gfpo_keep < 0:
            raise ValueError(f"algorithm.gfpo_keep ({self.gfpo_keep}) must be >= 0")
        if self.tis_cap <= 0:
            raise ValueError(f"algorithm.tis_cap ({self.tis_cap}) must be > 0")
        if not 0 <= self.tis_floor < self.tis_cap:
            raise ValueError(f"algorithm.tis_floor ({self.tis_floor}) must be >= 0 and < tis_cap ({self.tis_cap})")
        if not 0 <= self.icepop_low < self.icepop_high:
            raise ValueError(
                f"algorithm.icepop_low ({self.icepop_low}) must be >= 0 and < icepop_high ({self.icepop_high})"
            )
        if not 0 <= self.seq_mis_low < self.seq_mis_high:
            raise ValueError(
                f"algorithm.seq_mis_low ({self.seq_mis_low}) must be >= 0 and < seq_mis_high ({self.seq_mis_high})"
            )


def preset_config(name: str, **overrides: Any) -> AlgorithmConfig:
    """``AlgorithmConfig`` for preset ``name`` with ``overrides`` (field=value) on top.

    Unknown preset -> ValueError listing the allowed names; unknown field -> TypeError.
    """
    return AlgorithmConfig(preset=name, **overrides)
