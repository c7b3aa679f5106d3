"""Math (math-verify) and format rewards against hand-written expectations."""

import pytest

from moe_rl.rewards.math_answer import answers_match, math_reward
from moe_rl.rewards.think_format import think_format_reward
from moe_rl.rewards.types import RewardInput

# (gold, response, equal?) -- equalities a person checks by hand.
TABLE = [
    (r"\frac{1}{2}", r"The answer is \boxed{0.5}", True),
    ("0.5", r"\boxed{\frac{1}{2}}", True),
    (r"2\sqrt{2}", r"so we get $\boxed{\sqrt{8}}$", True),
    (r"\{1, 2, 3\}", r"\boxed{\{3, 1, 2\}}", True),
    (r"[0, 1)", r"\boxed{[0, 1)}", True),
    (r"[0, 1)", r"\boxed{[0, 1]}", False),
    ("x^2 + 2x + 1", r"\boxed{(x+1)^2}", True),
    ("42", r"\boxed{42}", True),
    ("42", r"\boxed{43}", False),
    (r"\frac{1}{3}", r"\boxed{0.33}", False),
    (r"\sqrt{2}", r"\boxed{2}", False),
    (r"\{1, 2\}", r"\boxed{\{1, 2, 3\}}", False),
    ("7", "I could not solve it.", False),
]


@pytest.mark.parametrize("gold,response,expected", TABLE)
def test_math_verify_table(gold, response, expected):
    assert answers_match(gold, response) is expected


def test_math_reward_ignores_numbers_in_reasoning():
    s = RewardInput(response=r"<think>maybe 12, or \boxed{12}?</think> It is \boxed{13}.", label="13")
    assert math_reward(s) == 1.0
    s = RewardInput(response=r"<think>it is 13</think> It is \boxed{12}.", label="13")
    assert math_reward(s) == 0.0


def test_math_reward_needs_parsable_gold():
    with pytest.raises(ValueError, match="gold answer"):
        math_reward(RewardInput(response=r"\boxed{1}", label="  "))
    with pytest.raises(ValueError, match="gold answer"):
        math_reward(RewardInput(response=r"\boxed{1}", label=None))


@pytest.mark.parametrize("response,kwargs,expected", [
    (r"<think>2+2 is 4</think> \boxed{4}", {}, 1.0),
    (r"  <think>a</think>\boxed{4}", {"require_boxed": True}, 1.0),
    (r"<think>a</think> 4", {"require_boxed": True}, 0.0),
    (r"<think>a</think> <answer>4</answer>", {"require_answer_tag": True}, 1.0),
    (r"<think>a</think> <answer> </answer>", {"require_answer_tag": True}, 0.0),
    (r"<think></think> 4", {}, 0.0),               # empty reasoning
    (r"<think>a</think>   ", {}, 0.0),             # no answer
    (r"\boxed{4}", {}, 0.0),                         # no reasoning block
    (r"<think>a</think> 4 <think>b</think> 5", {}, 0.0),  # two blocks
    (r"x <think>a</think> 4", {}, 0.0),            # text before <think>
    (r"a</think> 4", {"prompt_opens_think": True}, 1.0),
])
def test_think_format(response, kwargs, expected):
    assert think_format_reward(RewardInput(response=response), **kwargs) == expected
