"""The root config of a run: one typed section per component, and the loop's own section.

One fact, one definition: the group size is ``rollout.n_samples_per_prompt``, the response
length ``rollout.max_new_tokens`` (the algorithm's L_max, ``algorithm.max_response_len``,
is set from it here) and the sampling temperature ``rollout.temperature`` (the trainer
divides its logits by the same value). Cross-section checks that need no process group run
in ``RunConfig.__post_init__``; the ones that need the world size or the model run at start
(``moe_rl.launch``), before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_rl.algorithms.config import BASE_DEFAULTS, AlgorithmConfig
from moe_rl.algorithms.presets import PRESETS
from moe_rl.checkpoint.config import CheckpointConfig
from moe_rl.data.config import DataConfig
from moe_rl.models.config import ModelConfig
from moe_rl.observability.config import MetricsConfig
from moe_rl.parallel.dims import ParallelConfig
from moe_rl.parallel.watchdog import WatchdogConfig
from moe_rl.rewards.config import RewardConfig
from moe_rl.rollout.config import RolloutConfig, check_sampling
from moe_rl.routing.config import RoutingConfig
from moe_rl.train.config import OptimConfig, TrainConfig
from moe_rl.weights.config import WeightSyncConfig

MODES = ("sync", "async")
# estimators whose baseline is the response's group: a group of one gets A = 0 (moe_rl.algorithms.advantages)
GROUP_BASELINE_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "gdpo", "pass_at_k")


def _preset_values(name: str) -> dict:
    """The algorithm fields preset ``name`` gives (on the base defaults), before user values."""
    return {**BASE_DEFAULTS, **PRESETS.get(name, {})}


@dataclass
class LoopConfig:
    """The RL driver (``moe_rl/loop.py``): batch sizes, mode, failure handling."""

    rollout_batch_size: int = 64  # responses generated per step (prompts per step x rollout.n_samples_per_prompt)
    mode: str = "sync"  # sync: rollout, train, sync in turn | async: the next rollout runs while the trainer trains
    max_staleness: int = 1  # async: a sample may come from at most this many policy versions back
    max_consecutive_skipped: int = 3  # stop after this many optimizer steps in a row with a non-finite loss or gradient

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"loop.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.rollout_batch_size < 1:
            raise ValueError(f"loop.rollout_batch_size ({self.rollout_batch_size}) must be >= 1")
        if self.max_staleness < 1:
            raise ValueError(f"loop.max_staleness ({self.max_staleness}) must be >= 1")
        if self.max_consecutive_skipped < 1:
            raise ValueError(f"loop.max_consecutive_skipped ({self.max_consecutive_skipped}) must be >= 1")


@dataclass
class EvalConfig:
    """Held-out evaluation of the policy (``moe_rl/evaluation.py``): generate on prompts that are
    never trained on, score them with ``rewards``, log ``eval/*`` to ``eval.jsonl`` and tensorboard.
    The responses are as long as the rollout's (``rollout.max_new_tokens``) and stop where they do."""

    interval: int = 0  # evaluate every N policy versions: version 0 before training, each multiple, the final (0 = off; verl test_freq)
    path: str = ""  # held-out prompt file(s), read like data.path with data's chat template; "" = toy tasks
    prompt_key: str = ""  # eval.path's prompt column ("" = data.prompt_key; a.b: nested field)
    answer_key: str = ""  # eval.path's answer column ("" = data.answer_key; verl files: reward_model.ground_truth)
    num_prompts: int = 64  # prompts evaluated: the file's first N (0 = all of it); toy tasks: N distinct, none trained on
    n_samples: int = 1  # responses per prompt: eval/reward_mean is mean@n, eval/reward_best_mean best@n
    temperature: float = 0.0  # 0 = greedy (verl's validation default); > 0 samples with top_p and top_k
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    top_k: int = -1  # top-k sampling when temperature > 0 (-1 = all tokens)

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"eval.interval ({self.interval}) must be >= 0 (0 = no evaluation)")
        if self.num_prompts < 0:
            raise ValueError(f"eval.num_prompts ({self.num_prompts}) must be >= 0 (0 = the whole file)")
        if self.n_samples < 1:
            raise ValueError(f"eval.n_samples ({self.n_samples}) must be >= 1")
        check_sampling("eval", self.temperature, self.top_p, self.top_k)
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError(f"eval.n_samples ({self.n_samples}) > 1 with eval.temperature 0: greedy decoding gives the "
                             "same response every time; set eval.temperature > 0 for mean@n / best@n")
        if not self.path and self.num_prompts == 0:
            raise ValueError("eval.num_prompts must be >= 1 for generated toy tasks (eval.path is empty)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy model
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # parallel layout of the trainer
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and LR schedule
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig.unset)  # preset + axis overrides
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, optimizer batch, micro-batch budget, seed
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # engine, group size, response length, temperature
    rewards: RewardConfig = field(default_factory=RewardConfig)  # named rewards and their executor
    data: DataConfig = field(default_factory=DataConfig)  # prompt dataset (or generated toy tasks)
    loop: LoopConfig = field(default_factory=LoopConfig)  # rollout batch, sync/async, failure handling
    weights: WeightSyncConfig = field(default_factory=WeightSyncConfig)  # weight sync to engine servers (HTTP)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # run checkpoints and resume
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # JSONL, tensorboard, wandb, progress
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # MoE routing capture, drift and load metrics, replay (R2/R3)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # fail fast when a rollout server dies
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation every eval.interval policy versions
    output_dir: str = "runs/quickstart"  # where the run writes metrics, tensorboard files and checkpoints

    @staticmethod
    def fill_unset(node) -> None:
        """Loader hook: in a run the response length has one definition,
        ``rollout.max_new_tokens`` (L). An unset ``algorithm.max_response_len`` (L_max of
        dr_grpo's aggregation and of overlong shaping) is L, and with overlong shaping on an
        unset ``overlong_cache_len`` (L_c) is L / 5, the DAPO paper's 4096 of 20480 (the
        dapo preset's own values are the paper's lengths, not this run's)."""
        alg, L = node.algorithm, node.rollout.max_new_tokens
        resolved = _preset_values(alg.preset)
        if alg.max_response_len is None:
            alg.max_response_len = L
        shaping = alg.overlong_shaping if alg.overlong_shaping is not None else resolved["overlong_shaping"]
        if shaping and alg.overlong_cache_len is None:
            alg.overlong_cache_len = max(1, L // 5)

    def __post_init__(self) -> None:
        if self.train.steps == 0 and self.eval.interval == 0:
            raise ValueError("train.steps=0 trains nothing; with eval.interval > 0 it evaluates the policy (a "
                             "checkpoint's, when the output_dir has one) on the held-out prompts and stops")
        self._one_response_length()
        n = self.rollout.n_samples_per_prompt
        if self.loop.rollout_batch_size % n:
            raise ValueError(f"loop.rollout_batch_size ({self.loop.rollout_batch_size}) must be divisible by "
                             f"rollout.n_samples_per_prompt ({n}), the group size")
        keep = self.algorithm.gfpo_keep
        if keep and keep >= n:
            raise ValueError(f"algorithm.gfpo_keep ({keep}) must be smaller than rollout.n_samples_per_prompt ({n}): "
                             "GFPO keeps a subset of each group")
        if n == 1 and self.algorithm.advantage in GROUP_BASELINE_ADVANTAGES:
            raise ValueError(f"rollout.n_samples_per_prompt=1 with algorithm.advantage={self.algorithm.advantage}: a group "
                             "of one response has no group baseline, so every advantage is 0 and nothing trains; "
                             "sample several responses per prompt (GRPO-style runs use 4-64)")
        self._replay_sources()
        trained = self.trained_per_step
        if trained % self.train.global_batch:
            raise ValueError(f"train.global_batch ({self.train.global_batch}) must divide the responses trained per "
                             f"step ({trained} = {self.prompts_per_step} prompts x {keep or n})")
        self._layout_rules()

    def _replay_sources(self) -> None:
        """R3 replays the engines' routes: refuse, before anything runs, a run that turns off
        every way they reach the trainer (it would fail at its first step)."""
        if self.routing.replay != "r3":
            return
        r = self.rollout
        if r.backend == "embedded" and not r.embedded.capture_routed_experts:
            raise ValueError("routing.replay=r3 replays the engine's routes, but rollout.embedded.capture_routed_experts "
                             "is false: the embedded engine would record none")
        if r.backend == "sglang" and not r.client.server_urls and not r.sglang.enable_return_routed_experts:
            raise ValueError("routing.replay=r3 replays the engines' routes, but rollout.sglang."
                             "enable_return_routed_experts is false: the SGLang servers would return none")
        if not r.client.return_routed_experts:
            raise ValueError("routing.replay=r3 replays the engines' routes, but rollout.client.return_routed_experts "
                             "is false: the client would not ask the servers for them")

    def _layout_rules(self) -> None:
        """What the parallel layout asks of the rest of the run, checked before anything is built
        (the data-parallel part needs the world size: ``moe_rl.train.trainer.check_microbatching``)."""
        par, t = self.parallel, self.train
        if par.virtual_pipeline > 1 and t.global_batch % (t.micro_batch * par.pipeline_parallel):
            raise ValueError(
                f"parallel.virtual_pipeline ({par.virtual_pipeline}) runs Megatron's interleaved schedule, which needs "
                f"a multiple of pipeline_parallel ({par.pipeline_parallel}) micro-batches of train.micro_batch rows: "
                f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch ({t.micro_batch}) x "
                f"parallel.pipeline_parallel ({par.pipeline_parallel}) = {t.micro_batch * par.pipeline_parallel} "
                f"(x the data-parallel degree)")

    def _one_response_length(self) -> None:
        alg, L = self.algorithm, self.rollout.max_new_tokens
        if alg.advantage is None:  # built in Python from AlgorithmConfig.unset(): resolve the preset now
            alg.__post_init__()
        preset_L = _preset_values(alg.preset)["max_response_len"]
        if alg.max_response_len not in (0, preset_L, L):
            raise ValueError(f"algorithm.max_response_len ({alg.max_response_len}) differs from rollout.max_new_tokens "
                             f"({L}); the response length has one definition: set rollout.max_new_tokens")
        alg.max_response_len = L
        if alg.overlong_shaping and not 0 < alg.overlong_cache_len < L:
            raise ValueError(f"algorithm.overlong_cache_len ({alg.overlong_cache_len}) must be in (0, "
                             f"rollout.max_new_tokens={L}) with overlong shaping")
        alg._validate()

    @property
    def prompts_per_step(self) -> int:
        return self.loop.rollout_batch_size // self.rollout.n_samples_per_prompt

    @property
    def trained_per_step(self) -> int:
        """Responses the trainer gets per step (GFPO keeps ``gfpo_keep`` of each group)."""
        return self.prompts_per_step * (self.algorithm.gfpo_keep or self.rollout.n_samples_per_prompt)

    @property
    def temperature(self) -> float:
        """The temperature the trainer scores with: the engine's (greedy is scored at 1)."""
        return self.rollout.temperature or 1.0


def config_reference(schema: type = RunConfig, prefix: str = "") -> str:
    """The configuration reference as Markdown, generated from the typed config: one row per
    field (dotted key, type, default, the field's trailing comment), so it is never written
    twice. ``python -m moe_rl.config.run`` prints it."""
    import dataclasses
    import inspect
    import io
    import tokenize

    def comments(cls) -> dict:
        out = {}
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            return out
        names = {f.name for f in dataclasses.fields(cls)}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                line = tok.line.strip()
                name = line.split(":", 1)[0].strip()
                if name in names and name not in out:
                    out[name] = tok.string.lstrip("# ").strip()
        return out

    rows = []

    def walk(cls, pre: str) -> None:
        notes = comments(cls)
        obj = cls.unset() if cls is AlgorithmConfig else cls()
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{pre}{f.name}.")
                continue
            typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            shown = "preset" if cls is AlgorithmConfig and value is None and f.name != "preset" else repr(value)
            esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
            rows.append(f"| `{pre}{f.name}` | `{esc(typ)}` | `{esc(shown)}` | {esc(notes.get(f.name, ''))} |")

    walk(schema, prefix)
    return "| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


REFERENCE_HEADER = """# Configuration reference

Generated from the typed config (`moe_rl/config/run.py` and the dataclasses it nests) by
`python -m moe_rl.config.run > docs/configuration.md`; `tests/unit/test_config_reference.py` fails when it is stale.
Set any key in the YAML file or as a dotted override: `torchrun ... -m moe_rl.launch CONFIG.yaml train.steps=20`.

"""

if __name__ == "__main__":
    print(REFERENCE_HEADER + config_reference(), end="")
