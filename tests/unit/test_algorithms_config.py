"""AlgorithmConfig: presets map to the spec's axis values, overrides win, bad combos raise."""

from dataclasses import dataclass, field

import pytest

from moe_rl.algorithms.config import AlgorithmConfig, preset_config
from moe_rl.algorithms.presets import PRESETS
from moe_rl.config import ConfigError, load_config

# The axis values each named algorithm must have, written from docs/algorithms.md and the
# papers (not read from presets.py).
EXPECTED = {
    "grpo": dict(advantage="grpo", policy_loss="ppo", clip_low=0.2, clip_high=0.2,
                 loss_agg="seq-mean-token-mean", kl_placement="loss"),
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo", loss_agg="seq-mean-token-sum-norm", kl_beta=0.0),
    "dapo": dict(advantage="grpo", policy_loss="ppo", clip_low=0.2, clip_high=0.28, loss_agg="token-mean",
                 kl_beta=0.0, dynamic_sampling=True, overlong_shaping=True),
    "gspo": dict(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean"),
    "gspo_token": dict(policy_loss="gspo_token", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean"),
    "cispo": dict(policy_loss="cispo"),
    "gmpo": dict(policy_loss="gmpo", clip_low=0.4, clip_high=0.4),
    "rloo": dict(advantage="rloo"),
    "reinforce_pp": dict(advantage="reinforce_pp", kl_placement="reward", kl_estimator="k1"),
    "gdpo": dict(advantage="gdpo"),
    "gfpo": dict(advantage="grpo"),
    "sapo": dict(advantage="grpo", policy_loss="sapo", sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                 loss_agg="seq-mean-token-mean", kl_beta=0.0),
    "opo": dict(advantage="opo", policy_loss="pg", loss_agg="token-mean", kl_beta=0.0),
    "gpg": dict(advantage="gpg", policy_loss="pg", loss_agg="token-mean", kl_beta=0.0),
    "pass_at_k": dict(advantage="pass_at_k", policy_loss="ppo", clip_low=0.2, clip_high=0.2,
                      loss_agg="seq-mean-token-mean", kl_beta=0.04, kl_estimator="k3", kl_placement="loss"),
}

NEEDS = {"dr_grpo": dict(max_response_len=4096), "gdpo": dict(reward_names=["acc", "fmt"], reward_weights=[1.0, 0.5])}


def test_every_spec_preset_exists_and_nothing_else():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_axis_values(name):
    cfg = preset_config(name, **NEEDS.get(name, {}))
    for k, v in EXPECTED[name].items():
        assert getattr(cfg, k) == v, (name, k)
    if name == "gfpo":
        assert cfg.gfpo_keep > 0
    if name == "cispo":
        assert cfg.clip_low >= 1.0  # the lower bound is left open


def test_beta_zero_means_no_reference_model():
    assert preset_config("grpo").needs_reference
    assert not preset_config("grpo", kl_beta=0.0).needs_reference
    assert not preset_config("dapo").needs_reference
    assert preset_config("gspo", kl_beta=0.01).needs_reference


def test_overrides_win_over_preset():
    cfg = AlgorithmConfig(preset="gspo", clip_high=0.28, kl_beta=0.0, mismatch="tis")
    assert (cfg.policy_loss, cfg.clip_low, cfg.clip_high, cfg.mismatch) == ("gspo", 3e-4, 0.28, "tis")
    assert cfg.needs_rollout_logp and not cfg.needs_reference


def test_unknown_preset_lists_allowed():
    with pytest.raises(ValueError, match=r"preset='ppo2'.*cispo.*gspo_token.*rloo"):
        AlgorithmConfig(preset="ppo2")


@pytest.mark.parametrize("kw,match", [
    (dict(advantage="ppo"), r"advantage='ppo' is not one of grpo, dr_grpo"),
    (dict(policy_loss="dpo"), r"policy_loss='dpo'"),
    (dict(loss_agg="mean"), r"loss_agg='mean' is not one of token-mean"),
    (dict(kl_estimator="k4"), r"kl_estimator='k4' is not one of k1, k2, k3"),
    (dict(kl_placement="critic"), r"kl_placement"),
    (dict(mismatch="is"), r"mismatch='is' is not one of none, tis, icepop, seq-mis"),
    (dict(gfpo_metric="reward"), r"gfpo_metric"),
    (dict(clip_low=-0.1), r"clip_low"),
    (dict(clip_low=1.0), r"clip_low \(1.0\) must be < 1"),
    (dict(policy_loss="gspo", dual_clip_c=3.0), r"dual_clip_c .* only to policy_loss=ppo"),
    (dict(dual_clip_c=1.0), r"dual_clip_c \(1.0\) must be > 1"),
    (dict(dual_clip_c=0.5), r"dual_clip_c \(0.5\) must be > 1"),
    (dict(loss_agg="seq-mean-token-sum-norm"), r"max_response_len must be > 0"),
    (dict(kl_ratio_weighted=True, kl_estimator="k2"), r"kl_ratio_weighted needs kl_estimator=k3"),
    (dict(kl_placement="reward", kl_estimator="k3"), r"kl_placement=reward uses the k1"),
    (dict(advantage="gdpo"), r"reward_names must name at least one"),
    (dict(reward_names=["a", "b"], reward_weights=[1.0]), r"same length"),
    (dict(reward_names=["a", "b"], reward_weights=[1.0, 1.0]), r"only advantage=gdpo"),
    (dict(process_rewards=True, advantage="rloo"), r"process_rewards needs advantage=grpo"),
    (dict(process_rewards=True, policy_loss="gspo"), r"use gspo_token"),
    (dict(overlong_shaping=True, max_response_len=100, overlong_cache_len=100), r"overlong_cache_len"),
    (dict(icepop_low=5.0, icepop_high=0.5), r"icepop_low"),
    (dict(seq_mis_low=2.0, seq_mis_high=1.0), r"seq_mis_low"),
    (dict(tis_cap=0.0), r"tis_cap"),
    (dict(tis_floor=2.0), r"tis_floor \(2.0\) must be >= 0 and < tis_cap \(2.0\)"),
    (dict(entropy_coeff=float("inf")), r"entropy_coeff \(inf\) must be finite"),
    (dict(kl_target=0.01), r"kl_target adapts the KL-in-reward coefficient: it needs kl_placement=reward"),
    (dict(preset="reinforce_pp", kl_target=-1.0), r"kl_target \(-1.0\) must be finite and >= 0"),
    (dict(preset="reinforce_pp", kl_target=0.01, kl_horizon=0), r"kl_horizon \(0\) must be >= 1"),
    (dict(off_policy_mask=-0.1), r"off_policy_mask"),
    (dict(std_scope="global"), r"std_scope='global' is not one of group, batch"),
    (dict(advantage="rloo", std_scope="batch"), r"std_scope=batch applies only to advantage=grpo"),
    (dict(process_rewards=True, std_scope="batch"), r"std_scope=batch is not supported"),
    (dict(preset="reinforce_pp", gamma=0.0), r"gamma \(0.0\) must be in \(0, 1\]"),
    (dict(preset="reinforce_pp", gamma=1.5), r"gamma"),
    (dict(advantage="reinforce_pp_baseline", gamma=0.9), r"gamma \(0.9\) applies only to advantage=reinforce_pp"),
    (dict(rloo_normalize=True), r"rloo_normalize applies only to advantage=rloo"),
    (dict(policy_loss="sapo", sapo_tau_neg=0.0), r"sapo_tau_neg \(0.0\) must be finite and > 0"),
    (dict(policy_loss="vespo", vespo_lambda_neg=-1.0), r"vespo_lambda_neg"),
    (dict(policy_loss="vespo", vespo_k_pos=float("inf")), r"vespo_k_pos"),
    (dict(process_rewards=True, policy_loss="vespo"), r"policy_loss=vespo needs one advantage per response"),
    (dict(preset="reinforce_pp", kl_straight_through=True), r"kl_straight_through only changes the KL's gradient"),
    (dict(kl_ratio_weighted=True, kl_estimator="abs"), r"kl_ratio_weighted needs kl_estimator=k3"),
    (dict(loss_agg="token-summ"), r"not one of .*token-sum"),
    (dict(mismatch="seq-is"), r"not one of .*seq-tis, seq-icepop"),
])
def test_invalid_combinations_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        AlgorithmConfig(**kw)


@dataclass
class _Root:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig.unset)


def test_dotted_overrides_through_the_project_loader():
    r = load_config(_Root, overrides=["algorithm.preset=gspo", "algorithm.clip_high=0.28", "algorithm.kl_beta=0",
                                      "algorithm.mismatch=tis"])
    a = r.algorithm
    assert (a.policy_loss, a.clip_low, a.clip_high, a.kl_beta, a.mismatch) == ("gspo", 3e-4, 0.28, 0.0, "tis")
    # an explicit value equal to the default preset's still wins over the chosen preset
    r = load_config(_Root, overrides=["algorithm.preset=gspo", "algorithm.clip_low=0.2"])
    assert r.algorithm.clip_low == 0.2 and r.algorithm.clip_high == 4e-4
    assert load_config(_Root).algorithm.kl_beta == 0.04  # default preset grpo
    r = load_config(_Root, overrides=["algorithm.preset=gdpo", "algorithm.reward_names=[acc,fmt]",
                                      "algorithm.reward_weights=[1.0,0.5]"])
    assert r.algorithm.reward_weight_map == {"acc": 1.0, "fmt": 0.5}
    with pytest.raises(ConfigError):
        load_config(_Root, overrides=["algorithm.clip_hihg=0.3"])
    with pytest.raises(ValueError, match="preset"):
        load_config(_Root, overrides=["algorithm.preset=nope"])


def test_algorithms_package_is_pure_torch():
    """No torch.distributed and no Megatron anywhere in moe_rl/algorithms (design.md)."""
    import ast
    import pathlib

    import moe_rl.algorithms as pkg

    for path in pathlib.Path(pkg.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                assert not n.startswith(("torch.distributed", "megatron")), (path.name, n)
            if isinstance(node, ast.Attribute) and node.attr == "distributed":
                raise AssertionError(f"{path.name} uses torch.distributed")


def test_train_helpers_do_not_touch_megatron_parallel_state():
    import pathlib

    import moe_rl.train.global_counts as gc
    import moe_rl.train.logprobs as lp

    for mod in (gc, lp):
        src = pathlib.Path(mod.__file__).read_text()
        assert "parallel_state" not in src.replace("``parallel_state``", "") and "import megatron" not in src
