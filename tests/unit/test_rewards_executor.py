"""The default process executor bounds every reward's time by killing its worker.

A reward that never returns (sympy on ``9^{9^{9^{9}}}``, which holds the GIL in one C call;
``while True: pass``; a sleep) must score per ``on_error`` within ``timeout_s`` plus start-up
slack, the other tasks of the batch must come back right, and the evaluator must stay usable.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from moe_rl.rewards import RewardConfig, RewardEvaluator, RewardInput, RewardSpec
from moe_rl.rewards.evaluator import RewardError
from moe_rl.rewards.worker_pool import TaskFailed, WorkerPool

SLACK_S = 8.0  # killing and reporting on a loaded 2-core machine (start-up is not charged to tasks)


@pytest.fixture
def hang_module(tmp_path, monkeypatch):
    (tmp_path / "hang_rewards_mod.py").write_text(textwrap.dedent("""
        import os, subprocess, time
        def spin(sample):
            while True:
                pass
        def nap(sample):
            time.sleep(600)
        def exact(sample):
            return float(sample.response.strip() == str(sample.label))
        def task(kind, arg=None):
            if kind == "spin":
                while True:
                    pass
            if kind == "sandbox":  # a child in a session of its own, as the code sandbox starts
                p = subprocess.Popen(["sleep", "600"], start_new_session=True)
                with open(arg, "w") as f:
                    f.write(str(p.pid))
                time.sleep(600)
            if kind == "die":
                os._exit(3)
            if kind == "raise":
                raise KeyError(arg)
            return ("done", arg, os.getpid())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hang_rewards_mod"


def _stat(pid: int) -> list:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # [state, ppid, ..., utime at 11, stime at 12]


