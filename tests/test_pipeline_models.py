"""PipelineModels (orwcfm_fast.flows.pipeline_models): LoRA export at the trained scale, gradient
averaging over ranks.

- ``save_lora`` writes the adapter's ``LoraConfig`` as diffusers' adapter metadata, so a fresh
  pipeline's ``load_lora_weights`` reproduces an adapter trained with ``lora_alpha != lora_rank``
  (without it diffusers assumes ``alpha = r``); also for the EMA's weights.
- ``reduce_gradients`` all-reduces the same size on every rank when one rank has a parameter without
  a gradient (two gloo processes; a mismatch fails or hangs the collective), and averages: one step's
  LoRA gradient on two ranks, each with half of a batch, is a single process's on the whole batch.

The diffusers tests use tiny random-init pipelines written by ``save_pretrained`` and loaded back
(``HF_HUB_OFFLINE=1``). diffusers is imported inside them only: the spawned gloo workers import this
module and need torch alone.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _lora_velocities import policy_loaded_and_base

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("peft") is None,
    reason="the text-to-image path needs the 'diffusers' extra")

PROMPTS = ["a dog", "a tree"]
RANK, ALPHA = 4, 8.0  # alpha = 2 r: the scale diffusers would get wrong without the metadata


def load(saved, family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    return cls.from_pretrained(saved / family, dtype=torch.float32)


def lora_trainer(saved, family, tmp_path, **extra):
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.flows.tiny import TINY_SIZE

    cfg = {"prompts": PROMPTS, "reward": lambda images: images.mean((1, 2, 3)), "resolution": TINY_SIZE,
           "ode_steps": 2, "lora_rank": RANK, "lora_alpha": ALPHA, "batch_size": 2, "images_per_prompt": 1,
           "max_sequence_length": 16, "seed": 0, "savedir": str(tmp_path), "handle_signals": False,
           "guidance_scale": 3.5 if family == "flux" else 4.5, **extra}
    return ORWCFMTrainer(load(saved, family), cfg, "cpu")


def perturb(params, seed, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def velocities(trainer, transformer):
    """(the trained transformer's policy, ``transformer``'s, the reference's) conditional velocities."""
    flow = trainer.models.flow
    cond = flow.encode(PROMPTS)
    t = torch.tensor([0.3, 0.8])
    x = torch.randn((2, *trainer.sample_shape), generator=torch.Generator().manual_seed(1))
    return policy_loaded_and_base(trainer, transformer, t, x, cond)


def written_alpha(folder: Path) -> float | None:
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    meta = _load_sft_state_dict_metadata(str(folder / "pytorch_lora_weights.safetensors"))
    return None if meta is None else meta.get("transformer.lora_alpha")


@needs_diffusers
@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_save_lora_keeps_lora_alpha(saved, tmp_path, family):
    trainer = lora_trainer(saved, family, tmp_path)
    perturb(trainer.models.trainable_parameters(), seed=2)  # B != 0: the adapter changes the output
    trainer.save_lora(tmp_path / "lora")
    assert written_alpha(tmp_path / "lora") == ALPHA
    fresh = load(saved, family)
    fresh.load_lora_weights(tmp_path / "lora")
    ours, theirs, base = velocities(trainer, fresh.transformer)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapter does something (so the scale is tested)


@needs_diffusers
def test_save_lora_of_the_ema_keeps_lora_alpha_and_the_policy(saved, tmp_path):
    trainer = lora_trainer(saved, "sd35", tmp_path, ema_decay=0.9)
    params = trainer.models.trainable_parameters()
    perturb(params, seed=2)
    policy = [p.detach().clone() for p in params]
    ema = [p.detach().clone() for p in params]
    perturb(ema, seed=3)
    with torch.no_grad():
        torch._foreach_copy_(trainer._ema, ema)
    trainer.save_lora(tmp_path / "lora")  # writes the EMA's weights (save_lora(path, weights=ema))
    assert all(torch.equal(p, q) for p, q in zip(params, policy))  # the policy is put back
    assert written_alpha(tmp_path / "lora") == ALPHA
    fresh = load(saved, "sd35")
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        torch._foreach_copy_(params, ema)  # the trained transformer as the EMA, to compare
    ours, theirs, base = velocities(trainer, fresh.transformer)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------- reduce_gradients over ranks

WORLD = 2


def _reduce_worker(rank: int, init_file: str, outdir: str) -> None:
    from orwcfm_fast.flows.pipeline_models import PipelineModels

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)),
                  torch.nn.Parameter(torch.zeros(5))]
        params[0].grad = torch.full((3,), float(rank + 1))  # rank 0: 1, rank 1: 2
        if rank == 0:  # only rank 0 has a gradient for the second parameter; nobody for the third
            params[1].grad = torch.full((2, 2), 4.0)
        models = SimpleNamespace(trainable_parameters=lambda: params, _master=None,  # no fp32 master copies
                                 sharded=False)  # (FSDP reduce-scatters in the backward itself)
        PipelineModels.reduce_gradients(models)
        torch.save([p.grad for p in params], Path(outdir) / f"grads-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture
def _importable_from_children(monkeypatch):
    # spawned children import this module by name: make tests/ importable there
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.usefixtures("_importable_from_children")
def test_reduce_gradients_with_a_gradient_missing_on_one_rank(tmp_path):
    mp.spawn(_reduce_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        g0, g1, g2 = torch.load(tmp_path / f"grads-{rank}.pt")
        torch.testing.assert_close(g0, torch.full((3,), 1.5), rtol=0, atol=0)  # averaged
        torch.testing.assert_close(g1, torch.full((2, 2), 2.0), rtol=0, atol=0)  # (4 + 0) / 2 on both ranks
        assert g2 is None  # no rank had one: stays None, as in a single process


PIPELINE_BATCH = 4  # the combined batch of the LoRA gradient test; rank r trains rows [2 r, 2 r + 2)


def _lora_step_gradient(trainer, rows: slice) -> torch.Tensor:
    """One training step's LoRA gradient, flattened: ``rows`` of a fixed batch through the trainer's loss and
    ``_optimize`` (backward, ``reduce_gradients``, clipping off), read after the step.

    The adapter's weights and the batch (prompts, x_0, x_1, weights, loss times t) are the same in every process:
    the weights are set (B != 0, so the policy is off the reference and the W2 term has a gradient too), the
    conditioning is the whole batch's, sliced, and ``_loss_times`` returns the rows' times (the trainer would
    draw them per rank).
    """
    gen = torch.Generator().manual_seed(7)
    params = trainer.models.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    shape = (PIPELINE_BATCH, *trainer.sample_shape)
    x0, x1 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    weights, t = 0.5 + torch.rand(PIPELINE_BATCH, generator=gen), torch.rand(PIPELINE_BATCH, generator=gen)
    cond = trainer.models.encode(PROMPTS * (PIPELINE_BATCH // len(PROMPTS)), PIPELINE_BATCH)
    trainer._loss_times = lambda n, like: t[rows]
    loss, metrics = trainer._coupled_loss(x0[rows], x1[rows], weights[rows], tuple(c[rows] for c in cond))
    trainer._optimize(loss, metrics, weights[rows], weights[rows])
    return torch.cat([p.grad.flatten() for p in params])


def _lora_gradient_worker(rank: int, init_file: str, outdir: str, saved_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        trainer = lora_trainer(Path(saved_dir), "sd3", Path(outdir), grad_clip=None)
        half = PIPELINE_BATCH // WORLD
        grad = _lora_step_gradient(trainer, slice(rank * half, (rank + 1) * half))
        torch.save(grad, Path(outdir) / f"lora-grad-{rank}.pt")
    finally:
        dist.destroy_process_group()


@needs_diffusers
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.usefixtures("_importable_from_children")
def test_two_ranks_average_the_lora_gradient_of_the_combined_batch(saved, tmp_path):
    """``reduce_gradients`` averages: the LoRA gradient of one step on two ranks, each with its half of a batch,
    equals a single process's on the whole batch. The loss is a mean over each rank's batch, so the average
    over ranks of the halves' means is the whole batch's mean because the halves are equal (2 + 2 rows).
    Summing instead would leave the ranks identical (and Adam would hide the factor 2 in their weights)."""
    mp.spawn(_lora_gradient_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), str(saved)), nprocs=WORLD,
             join=True)
    single = _lora_step_gradient(lora_trainer(saved, "sd3", tmp_path, grad_clip=None), slice(0, PIPELINE_BATCH))
    scale = float(single.abs().max())
    assert scale > 1e-2  # a gradient to compare (not zeros)
    # float32: the transformer runs the rows in batches of 2 or 4 (twice that with guidance), whose matmuls
    # round differently in the last bits, and the batch means are taken in another order; measured: at most
    # 1.3e-6 * scale apart, an eighth of atol. Summing over ranks instead would double every entry (an error of
    # `scale` on the largest).
    for rank in range(WORLD):
        torch.testing.assert_close(torch.load(tmp_path / f"lora-grad-{rank}.pt", weights_only=True), single,
                                   rtol=1e-5, atol=1e-5 * scale)
