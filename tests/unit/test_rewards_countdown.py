"""Countdown: exact arithmetic, the number-use rules, and that nothing is executed."""

from fractions import Fraction

import pytest

from moe_rl.rewards.countdown import InvalidExpression, check_countdown, countdown_reward, evaluate_expression
from moe_rl.rewards.types import RewardInput

LABEL = {"numbers": [3, 4, 6], "target": 18}


@pytest.mark.parametrize("response,expected", [
    (r"<think>3*4=12, 12+6=18</think> <answer>3 * 4 + 6</answer>", 1.0),
    (r"\boxed{(6 - 3) * 4 + 6}", 0.0),           # 6 used twice
    (r"\boxed{6 * (4 - 3) * 3}", 0.0),           # 3 used twice
    (r"\boxed{6 / (1 - 4/6)}", 0.0),             # 1 is not given
    (r"\boxed{4 * 6 - 3 * 2}", 0.0),             # 2 is not given
    (r"\boxed{3 * 6}", 0.0),                     # leaves out 4 (exact rule)
    (r"\boxed{3 * 4 + 6 = 18}", 1.0),            # restated target is ignored
    (r"\boxed{6 \times 3 + 4 - 4}", 0.0),        # 4 twice
    ("<answer>3 + 4 + 6</answer>", 0.0),         # valid, but 13
    ("<answer>__import__('os').system('true')</answer>", 0.0),
])
def test_countdown_reward(response, expected):
    assert countdown_reward(RewardInput(response=response, label=LABEL)) == expected


def test_countdown_division_is_exact():
    # 6 / (1 - 3/4) = 24 only with exact fractions.
    assert check_countdown("6 / (1 - 3 / 4)", [6, 1, 3, 4], 24) is None
    assert evaluate_expression("7 / 2")[0] == Fraction(7, 2)
    assert "division by zero" in check_countdown("3 / (4 - 4)", [3, 4, 4], 0)


def test_countdown_rules():
    assert check_countdown("3 * 6", [3, 4, 6], 18, numbers_rule="at_most_once") is None
    assert "leaves out [4]" in check_countdown("3 * 6", [3, 4, 6], 18, numbers_rule="exact")
    assert "beyond" in check_countdown("6 * 3 + 6 - 6", [3, 6, 6], 18, numbers_rule="at_most_once")
    assert check_countdown("6 + 6 + 6", [6, 6, 6], 18) is None  # repeated numbers given repeatedly
    with pytest.raises(ValueError, match="numbers_rule"):
        check_countdown("1", [1], 1, numbers_rule="twice")


def test_countdown_format_score_and_rejections():
    s = RewardInput(response="<answer>3 + 4 + 6</answer>", label=LABEL)
    assert countdown_reward(s, format_score=0.1) == 0.1
    s = RewardInput(response="<answer>three plus four</answer>", label=LABEL)
    assert countdown_reward(s, format_score=0.1) == 0.0
    for bad in ["2 ** 10", "-3 + 4", "abs(3)", "x + 1", "3 if 1 else 4", "1.5 + 2"]:
        with pytest.raises(InvalidExpression):
            evaluate_expression(bad)
    with pytest.raises(ValueError, match="numbers"):
        countdown_reward(RewardInput(response="1", label={"target": 3}))
