"""Data-parallel training under torch.distributed: two CPU processes on gloo.

Two processes join a process group (file rendezvous, no ports) and build ``ORWCFMTrainer`` s, one
scenario after another (one spawn for the module: starting the processes is most of the cost); the
trainer notices the group and runs data-parallel. Checked: the ranks start from rank 0's weights even when their own
initialisations differ, end with identical weights, draw different samples, write files only on
rank 0, resume exactly from a checkpoint at the same world size, and average (not sum) the
gradients: one step's gradient on two ranks, each with half of a batch, is a single process's
gradient on the whole batch. (The torchrun + CLI path is tested in tests/test_cli_train.py.)
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

    rank = dist.get_rank() if dist.is_initialized() else 0  # a single process builds rank 0's model
    torch.manual_seed(100 + rank)  # different initial weights per rank, on purpose
    cfg = {"batch_size": 8, "ode_steps": 2, "warmup_steps": 2, "reward": neg_sq_norm, "sample_shape": (2,),
           "seed": 3, "savedir": outdir, "coupling": "exact_ot", **extra}
    return ORWCFMTrainer(Velocity(), cfg)


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def _flat(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.net_model.parameters()])


BATCH = 8  # the combined batch of the gradient test; rank r trains rows [r * BATCH / 2, (r + 1) * BATCH / 2)


def _step_gradient(trainer, rows: slice) -> torch.Tensor:
    """One training step's gradient, flattened: ``rows`` of a fixed batch through the trainer's loss and
    ``_optimize`` (backward, the reduction over ranks, clipping off), read after the step.

    The batch (x_0, x_1, weights and the loss times t) is the same in every process; the trainer would draw
    t per rank, so its ``_loss_times`` returns the rows' times. The policy is moved off the reference first
    (the same way everywhere), so the W2 term has a gradient too.
    """
    gen = torch.Generator().manual_seed(7)
    x0, x1 = torch.randn(BATCH, 2, generator=gen), 2 * torch.randn(BATCH, 2, generator=gen)
    weights, t = 0.5 + torch.rand(BATCH, generator=gen), torch.rand(BATCH, generator=gen)
    with torch.no_grad():
        for p in trainer.models.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    trainer._loss_times = lambda n, like: t[rows]
    loss, metrics = trainer._coupled_loss(x0[rows], x1[rows], weights[rows])
    trainer._optimize(loss, metrics, weights[rows], weights[rows])
    return torch.cat([p.grad.flatten() for p in trainer.models.trainable_parameters()])


def _scenario(rank: int, outdir: str, scenario: str) -> None:
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
    elif scenario == "gradient":
        half = BATCH // WORLD
        trainer = _trainer(str(out / "gradient"), grad_clip=None)
        grads = _gather(_step_gradient(trainer, slice(rank * half, (rank + 1) * half)))
        if rank == 0:
            torch.save(grads, out / "gradient.pt")
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
    else:
        raise ValueError(scenario)


def _worker(rank: int, init_file: str, outdir: str, scenarios: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for scenario in scenarios:
            _scenario(rank, outdir, scenario)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, *scenarios: str) -> None:
    """Two processes in one process group run ``scenarios`` one after the other (each builds its own trainers;
    starting the processes is most of the cost)."""
    init_file = tmp_path / f"rendezvous-{'-'.join(scenarios)}"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path), scenarios), nprocs=WORLD, join=True)


def _children_import_this_module(patch: pytest.MonkeyPatch) -> None:
    # spawned children import this module by name: make tests/ importable there
    patch.syspath_prepend(str(Path(__file__).parent))
    patch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))


@pytest.fixture(autouse=True)
def _importable_from_children(monkeypatch):
    _children_import_this_module(monkeypatch)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The folder of the one spawn the tests read: the ranks train (scenario ``train``, savedir the folder), take
    one step on their halves of a fixed batch (``gradient``), then train straight and resumed from a checkpoint
    (``straight``, ``resumed``); each scenario builds its own trainers, with their own savedirs."""
    out = tmp_path_factory.mktemp("two_ranks")
    with pytest.MonkeyPatch.context() as patch:
        _children_import_this_module(patch)
        _spawn(out, "train", "gradient", "straight", "resumed")
    return out


def test_two_ranks_train_in_lockstep_and_only_rank0_writes(two_ranks):
    tmp_path = two_ranks
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


def test_resume_at_the_same_world_size_is_exact(two_ranks):
    straight = torch.load(two_ranks / "straight.pt", weights_only=True)
    resumed = torch.load(two_ranks / "resumed.pt", weights_only=True)
    for rank in range(WORLD):  # weights and each rank's own generator state
        assert torch.equal(straight["final"][rank], resumed["final"][rank]), rank
    assert not torch.equal(straight["final"][0][-64:], straight["final"][1][-64:])  # per-rank generators differ
    assert straight["history"] == resumed["history"]


def test_two_ranks_average_the_gradient_of_the_combined_batch(two_ranks, tmp_path):
    """DDP averages: the step's gradient on two ranks, each with its half of a batch, equals a single process's
    gradient on the whole batch. The loss is a mean over each rank's batch, so the average over ranks of the
    halves' means is the whole batch's mean because the halves are equal (4 + 4 rows). Summing over ranks
    instead would leave the ranks identical (and Adam would hide the factor 2 in their weights)."""
    ranks = torch.load(two_ranks / "gradient.pt", weights_only=True)
    single = _step_gradient(_trainer(str(tmp_path), grad_clip=None), slice(0, BATCH))
    assert single.abs().max() > 1e-2  # a gradient to compare (not zeros)
    # float32: only the order of the batch reductions differs (8 rows at once, or 4 per rank then the 2 ranks);
    # measured: at most 1.2e-7 apart (one ulp of the largest entry, ~1.3), a tenth of atol. Summing over ranks
    # instead would double every entry (an error of ~1.3 on the largest).
    for rank in range(WORLD):
        torch.testing.assert_close(ranks[rank], single, rtol=1e-5, atol=1e-6 * float(single.abs().max()))
