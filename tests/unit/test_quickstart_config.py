"""Bad input stops before any work, with a message naming the field and the numbers: the
quickstart config and ``moe_rl.launch``'s checks (config, layout, data, engine URL, an
output_dir holding another model's checkpoint)."""

import json
import os
import subprocess
import sys

from pathlib import Path

import pytest

from launcher import ROOT
from moe_rl.config import ConfigError, load_config
from moe_rl.config.run import RunConfig
from moe_rl.launch import preflight

QUICKSTART = ROOT / "launch/configs/quickstart.yaml"


def _cfg(*overrides):
    return load_config(RunConfig, QUICKSTART, list(overrides))


def test_quickstart_config_is_valid_and_says_what_it_trains():
    cfg = _cfg()
    assert cfg.data.toy_task == "max_digit" and cfg.parallel.expert_parallel == 2
    assert cfg.algorithm.max_response_len == cfg.rollout.max_new_tokens  # one definition
    preflight(cfg, world=2)


@pytest.mark.parametrize("preset, extra, L_max, L_c", [
    ("dr_grpo", [], 256, 0),  # L_max: the run's response length
    ("dapo", [], 256, 51),  # L_c: a fifth of it, the paper's 4096 of 20480
    ("dapo", ["algorithm.overlong_cache_len=100"], 256, 100),  # what the user sets wins
    ("dapo", ["algorithm.overlong_shaping=false"], 256, 4096),  # unused: left as the preset has it
])
def test_presets_with_lengths_take_the_runs_response_length(preset, extra, L_max, L_c):
    cfg = _cfg(f"algorithm.preset={preset}", "rollout.max_new_tokens=256", "train.seq_len=512", *extra)
    assert (cfg.algorithm.max_response_len, cfg.algorithm.overlong_cache_len) == (L_max, L_c)


def test_a_group_of_one_is_fine_where_the_baseline_is_not_the_group():
    """REINFORCE++ whitens over the batch: one response per prompt still trains."""
    cfg = _cfg("rollout.n_samples_per_prompt=1", "loop.rollout_batch_size=32", "train.global_batch=32",
               "train.micro_batch=16", "algorithm.preset=reinforce_pp")
    assert cfg.algorithm.advantage == "reinforce_pp" and cfg.rollout.n_samples_per_prompt == 1