def _descendants_cpu_s() -> float:
    """CPU seconds used so far by every live descendant of this process."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                procs[int(name)] = _stat(int(name))
            except OSError:
                pass
    family, total, grew = {os.getpid()}, 0.0, True
    while grew:
        new = {p for p, st in procs.items() if int(st[1]) in family} - family
        family |= new
        grew = bool(new)
    for p in family - {os.getpid()}:
        total += (int(procs[p][11]) + int(procs[p][12])) / os.sysconf("SC_CLK_TCK")
    return total


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_runaway_math_answer_scores_zero_in_time_and_the_evaluator_stays_usable():
    cfg = RewardConfig(rewards=[RewardSpec(name="acc", fn="math")], num_workers=2, timeout_s=3.0,
                       on_error="zero", progress=False)
    assert cfg.executor == "process"  # the default bounds time
    with RewardEvaluator(cfg) as ev:
        assert ev.evaluate([RewardInput(response=r"\boxed{4}", label="4")]).values == [{"acc": 1.0}]  # warm
        samples = [RewardInput(response=r"The answer is \boxed{9^{9^{9^{9}}}}", label="81"),
                   RewardInput(response=r"\boxed{\frac{1}{2}}", label="0.5"),
                   RewardInput(response=r"\boxed{7}", label="6")]
        t0 = time.monotonic()
        batch = ev.evaluate(samples)
        wall = time.monotonic() - t0
        assert [v["acc"] for v in batch.values] == [0.0, 1.0, 0.0]
        assert batch.errors[0]["acc"].startswith("TimeoutError") and "timeout_s=3.0" in batch.errors[0]["acc"]
        assert batch.errors[1:] == [{}, {}]
        assert wall < cfg.timeout_s + SLACK_S, wall
        before = _descendants_cpu_s()  # nothing of ours still computes the runaway answer
        time.sleep(1.0)
        assert _descendants_cpu_s() - before < 0.25
        assert ev.evaluate([RewardInput(response=r"\boxed{\sqrt{8}}", label=r"2\sqrt{2}")]).values == [{"acc": 1.0}]


def test_hanging_user_rewards_are_killed_and_scored_per_on_error(hang_module):
    specs = [RewardSpec(name="spin", fn=f"{hang_module}:spin"), RewardSpec(name="nap", fn=f"{hang_module}:nap"),
             RewardSpec(name="exact", fn=f"{hang_module}:exact")]
    samples = [RewardInput(response="4", label="4"), RewardInput(response="5", label="4")]
    with RewardEvaluator(RewardConfig(rewards=specs, num_workers=3, timeout_s=2.0, on_error="zero",
                                      progress=False)) as ev:
        ev.start()
        ev.evaluate([])  # waits for nothing; the workers warm up meanwhile
        t0 = time.monotonic()
        batch = ev.evaluate(samples)
        wall = time.monotonic() - t0
    assert batch.values == [{"spin": 0.0, "nap": 0.0, "exact": 1.0}, {"spin": 0.0, "nap": 0.0, "exact": 0.0}]
    assert all(e["spin"].startswith("TimeoutError") and e["nap"].startswith("TimeoutError") for e in batch.errors)
    assert all("exact" not in e for e in batch.errors)
    # Two rounds of kills (2 samples x 2 hanging rewards on 3 workers) plus replacements' start-up.
    assert wall < 2 * 2.0 + 2 * SLACK_S, wall

    cfg = RewardConfig(rewards=specs[1:], num_workers=2, timeout_s=2.0, progress=False)  # on_error=raise
    with RewardEvaluator(cfg) as ev:
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=r"reward 'nap' .* failed on sample 0: TimeoutError: .*timeout_s=2.0"):
            ev.evaluate(samples[:1])
        assert time.monotonic() - t0 < 2.0 + 2 * SLACK_S
        ev.config = RewardConfig(rewards=specs[2:], num_workers=2, timeout_s=2.0, progress=False)
        assert ev.evaluate(samples).values == [{"exact": 1.0}, {"exact": 0.0}]


def test_pool_kills_the_worker_and_what_it_started_and_keeps_the_others(hang_module, tmp_path):
    pid_file = str(tmp_path / "child.pid")
    pool = WorkerPool(f"{hang_module}:task", 2, preload=[hang_module])
    try:
        tasks = [("sandbox", pid_file), ("ok", 1), ("ok", 2), ("raise", "x"), ("ok", 3)]
        t0 = time.monotonic()
        results = dict(pool.run(tasks, timeout_s=2.0))
        assert time.monotonic() - t0 < 2.0 + 2 * SLACK_S
        assert isinstance(results[0], TimeoutError)
        assert [results[i][:2] for i in (1, 2, 4)] == [("done", 1), ("done", 2), ("done", 3)]
        assert isinstance(results[3], TaskFailed) and results[3].kind == "KeyError"
        child = int(open(pid_file).read())
        deadline = time.monotonic() + 5.0
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the killed worker's own-session child survived"
        workers = {results[i][2] for i in (1, 2, 4)}
        assert len(workers) == 1 and all(_alive(p) for p in workers)  # one worker did every quick task

        results = dict(pool.run([("die",), ("ok", 5)], timeout_s=30.0))  # a worker that dies on its own
        assert isinstance(results[0], TaskFailed) and results[0].kind == "WorkerDied" and "code 3" in str(results[0])
        assert results[1][:2] == ("done", 5)
        assert dict(pool.run([("ok", 6), ("ok", 7)], timeout_s=30.0))[1][:2] == ("done", 7)
    finally:
        pool.close()
    assert not any(_alive(p) for p in workers)  # close() leaves no worker behind


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_raise_fails_fast_on_a_hanging_reward_and_starts_nothing_after_it(hang_module, tmp_path, executor):
    """on_error=raise stops at the first failure: a batch whose first sample hangs raises after one
    timeout_s (not samples x timeout_s / workers), later tasks are never started, and the
    evaluator scores the next batch."""
    (tmp_path / "fail_fast_mod.py").write_text(textwrap.dedent(f"""
        import time
        def hang_first(sample):
            if sample.response == "hang":
                time.sleep(600)
            with open({str(tmp_path / "started")!r}, "a") as f:
                f.write(sample.response + "\\n")
            return 1.0
    """))
    samples = [RewardInput(response="hang")] * 8 + [RewardInput(response="late")]
    cfg = RewardConfig(rewards=[RewardSpec(name="h", fn="fail_fast_mod:hang_first")], executor=executor,
                       num_workers=1, timeout_s=2.0, progress=False)
    assert cfg.on_error == "raise"
    with RewardEvaluator(cfg) as ev:
        ev.start()
        ev.evaluate([])  # warm: start-up is not what is measured
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=r"reward 'h' .* failed on sample 0: TimeoutError: .*timeout_s=2.0"):
            ev.evaluate(samples)
        assert time.monotonic() - t0 < 2.0 + SLACK_S  # the old code waited 8 x 2 s
        assert not (tmp_path / "started").exists(), "tasks after the failing one were started"
        assert ev.evaluate([RewardInput(response="ok")] * 3).values == [{"h": 1.0}] * 3


def test_thread_executor_with_a_hanging_reward_lets_the_process_exit(hang_module, tmp_path):
    """A thread stuck in a reward (sleeping or spinning with the GIL) is abandoned, never joined:
    the process exits right after the error, under either on_error mode."""
    script = tmp_path / "run_hang.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from moe_rl.rewards import RewardConfig, RewardEvaluator, RewardInput, RewardSpec
        from moe_rl.rewards.evaluator import RewardError
        specs = [RewardSpec(name="nap", fn="{hang_module}:nap"), RewardSpec(name="spin", fn="{hang_module}:spin")]
        zero = RewardConfig(rewards=specs, executor="thread", num_workers=2, timeout_s=1.0, on_error="zero",
                            progress=False)
        with RewardEvaluator(zero) as ev:
            print(sorted(ev.evaluate([RewardInput(response="x")]).errors[0]), flush=True)
        try:
            with RewardEvaluator(RewardConfig(rewards=specs[:1], executor="thread", timeout_s=1.0,
                                              progress=False)) as ev:
                ev.evaluate([RewardInput(response="x")])
        except RewardError as e:
            print("raised", e, flush=True)
    """))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=os.getcwd())
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "['nap', 'spin']" in proc.stdout and "raised reward 'nap'" in proc.stdout, proc.stdout
    assert wall < 60.0, wall  # imports plus 2 x 1 s; the old code never exited
