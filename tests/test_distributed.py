"""Data-parallel training under torch.distributed: two CPU processes on gloo.

Each test spawns two processes that join a process group (file rendezvous, no ports) and build an
``ORWCFMTrainer``; the trainer notices the group and runs data-parallel. Checked: the ranks start
from rank 0's weights even when their own initialisations differ, end with identical weights,
draw different samples, write files only on rank 0, and resume exactly from a checkpoint at the
same world size. (The torchrun + CLI path is tested in tests/test_cli_train.py.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


class Velocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    def forward(self, t, x):
        return self.net(torch.cat([x, t[:, None]], 1))


def neg_sq_norm(x):
    return -(x**2).sum(1)


def _trainer(outdir: str, **extra):
    from orwcfm_fast import ORWCFMTrainer

    torch.manual_seed(100 + dist.get_rank())  # different initial weights per rank, on purpose
    cfg = {"batch_size": 8, "ode_steps": 2, "warmup_steps": 2, "reward": neg_sq_norm, "sample_shape": (2,),
           "seed": 3, "savedir": outdir, "coupling": "exact_ot", **extra}
    return ORWCFMTrainer(Velocity(), cfg)


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def _flat(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.net_model.parameters()])


def _worker(rank: int, init_file: str, outdir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = Path(outdir)
        if scenario == "train":
            trainer = _trainer(outdir, checkpoint_every=2, overlap_sampling=True)
            start = _gather(_flat(trainer))
            samples = _gather(trainer._policy_samples())
            trainer.train(2, 3)
            final = _gather(_flat(trainer))
            last = _gather(torch.cat([p.flatten() for p in trainer.last_policy.parameters()]))
            ref = _gather(torch.cat([p.flatten() for p in trainer.ref_model.parameters()]))
            if rank == 0:
                torch.save({"start": start, "samples": samples, "final": final, "last": last, "ref": ref,
                            "history": trainer.history}, out / "result.pt")
        elif scenario in ("straight", "resumed"):
            trainer = _trainer(str(out / scenario))
            if scenario == "straight":
                trainer.train(3, 2)
            else:
                trainer.train(1, 2)
                trainer.save_checkpoint(out / "mid.pt")
                trainer = _trainer(str(out / "resumed2"))
                trainer.load_checkpoint(out / "mid.pt")
                trainer.train(2, 2)
            final = _gather(torch.cat([_flat(trainer), trainer.generator.get_state().float()]))
            if rank == 0:
                torch.save({"final": final, "history": trainer.history}, out / f"{scenario}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, scenario: str) -> None:
    init_file = tmp_path / f"rendezvous-{scenario}"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path), scenario), nprocs=WORLD, join=True)


@pytest.fixture(autouse=True)
def _importable_from_children(monkeypatch):
    # spawned children import this module by name: make tests/ importable there
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))


def test_two_ranks_train_in_lockstep_and_only_rank0_writes(tmp_path):
    _spawn(tmp_path, "train")
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert torch.equal(result["start"][0], result["start"][1])  # rank 0's weights were broadcast
    assert not torch.equal(result["samples"][0], result["samples"][1])  # each rank samples its own batch
    for key in ("final", "last", "ref"):
        assert torch.equal(result[key][0], result[key][1]), key
    assert not torch.equal(result["final"][0], result["start"][0])  # and they did train
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-e000002.pt"]  # one writer, no temp files left
    csv = (tmp_path / "orw-cfm-w2_metrics.csv").read_text().splitlines()
    assert len(csv) == 3  # header + 2 epochs, written once
    assert [m["epoch"] for m in result["history"]] == [1, 2]


def test_resume_at_the_same_world_size_is_exact(tmp_path):
    _spawn(tmp_path, "straight")
    _spawn(tmp_path, "resumed")
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for rank in range(WORLD):  # weights and each rank's own generator state
        assert torch.equal(straight["final"][rank], resumed["final"][rank]), rank
    assert not torch.equal(straight["final"][0][-64:], straight["final"][1][-64:])  # per-rank generators differ
    assert straight["history"] == resumed["history"]