@pytest.mark.parametrize("overrides, message", [
    (["optim.learning_rate=0.1"], "optim.learning_rate"),
    (["train.steps=many"], "train.steps"),
    (["loop.rollout_batch_size=100"], "loop.rollout_batch_size (100) must be divisible by rollout.n_samples_per_prompt (16)"),
    (["train.global_batch=96"], "train.global_batch (96) must divide the responses trained per step (512"),
    (["algorithm.max_response_len=64"], "algorithm.max_response_len (64) differs from rollout.max_new_tokens (1)"),
    (["algorithm.preset=dapo"], "algorithm.overlong_shaping needs 0 < overlong_cache_len < max_response_len (got 1 and 1)"),
    (["loop.mode=fast"], "loop.mode='fast' is not one of sync, async"),
    (["data.toy_task=sums"], "data.toy_task='sums'"),
    (["rollout.n_samples_per_prompt=1", "loop.rollout_batch_size=32", "train.global_batch=32", "train.micro_batch=16"],
     "rollout.n_samples_per_prompt=1 with algorithm.advantage=grpo: a group of one response has no group baseline"),
    (["routing.replay=r3", "rollout.embedded.capture_routed_experts=false"],
     "routing.replay=r3 replays the engine's routes, but rollout.embedded.capture_routed_experts is false"),
    (["routing.replay=r3", "rollout.client.return_routed_experts=false"],
     "routing.replay=r3 replays the engines' routes, but rollout.client.return_routed_experts is false"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises((ConfigError, ValueError)) as e:
        _cfg(*overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.expert_parallel=3"], 3, "expert_parallel (3) must divide num_experts (8)"),
    (["parallel.tensor_parallel=2"], 3, "world_size (3) must be divisible by tensor_parallel (2)"),
    (["train.global_batch=128", "parallel.expert_parallel=1"], 3, "train.global_batch (128) must be divisible by the data-parallel degree (3"),
    (["data.path=/nonexistent/prompts.jsonl"], 2, "no such file '/nonexistent/prompts.jsonl'"),
    (["rollout.client.server_urls=[http://127.0.0.1:9]"], 2, "http://127.0.0.1:9 does not answer /health"),
])
def test_preflight_errors_name_the_numbers(overrides, world, message):
    with pytest.raises(ValueError) as e:
        preflight(_cfg(*overrides), world=world)
    assert message in str(e.value)


def test_a_model_directory_without_a_tokenizer_is_refused_by_field(tmp_path):
    """transformers loads an empty tokenizer (one token) from a checkpoint directory without
    tokenizer files, so every prompt would tokenize to nothing: refused before any work,
    naming the field that points there."""
    from moe_rl.models.tiny import save_tiny_hf

    model = Path(save_tiny_hf("qwen3_moe", tmp_path / "model"))
    assert not (model / "tokenizer.json").exists() and not (model / "tokenizer_config.json").exists()
    with pytest.raises(ValueError, match=r"model.hf_dir: '.*model' has no tokenizer \(tokenizer.json or"):
        preflight(_cfg(f"model.hf_dir={model}"), world=2)
    with pytest.raises(ValueError, match=r"data.tokenizer_path: '.*' has no tokenizer"):
        preflight(_cfg(f"data.tokenizer_path={tmp_path}"), world=2)


def test_a_quantized_model_directory_is_refused_with_the_conversion_to_run(tmp_path):
    from moe_rl.models.tiny import save_tiny_hf

    model = Path(save_tiny_hf("qwen3_moe", tmp_path / "model"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.hf_dir: '.*model' is quantized \(quantization_config.quant_method="
                                         r"'fp8'\).*convert_checkpoint.py --input .*model --output DIR --to hf"):
        preflight(_cfg(f"model.hf_dir={model}"), world=2)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    d = tmp_path / "checkpoints" / "step_00000004"
    d.mkdir(parents=True)
    (d / "run_state.json").write_text(json.dumps({"step": 4, "model": {"model_type": "mixtral", "vocab_size": 15}}))
    (d / "COMPLETE").write_text("ok\n")
    with pytest.raises(ValueError, match=r"another model .*model_type: checkpoint 'mixtral', config 'qwen3_moe'"):
        preflight(_cfg(f"output_dir={tmp_path}"), world=2)


def _fake_checkpoint(run_dir, cfg):
    """A complete run checkpoint of ``cfg``'s model holding ``cfg`` as its saved config."""
    from moe_rl.checkpoint import run_state as ckpt
    from moe_rl.config import to_yaml
    from moe_rl.launch import hf_config_of

    d = run_dir / "checkpoints" / "step_00000004"
    d.mkdir(parents=True)
    (d / "run_state.json").write_text(json.dumps({"step": 4, "model": ckpt.model_identity(hf_config_of(cfg))}))
    (d / "config.yaml").write_text(to_yaml(cfg))
    (d / "COMPLETE").write_text("ok\n")
    return d


def test_a_prompt_that_fills_the_engines_context_is_refused_before_the_model_is_built(tmp_path):
    """It crashed inside the in-process engine's KV cache at the first rollout."""
    import transformers

    from moe_rl.data.tokenizer import save_tokenizer
    from moe_rl.launch import load_prompts_for
    from moe_rl.models.tiny import save_tiny_hf

    model = Path(save_tiny_hf("qwen3_moe", tmp_path / "model", max_position_embeddings=64))
    save_tokenizer(model)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "short", "answer": "1"}) + "\n"
                    + json.dumps({"prompt": " ".join(["word"] * 80), "answer": "2"}) + "\n")
    hf = transformers.AutoConfig.from_pretrained(model)
    cfg = _cfg(f"model.hf_dir={model}", f"data.path={data}", "train.seq_len=512")
    with pytest.raises(ValueError, match=r"the longest prompt \(\d+ tokens\) leaves no room for a response in the "
                                         r"engines' context of 64 tokens"):
        load_prompts_for(cfg, str(model), hf)
    _, prompts = load_prompts_for(_cfg(f"model.hf_dir={model}", f"data.path={data}",
                                       "train.seq_len=512", "data.max_prompt_tokens=60"), str(model), hf)
    assert prompts.longest <= 60


def test_an_output_dir_the_run_cannot_write_is_refused_by_name(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir: cannot write to '.*file/run' \(NotADirectoryError"):
        preflight(_cfg(f"output_dir={tmp_path / 'file' / 'run'}"), world=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a directory")
    with pytest.raises(ValueError, match=r"output_dir: '.*run/checkpoints' exists and is not a directory"):
        preflight(_cfg(f"output_dir={tmp_path / 'run'}"), world=2)


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused(tmp_path):
    """checkpoint.resume=false next to an earlier run's checkpoints would overwrite its metrics,
    and pruning (keep the newest by step) would delete the new run's checkpoints."""
    _fake_checkpoint(tmp_path, _cfg(f"output_dir={tmp_path}"))
    with pytest.raises(ValueError, match=r"checkpoint.resume=false, but output_dir .* holds checkpoints of an earlier "
                                         r"run \(newest: .*step_00000004\)"):
        preflight(_cfg(f"output_dir={tmp_path}", "checkpoint.resume=false"), world=2)


def test_a_resume_that_changes_what_the_run_trains_is_refused_unless_accepted(tmp_path):
    d = _fake_checkpoint(tmp_path, _cfg(f"output_dir={tmp_path}"))
    preflight(_cfg(f"output_dir={tmp_path}", "train.steps=200", "metrics.progress=false"), world=2)  # free to change
    with pytest.raises(ValueError) as e:
        preflight(_cfg(f"output_dir={tmp_path}", "optim.lr=1e-2", "data.seed=7"), world=2)
    msg = str(e.value)
    assert f"resuming {d} with a config that changes what the run trains" in msg
    assert "data.seed: 0 -> 7" in msg and "optim.lr: 0.002 -> 0.01" in msg
    assert "checkpoint.resume_changes=[data.seed, optim.lr]" in msg
    preflight(_cfg(f"output_dir={tmp_path}", "optim.lr=1e-2", "data.seed=7",
                   "checkpoint.resume_changes=[optim, data.seed]"), world=2)
    with pytest.raises(ValueError, match=r"optim.adam_beta1: 0.9 -> 0.8 cannot change on resume"):
        preflight(_cfg(f"output_dir={tmp_path}", "optim.adam_beta1=0.8", "checkpoint.resume_changes=[optim]"), world=2)


def test_cli_exits_2_before_starting_anything(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    proc = subprocess.run([sys.executable, "-m", "moe_rl.launch", str(QUICKSTART), "parallel.expert_parallel=3",
                           f"output_dir={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "config error: world_size (2) must be divisible by expert_tensor_parallel (1) x expert_parallel (3)" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was written


def test_configuration_reference_is_generated_from_the_typed_config():
    import dataclasses

    from moe_rl.config.run import config_reference

    ref = config_reference()
    rows = [line for line in ref.splitlines()[2:] if line.startswith("| `")]
    assert len(rows) > 100
    assert "| `loop.rollout_batch_size` | `int` | `64` | responses generated per step" in ref
    assert "| `algorithm.clip_high` | `Optional[float]` | `preset` |" in ref
    assert "constant \\| linear \\| cosine" in ref  # pipes inside a cell are escaped
    import re

    assert all(len(re.findall(r"(?<!\\)\|", line)) == 5 for line in rows)  # 4 cells, whatever the text
    assert dataclasses.fields(RunConfig)[0].name == "model"


def test_replay_on_a_dense_model_is_refused_before_anything_starts(tmp_path):
    """Routing replay asked for on a model without experts cannot happen: the run must not
    start as if it would."""
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    proc = subprocess.run([sys.executable, "-m", "moe_rl.launch", str(QUICKSTART), "model.tiny_family=qwen3",
                           "routing.replay=r3", "parallel.expert_parallel=1", f"output_dir={tmp_path}/run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "routing.replay=r3 needs a MoE model; qwen3 has no MoE layers" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_one_run_at_a_time_writes_an_output_dir(tmp_path):
    """A second run on a live run's output_dir is refused, naming the holder; the lock goes
    with the process (closing its descriptor, as any exit does, frees it)."""
    import os
    import subprocess
    import sys

    from moe_rl.launch import lock_output_dir

    fd, why = lock_output_dir(str(tmp_path / "run"))
    assert fd is not None and why is None
    second = subprocess.run([sys.executable, "-c", "import sys; from moe_rl.launch import lock_output_dir; "
                             f"print(lock_output_dir({str(tmp_path / 'run')!r})[1])"],
                            capture_output=True, text=True, timeout=60)
    assert f"is in use by another run (pid {os.getpid()} on " in second.stdout, second.stderr[-2000:]
    os.close(fd)
    fd, why = lock_output_dir(str(tmp_path / "run"))
    assert why is None
    os.close(fd)
