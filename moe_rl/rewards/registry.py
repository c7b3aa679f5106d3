"""Reward functions by name: the built-ins, or any ``module:function`` a config names.

``resolve_reward("math")`` returns a built-in; ``resolve_reward("my_pkg.rewards:f")``
imports ``my_pkg.rewards`` and returns its attribute ``f`` (dotted attributes such as
``module:Class.method`` work too). Errors are ``ValueError`` naming the spec and what is
missing, raised when the config is resolved, before any rollout.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Dict

# name -> "module:function"; strings, so process workers can resolve them after a spawn.
BUILTIN: Dict[str, str] = {
    "math": "moe_rl.rewards.math_answer:math_reward",
    "format": "moe_rl.rewards.think_format:think_format_reward",
    "countdown": "moe_rl.rewards.countdown:countdown_reward",
    "code": "moe_rl.rewards.code_tests:code_reward",
}


@functools.lru_cache(maxsize=None)
def resolve_reward(spec: str) -> Callable:
    """The callable named by ``spec`` (a key of ``BUILTIN`` or ``module:function``)."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise ValueError(
            f"reward fn {spec!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) "
            f"nor a 'module:function' path")
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward fn {spec!r}: expected 'module:function', got an empty "
                         f"{'module' if not module_name else 'function'} part")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"reward fn {spec!r}: cannot import module {module_name!r} ({e})") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"reward fn {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise ValueError(f"reward fn {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj
