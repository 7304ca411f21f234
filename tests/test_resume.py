"""A run survives interruption and bad input: exact resume, periodic and signal checkpoints, clear errors.

Exactness is checked bit for bit on the CPU against an uninterrupted run, with every source of
randomness in play: the trainer's generators (noise, times, couplings), torch's global generator
(policy dropout), numpy's and Python's global generators (the reward below draws from both).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orwcfm_fast import ORWCFMTrainer
from orwcfm_fast.checkpoints import CheckpointError, latest_checkpoint
from orwcfm_fast.config import ConfigError
from orwcfm_fast.interrupt import StopRequests, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]


class DropoutVelocity(torch.nn.Module):
    def __init__(self, dim=2, hidden=32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], dim=1))


class NoisyReward:
    """-|x|^2 plus noise from numpy's and Python's global generators; optionally signals on call ``signal_at``."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGTERM):
        self.calls = 0
        self.signal_at, self.signum = signal_at, signum

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.signum)
        noise = torch.from_numpy(np.random.standard_normal(x.shape[0])).float() * 0.01
        return -(x**2).sum(1) + noise + 0.01 * random.random()


def make_trainer(tmp_path, reward=None, **overrides):
    torch.manual_seed(0)
    cfg = {"batch_size": 8, "ode_steps": 2, "ode_solver": "midpoint", "warmup_steps": 3, "learning_rate": 1e-2,
           "reward": reward or NoisyReward(), "sample_shape": (2,), "seed": 11, "savedir": str(tmp_path),
           "policy_dropout": True, "coupling": "exact_ot"}
    cfg.update(overrides)
    return ORWCFMTrainer(DropoutVelocity(), cfg)


def reset_global_rngs():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)


def snapshot(trainer):
    params = torch.cat([p.detach().flatten() for p in trainer.net_model.parameters()])
    last = torch.cat([p.detach().flatten() for p in trainer.last_policy.parameters()])
    rngs = (trainer.generator.get_state(), trainer.cpu_generator.get_state(), torch.get_rng_state(),
            np.random.get_state()[1].copy(), random.getstate())
    return params, last, trainer.history, trainer.global_step, rngs


def assert_same_run(a, b):
    (pa, la, ha, sa, ra), (pb, lb, hb, sb, rb) = a, b
    assert torch.equal(pa, pb) and torch.equal(la, lb)
    assert ha == hb and sa == sb
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1]) and torch.equal(ra[2], rb[2])
    assert np.array_equal(ra[3], rb[3]) and ra[4] == rb[4]


@pytest.mark.parametrize("overlap", [False, True])
def test_resume_at_an_epoch_boundary_is_bit_identical(tmp_path, overlap):
    reset_global_rngs()
    full = make_trainer(tmp_path / "full", overlap_sampling=overlap)
    full.train(3, 4)
    expected = snapshot(full)

    reset_global_rngs()
    first = make_trainer(tmp_path / "a", overlap_sampling=overlap)
    first.train(1, 4)
    first.save_checkpoint(tmp_path / "a" / "ckpt.pt")
    # Whatever happens between the two processes' lives must not matter:
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    resumed = make_trainer(tmp_path / "b", overlap_sampling=overlap)
    resumed.load_checkpoint(tmp_path / "a" / "ckpt.pt")
    resumed.train(2, 4)
    assert_same_run(snapshot(resumed), expected)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_saves_and_resume_is_bit_identical(tmp_path, overlap, signum):
    reset_global_rngs()
    full = make_trainer(tmp_path / "full", overlap_sampling=overlap)
    full.train(3, 5)
    expected = snapshot(full)

    reset_global_rngs()
    if not overlap:
        # Reward call 8 is made in step 3 of epoch 2, on the main thread: the signal arrives during step 3.
        stopped = make_trainer(tmp_path / "run", reward=NoisyReward(signal_at=8, signum=signum))
        step = 3
    else:
        # With overlap, step 3's batch (reward call 8) is made in the background during step 2, and when
        # that call comes relative to the main thread depends on the machine's load. Send the signal
        # from the main thread instead, right after step 2's optimizer step (global step 7): the
        # background batch is then in flight or done, and must be discarded and its draws rewound.
        stopped = make_trainer(tmp_path / "run", overlap_sampling=True)
        optimizer_steps = []

        def signal_after_step_7(optimizer, args, kwargs):
            optimizer_steps.append(1)
            if len(optimizer_steps) == 7:
                os.kill(os.getpid(), signum)

        stopped.optimizer.register_step_post_hook(signal_after_step_7)
        step = 2
    with pytest.raises(TrainingInterrupted) as info:
        stopped.train(3, 5)
    err = info.value
    assert err.code == 128 + signum and err.signum == signum
    # the step in flight when the signal came is finished, then it stops
    assert stopped.epoch == 1 and stopped.step_in_epoch == step
    assert Path(err.checkpoint).is_file() and err.checkpoint == latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    resumed = make_trainer(tmp_path / "run2", overlap_sampling=overlap)
    resumed.load_checkpoint(err.checkpoint)
    assert resumed.epoch == 1 and resumed.step_in_epoch == step
    new = resumed.train(2, 5)  # the rest of epoch 2, then epoch 3
    assert [m["epoch"] for m in new] == [2, 3]
    assert_same_run(snapshot(resumed), expected)


def test_a_mid_epoch_checkpoint_needs_the_same_steps_per_epoch(tmp_path):
    trainer = make_trainer(tmp_path, reward=NoisyReward(signal_at=4))
    with pytest.raises(TrainingInterrupted):
        trainer.train(1, 6)
    assert trainer.step_in_epoch == 4
    with pytest.raises(ValueError, match="after 4 steps, but steps_per_epoch is 3"):
        trainer.train(1, 3)


def test_checkpoint_every_keeps_the_newest(tmp_path):
    trainer = make_trainer(tmp_path, checkpoint_every=2, keep_checkpoints=2)
    trainer.train(6, 2)
    names = [p.name for p in trainer.checkpoints.checkpoints()]
    assert names == ["checkpoint-e000004.pt", "checkpoint-e000006.pt"]
    resumed = make_trainer(tmp_path / "r")
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert resumed.epoch == 6 and resumed.global_step == 12 and len(resumed.history) == 6


def test_checkpoint_keeps_the_reference_keys_and_all_random_states(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train(1, 2)
    trainer.save_checkpoint(tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    for key in ("net_model", "last_policy", "optim", "sched", "config", "ref_model", "epoch", "global_step", "rng"):
        assert key in ckpt, key
    (state,) = ckpt["rng"]
    assert set(state) >= {"generators", "torch_cpu", "numpy", "python"}
    assert set(state["generators"]) == {"generator", "cpu_generator"}


def test_second_signal_acts_at_once():
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; never reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handle_signals_false_leaves_handlers_alone(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        trainer = make_trainer(tmp_path, reward=NoisyReward(signal_at=2), handle_signals=False)
        (means,) = trainer.train(1, 3)  # the user's handler runs; training goes on
        assert seen == [signal.SIGTERM] and means["epoch"] == 1 and trainer.global_step == 3
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_to_a_training_process_exits_cleanly_with_a_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from orwcfm_fast import ORWCFMTrainer

        class V(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(3, 2)
            def forward(self, t, x):
                return self.lin(torch.cat([x, t[:, None]], 1))

        def reward(x):
            time.sleep(0.01)
            return -(x ** 2).sum(1)

        cfg = dict(batch_size=4, ode_steps=2, warmup_steps=0, reward=reward, sample_shape=(2,), seed=0,
                   savedir={str(tmp_path)!r}, checkpoint_every=1)
        trainer = ORWCFMTrainer(V(), cfg)
        trainer.train(10_000, 20)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "checkpoints" / "checkpoint-e000001.pt"
    deadline = time.monotonic() + 60
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert first.exists(), proc.communicate(timeout=30)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    newest = latest_checkpoint(tmp_path / "checkpoints")
    ckpt = torch.load(newest, weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) > (1, 0)  # written on the signal, after epoch 1's


# ---------------------------------------------------------------- bad input: clear errors, nothing lost


def test_nan_reward_raises_before_any_update(tmp_path):
    def nan_reward(x):
        r = -(x**2).sum(1)
        r[3] = float("nan")
        return r

    trainer = make_trainer(tmp_path, reward=nan_reward)
    before = [p.detach().clone() for p in trainer.net_model.parameters()]
    with pytest.raises(ValueError, match=r"NaN.*\[3\]"):
        trainer.training_step()
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.net_model.parameters()))
    assert trainer.global_step == 0


class SometimesNaN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.poison = False

    def forward(self, t, x):
        out = self.lin(torch.cat([x, t[:, None]], 1))
        return out * float("nan") if self.poison else out  # only net_model: the copies keep poison False


@pytest.mark.parametrize("via", ["training_step", "train"])
def test_non_finite_gradient_leaves_parameters_untouched(tmp_path, via):
    torch.manual_seed(0)
    model = SometimesNaN()
    trainer = ORWCFMTrainer(model, {"batch_size": 4, "ode_steps": 2, "warmup_steps": 0, "sample_shape": (2,),
                                    "reward": lambda x: -(x**2).sum(1), "seed": 0, "savedir": str(tmp_path)})
    trainer.train(1, 2)
    before = [p.detach().clone() for p in trainer.net_model.parameters()]
    adam_state = {k: v.clone() for k, v in trainer.optimizer.state[trainer.net_model.lin.weight].items()}
    model.poison = True
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        trainer.training_step() if via == "training_step" else trainer.train(1, 3)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.net_model.parameters()))
    after = trainer.optimizer.state[trainer.net_model.lin.weight]
    assert all(torch.equal(adam_state[k], after[k]) for k in adam_state)
    assert trainer.global_step == 2


def test_checkpoint_of_another_architecture_changes_nothing(tmp_path):
    other = make_trainer(tmp_path / "other")
    other.save_checkpoint(tmp_path / "other.pt")
    torch.manual_seed(0)

    class Wider(DropoutVelocity):
        def __init__(self):
            super().__init__(hidden=48)

    trainer = ORWCFMTrainer(Wider(), {"batch_size": 8, "sample_shape": (2,), "reward": lambda x: x[:, 0],
                                      "savedir": str(tmp_path)})
    before = [p.detach().clone() for m in (trainer.net_model, trainer.last_policy) for p in m.parameters()]
    with pytest.raises(CheckpointError, match=r"shape mismatches .*net\.0\.weight: checkpoint \(32, 3\) vs model \(48, 3\)"):
        trainer.load_checkpoint(tmp_path / "other.pt")
    after = [p for m in (trainer.net_model, trainer.last_policy) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_missing_checkpoint_file_is_named(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(CheckpointError, match="not found: .*nowhere.pt"):
        trainer.load_checkpoint(tmp_path / "nowhere.pt")


def test_unknown_reward_name_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"reward.*jpeg_compresibility|jpeg_compresibility.*reward"):
        make_trainer(tmp_path, reward="jpeg_compresibility")


@pytest.mark.parametrize("key, value, expected", [
    ("checkpoint_every", 0, "'checkpoint_every'.*>= 1"),
    ("keep_checkpoints", -1, "'keep_checkpoints'.*>= 1"),
    ("handle_signals", "yes", "'handle_signals'.*True or False"),
    ("checkpoint_evrey", 1, "did you mean 'checkpoint_every'"),
    ("w2_coefficient", -1.0, "'w2_coefficient'.*>= 0"),
    ("temperature", -0.5, "'temperature'.*>= 0"),
    ("learning_rate", 0.0, "'learning_rate'.*> 0"),
    ("batch_size", 0, "'batch_size'.*>= 1"),
    ("ode_solver", "rk45", "'ode_solver'.*one of"),
    ("coupling", "exact-ot", "'coupling'.*did you mean 'exact_ot'"),
    ("batch_size", 8.0, "'batch_size'.*integer"),
])
def test_config_errors_name_the_key(tmp_path, key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        make_trainer(tmp_path, **{key: value})


def test_resume_with_another_world_size_warns(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train(1, 2)
    state = trainer.state_dict()
    state["world_size"], state["rng"] = 2, state["rng"] * 2
    torch.save(state, tmp_path / "two.pt")
    resumed = make_trainer(tmp_path / "r")
    with pytest.warns(UserWarning, match="2 processes, this one has 1"):
        resumed.load_checkpoint(tmp_path / "two.pt")
    assert resumed.epoch == 1


def test_first_import_of_torchcfm_and_pot_leaves_the_global_generators_alone():
    """A fresh process: building the first trainer (which imports torchcfm, hence POT, sklearn and rich) and the
    first ``weighted_ot`` batch must not draw from the user's global generators, or a run depends on whether those
    modules were imported before it (a resumed process imports them at another moment than the run it continues).
    Two processes, one per order: whichever comes first does the import (rich draws from Python's `random`)."""
    code = textwrap.dedent("""
        import random, sys
        import numpy as np, torch
        assert not any(m.split('.')[0] in ('torchcfm', 'ot', 'rich') for m in sys.modules), 'imported too early'
        from orwcfm_fast import ORWCFMTrainer
        from orwcfm_fast.coupling import weighted_ot

        class Velocity(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.theta = torch.nn.Parameter(torch.zeros(2))

            def forward(self, t, x):
                return self.theta.expand_as(x)

        def states():
            return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

        model = Velocity()
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        before = states()
        steps = {
            "trainer": lambda: ORWCFMTrainer(model, {"sample_shape": (2,), "reward": lambda x: x[:, 0], "seed": 0}),
            "coupling": lambda: weighted_ot(torch.zeros(4, 2), torch.ones(4, 2), torch.ones(4),
                                            generator=torch.Generator().manual_seed(0)),
        }
        for name in sys.argv[1:]:
            steps[name]()
        assert 'ot' in sys.modules and 'torchcfm' in sys.modules
        after = states()
        assert before[0] == after[0], "Python's random moved"
        assert np.array_equal(before[1], after[1]), "numpy's global generator moved"
        assert torch.equal(before[2], after[2]), "torch's CPU generator moved"  # seed 0: no seed drawn
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, *order], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for order in (("trainer", "coupling"), ("coupling", "trainer"))]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip().endswith("ok"), f"{proc.args[3:]}:\n{out}"
