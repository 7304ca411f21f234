"""FSDP2 sharding of a pipeline's transformer (config ``parallelism: "fsdp"``): two CPU processes on gloo.

One spawn of two ranks runs every scenario (starting the processes is most of the cost), each on a tiny
random-init SD3.5 pipeline built in the process, and writes what the tests compare into a folder:

- the same LoRA run under ``ddp`` and under ``fsdp``: the adapters agree to float32 reduction-order error;
- each rank holds half of the transformer's parameter bytes (measured from the local shards);
- full fine-tuning under ``fsdp`` (fp32 master shards, two frozen sharded copies) against ``ddp``;
- a run interrupted by a sharded checkpoint (rotation folder ``.dcp``) and resumed equals the straight run
  bit for bit: adapters, EMA, optimiser moments and every rank's generators;
- a bf16 base with fp32 adapters under a bf16 compute policy, its first forward the reference's (adapters off);
- a wrong layout is refused with a message naming both world sizes; ``reshard=True`` loads it on one rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
PROMPTS = ["a dog", "a red cat", "a tree", "a blue car"]


def red_minus_blue(images, prompts):
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def _config(outdir, **overrides):
    from orwcfm_fast.flows.tiny import TINY_SIZE

    cfg = {"prompts": PROMPTS, "reward": red_minus_blue, "resolution": TINY_SIZE, "guidance_scale": 4.5,
           "ode_steps": 2, "lora_rank": 4, "batch_size": 4, "images_per_prompt": 2, "max_sequence_length": 16,
           "seed": 0, "warmup_steps": 0, "learning_rate": 1e-2, "temperature": 1.0, "savedir": str(outdir),
           "handle_signals": False, "parallelism": "fsdp"}
    cfg.update(overrides)
    return cfg


def _trainer(outdir, dtype=torch.float32, **overrides):
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(sd35=True, seed=0)
    pipe.to(dtype)
    moves = []
    if overrides.get("parallelism", "fsdp") == "fsdp":  # FSDP moves the transformer unit by unit, never whole
        transformer_to = pipe.transformer.to
        pipe.transformer.to = lambda *args, **kwargs: (moves.append((args, kwargs)), transformer_to(*args, **kwargs))[1]
    trainer = ORWCFMTrainer(pipe, _config(outdir, **overrides), "cpu")
    assert moves == [], f"the transformer was moved whole before sharding: {moves}"
    return trainer


def _full(tensors) -> torch.Tensor:
    """The tensors gathered whole (a collective for sharded ones) and flattened into one float64 vector."""
    from orwcfm_fast.distributed import full_tensor

    return torch.cat([full_tensor(t.detach()).double().flatten() for t in tensors])


def _optimizer_moments(trainer) -> torch.Tensor:
    state = trainer.optimizer.state
    params = trainer.models.trainable_parameters()
    return _full([state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")])


def _record(trainer) -> dict:
    """What a run ends with: the trained weights (whole), EMA, Adam moments, every rank's generators, history."""
    gens = [None] * dist.get_world_size()
    dist.all_gather_object(gens, (trainer.generator.get_state(), trainer.cpu_generator.get_state()))
    return {"weights": _full(trainer.models.trainable_parameters()),
            "last": _full(trainer.models.roles.last_policy_parameters()) if trainer.models.roles else None,
            "ema": _full(trainer._ema) if trainer._ema is not None else None,
            "moments": _optimizer_moments(trainer), "generators": gens, "history": trainer.history}


def _resharded(module) -> None:
    """Free the parameters a sharded module holds gathered: FSDP keeps the root's own ones (embedders, final
    layer; not the blocks) whole after a forward without gradients (sampling), for its next forward."""
    if hasattr(module, "reshard"):
        module.reshard()


def _scenario(rank: int, out: Path, scenario: str) -> None:
    from orwcfm_fast.distributed import local_parameter_bytes

    def save(name, value):
        if rank == 0:
            torch.save(value, out / f"{name}.pt")

    if scenario in ("ddp_lora", "fsdp_lora"):
        # TensorBoard's sample grid (rank 0 logs it) and an evaluation of 3 prompts on 2 ranks (one rank gets one
        # fewer): under fsdp every rank must run as many forwards, or the run hangs
        trainer = _trainer(out / scenario, parallelism=scenario.split("_")[0], use_tensorboard=True, log_samples=2,
                           gradient_checkpointing=True)
        trainer.train(1, 2)
        transformer = trainer.models.pipe.transformer
        _resharded(transformer)
        held = [None] * WORLD
        dist.all_gather_object(held, local_parameter_bytes(transformer))
        record = {**_record(trainer), "held": held,
                  "total": sum(p.numel() * p.element_size() for p in transformer.parameters())}
        evaluation = trainer.evaluate(prompts=PROMPTS[:3], samples_per_prompt=2)
        save(scenario, {**record, "evaluation": {k: evaluation[k] for k in ("reward", "diversity", "per_prompt")},
                        "tensorboard": sorted(p.name for p in (out / scenario / "tensorboard").rglob("*"))})
    elif scenario in ("ddp_full", "fsdp_full"):
        trainer = _trainer(out / scenario, parallelism=scenario.split("_")[0], lora_rank=None, learning_rate=1e-4)
        trainer.train(1, 2)
        held = [None] * WORLD
        modules = (trainer.net_model, trainer.last_policy.transformer, trainer.ref_model.transformer)
        for module in modules:
            _resharded(module)
        dist.all_gather_object(held, [local_parameter_bytes(m) for m in modules])
        save(scenario, {**_record(trainer), "held": held,
                        "ref": _full(trainer.ref_model.transformer.parameters()),
                        "last_full": _full(trainer.last_policy.transformer.parameters())})
    elif scenario in ("straight", "resumed"):
        extra = {"ema_decay": 0.9, "checkpoint_every": 1, "keep_checkpoints": 1}
        if scenario == "straight":
            trainer = _trainer(out / scenario, **extra)
            trainer.train(2, 2)
            trainer.save_lora(out / "lora_ema")  # the EMA's adapter, gathered: every rank calls it, rank 0 writes
            with trainer._ema_weights():  # what sample() runs with: the EMA in the sharded parameters
                inside = _full(trainer.models.trainable_parameters())
            save("ema_swap", {"inside": inside, "after": _full(trainer.models.trainable_parameters())})
            if rank == 0:
                from safetensors.torch import load_file

                exported = load_file(out / "lora_ema" / "pytorch_lora_weights.safetensors")
                save("lora_ema", torch.cat([t.double().flatten() for t in exported.values()]))
        else:
            first = _trainer(out / scenario, **extra)
            first.train(1, 2)
            latest = first.checkpoints.latest()
            save("checkpointed", _record(first))  # what the checkpoint holds
            del first
            trainer = _trainer(out / f"{scenario}-2", **extra)
            trainer.load_checkpoint(latest)
            trainer.train(1, 2)
            save("latest", str(latest))
        save(scenario, _record(trainer))
    elif scenario == "layouts":
        # the resumed run's checkpoint: refused by a ddp run of the same ranks, loaded with reshard=True
        latest = Path(torch.load(out / "latest.pt", weights_only=True))
        trainer = _trainer(out / "layouts", parallelism="ddp", ema_decay=0.9)
        try:
            trainer.load_checkpoint(latest)
            message = None
        except Exception as err:  # noqa: BLE001 - the test reads it
            message = f"{type(err).__name__}: {err}"
        trainer.load_checkpoint(latest, reshard=True)
        try:  # full fine-tuning may overlap sampling with the backward, but not sharded
            _trainer(out / "overlap", lora_rank=None, overlap_sampling=True)
            overlap = None
        except Exception as err:  # noqa: BLE001 - the test reads it
            overlap = f"{type(err).__name__}: {err}"
        save("layouts", {"message": message, "weights": _full(trainer.models.trainable_parameters()),
                         "ema": _full(trainer._ema), "epoch": trainer.epoch, "overlap": overlap})
    elif scenario == "bf16":
        from orwcfm_fast.distributed import shard_module
        from orwcfm_fast.flows.lora import LoraRoles
        from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

        # the helper alone: a bf16 base, fp32 adapters, bf16 compute; the first forward runs with adapters off
        transformer = tiny_sd3_pipeline(sd35=True, seed=0).transformer.to(torch.bfloat16).requires_grad_(False)
        roles = LoraRoles(transformer, 4, seed=0)
        shard_module(transformer, list(transformer.transformer_blocks), torch.bfloat16)
        roles.refresh_parameters()
        gen = torch.Generator().manual_seed(rank)
        inputs = {"hidden_states": torch.randn(2, 16, 8, 8, generator=gen),
                  "encoder_hidden_states": torch.randn(2, 5, transformer.config.joint_attention_dim, generator=gen),
                  "pooled_projections": torch.randn(2, transformer.config.pooled_projection_dim, generator=gen),
                  "timestep": torch.tensor([500.0, 250.0]), "return_dict": False}
        with torch.no_grad(), roles.role("reference"):
            reference = transformer(**inputs)[0]
        policy = transformer(**inputs)[0]
        ((policy.float() - reference.float() - 1.0) ** 2).mean().backward()
        grads = [p.grad for p in roles.trainable_parameters()]
        save("bf16", {"dtypes": sorted({str(g.dtype) for g in grads if g is not None}),
                      "with_grad": sum(g is not None for g in grads), "adapters": len(grads),
                      "finite": all(bool(torch.isfinite(g.full_tensor()).all()) for g in grads if g is not None)})
        # and the trainer on a bf16 pipeline under precision bf16 takes steps
        trainer = _trainer(out / "bf16", dtype=torch.bfloat16, precision="bf16")
        start = _full(trainer.models.trainable_parameters())
        trainer.train(1, 1)
        save("bf16_trainer", {"start": start, "end": _full(trainer.models.trainable_parameters()),
                              "loss": trainer.history[-1]["total_loss"]})
    elif scenario == "families":
        from test_families import FAMILIES
        from test_families import config as family_config

        from torch.distributed.fsdp import FSDPModule

        from orwcfm_fast import ORWCFMTrainer
        from orwcfm_fast.flows.tiny import build_tiny_pipeline

        results = {}
        for name in ("flux", *FAMILIES):
            extra = family_config(out, name) if name in FAMILIES else _config(out)
            extra.update(savedir=str(out / f"family-{name}"), reward=red_minus_blue)
            velocities = {}
            for layout in ("ddp", "fsdp"):
                trainer = ORWCFMTrainer(build_tiny_pipeline(name), {**extra, "parallelism": layout}, "cpu")
                gen = torch.Generator().manual_seed(5)
                x = torch.randn(2, *trainer.sample_shape, generator=gen)
                cond = trainer.models.encode(PROMPTS[:2], 2)
                with torch.no_grad():
                    velocities[layout] = trainer._policy_forward(torch.tensor([0.3, 0.7]), x, *cond)
            trainer.train(1, 1)  # the fsdp one
            transformer = trainer.models.pipe.transformer
            _resharded(transformer)
            held = [None] * WORLD
            dist.all_gather_object(held, local_parameter_bytes(transformer))
            results[name] = {"ddp": velocities["ddp"], "fsdp": velocities["fsdp"], "held": held,
                             "units": len(trainer.models.flow.shard_units(transformer)),
                             "units_sharded": all(isinstance(u, FSDPModule)
                                                  for u in trainer.models.flow.shard_units(transformer)),
                             "total": sum(p.numel() * p.element_size() for p in transformer.parameters()),
                             "loss": trainer.history[-1]["total_loss"]}
        save("families", results)
    elif scenario == "plan":
        # what orwcfm-fast plan predicts per GPU, against the shards a LoRA trainer holds at rest on each rank
        from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

        if rank == 0:
            tiny_sd3_pipeline(sd35=True, seed=0).save_pretrained(out / "plan_pipeline")
        dist.barrier()
        transformer = _trainer(out / scenario).models.pipe.transformer
        _resharded(transformer)
        buffers = sum(t.numel() * t.element_size() for t in transformer.buffers() if t.is_floating_point())
        held = [None] * WORLD
        dist.all_gather_object(held, (local_parameter_bytes(transformer), buffers))
        save(scenario, {"held": held})
    else:
        raise ValueError(scenario)


def _worker(rank: int, world: int, init_file: str, outdir: str, scenarios: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            _scenario(rank, Path(outdir), scenario)
    finally:
        dist.destroy_process_group()


def _one_rank(rank: int, init_file: str, outdir: str) -> None:
    """One process: the two-rank checkpoint refused, then loaded with reshard=True."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    out = Path(outdir)
    try:
        latest = Path(torch.load(out / "latest.pt", weights_only=True))
        trainer = _trainer(out / "one", ema_decay=0.9)
        try:
            trainer.load_checkpoint(latest)
            message = None
        except Exception as err:  # noqa: BLE001 - the test reads it
            message = f"{type(err).__name__}: {err}"
        before = _full(trainer.models.trainable_parameters())
        other = _trainer(out / "other-rank", ema_decay=0.9, lora_rank=8)  # adapters of another shape
        try:
            other.load_checkpoint(latest, reshard=True)
            mismatch = None
        except Exception as err:  # noqa: BLE001 - the test reads it
            mismatch = f"{type(err).__name__}: {err}"
        mismatch_untouched = len(other.optimizer.state) == 0 and other.epoch == 0
        trainer.load_checkpoint(latest, reshard=True)
        torch.save({"message": message, "before": before, "mismatch": mismatch, "mismatch_untouched": mismatch_untouched,
                    "weights": _full(trainer.models.trainable_parameters()), "ema": _full(trainer._ema),
                    "moments": _optimizer_moments(trainer), "epoch": trainer.epoch,
                    "held": sum(p.numel() for p in trainer.models.trainable_parameters())}, out / "one.pt")
    finally:
        dist.destroy_process_group()


def _children_import_this_module(patch: pytest.MonkeyPatch) -> None:
    patch.syspath_prepend(str(Path(__file__).parent))
    patch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    scenarios = ("ddp_lora", "fsdp_lora", "ddp_full", "fsdp_full", "straight", "resumed", "layouts", "bf16",
                 "families", "plan")
    with pytest.MonkeyPatch.context() as patch:
        _children_import_this_module(patch)
        mp.spawn(_worker, args=(WORLD, str(out / "rendezvous"), str(out), scenarios), nprocs=WORLD, join=True)
        mp.spawn(_one_rank, args=(str(out / "rendezvous-one"), str(out)), nprocs=1, join=True)
    return out


def _load(runs: Path, name: str):
    return torch.load(runs / f"{name}.pt", weights_only=False)


def test_fsdp_lora_adapters_equal_ddp(runs):
    ddp, fsdp = _load(runs, "ddp_lora"), _load(runs, "fsdp_lora")
    assert ddp["weights"].shape == fsdp["weights"].shape and ddp["weights"].numel() > 1000
    # the runs trained: B moved off zero (LoRA's B starts at 0), in both
    assert ddp["weights"].abs().max() > 1e-3
    # float32; the same batches, seeds and updates: only the gradient reduction differs (an all-reduce of the flat
    # gradients, or FSDP's reduce-scatter per block), which may round differently (~1 ulp per step; Adam's
    # m / sqrt(v) can amplify it where v is tiny). Measured here: bit-equal (0.0 of entries up to 0.18 after 2 steps
    # at lr 1e-2); the tolerance allows a few ulps amplified 100x. A sum instead of a mean over ranks, or a
    # missing reduction, moves the weights by ~1e-2 (lr-sized Adam steps in other directions)
    torch.testing.assert_close(fsdp["weights"], ddp["weights"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fsdp["last"], ddp["last"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fsdp["moments"], ddp["moments"], rtol=1e-4, atol=1e-10)
    assert [h["epoch"] for h in fsdp["history"]] == [1]
    # the same weights evaluate the same (the grid sampled on both ranks, one evaluation discarded on rank 1)
    assert fsdp["evaluation"]["per_prompt"].keys() == set(PROMPTS[:3])
    assert fsdp["evaluation"]["reward"] == pytest.approx(ddp["evaluation"]["reward"], rel=1e-6)
    assert fsdp["evaluation"]["diversity"] == pytest.approx(ddp["evaluation"]["diversity"], rel=1e-5)
    assert any(name.startswith("events.out.tfevents") for name in fsdp["tensorboard"])
    for key in ("reward", "forwards_total"):
        assert fsdp["history"][0][key] == pytest.approx(ddp["history"][0][key], rel=1e-5), key


def test_each_rank_holds_half_of_the_transformer(runs):
    ddp, fsdp = _load(runs, "ddp_lora"), _load(runs, "fsdp_lora")
    total = fsdp["total"]
    assert ddp["held"] == [total, total]  # replicated
    assert sum(fsdp["held"]) == total  # the shards partition the parameters
    for held in fsdp["held"]:  # dim-0 shards of odd sizes differ by a row: within 2% of half
        assert abs(held - total / 2) <= 0.02 * total, fsdp["held"]


def test_fsdp_full_fine_tuning_equals_ddp(runs):
    ddp, fsdp = _load(runs, "ddp_full"), _load(runs, "fsdp_full")
    assert fsdp["weights"].numel() > 50_000
    # measured: 1.5e-8 apart (entries up to 1.0, 2 steps at lr 1e-4), the reduction order's rounding
    torch.testing.assert_close(fsdp["weights"], ddp["weights"], rtol=0, atol=1e-6)
    # Adam's moments: measured 1.2e-9 apart (of entries up to 1.7e-2): within 1e-6 of the largest
    torch.testing.assert_close(fsdp["moments"], ddp["moments"], rtol=0, atol=1e-6 * float(ddp["moments"].abs().max()))
    torch.testing.assert_close(fsdp["ref"], ddp["ref"], rtol=0, atol=0)  # the reference never moves
    assert not torch.equal(fsdp["weights"], fsdp["ref"])
    # every transformer is sharded: the trained one, the last policy and the reference
    for shards, replicas in zip(zip(*fsdp["held"]), zip(*ddp["held"])):
        assert sum(shards) == replicas[0] and max(shards) <= 0.52 * replicas[0], (shards, replicas)


def test_sharded_resume_is_bit_identical(runs):
    straight, resumed = _load(runs, "straight"), _load(runs, "resumed")
    latest = Path(_load(runs, "latest"))
    assert latest.name == "checkpoint-e000001.dcp" and latest.is_dir()
    assert sorted(p.name for p in latest.parent.iterdir()) == ["checkpoint-e000001.dcp"]  # no temporaries left
    for key in ("weights", "last", "ema", "moments"):
        assert torch.equal(straight[key], resumed[key]), key
    for rank in range(WORLD):
        for a, b in zip(straight["generators"][rank], resumed["generators"][rank]):
            assert torch.equal(a, b), rank
    assert straight["history"] == resumed["history"]
    # save_lora wrote the EMA's policy adapter (gathered whole), not the current weights: as many values, the same
    # multiset as the EMA (the file orders them by name)
    swap = _load(runs, "ema_swap")
    assert torch.equal(swap["inside"], straight["ema"]) and torch.equal(swap["after"], straight["weights"])
    exported = _load(runs, "lora_ema").sort().values
    assert torch.equal(exported, straight["ema"].sort().values)
    assert not torch.equal(exported, straight["weights"].sort().values)
    # the straight run's own rotation kept one sharded checkpoint, its last
    assert sorted(p.name for p in (runs / "straight" / "checkpoints").iterdir()) == ["checkpoint-e000002.dcp"]


def test_another_layout_is_refused_unless_resharded(runs):
    layouts, one = _load(runs, "layouts"), _load(runs, "one")
    assert layouts["message"].startswith("CheckpointError") and "'fsdp'" in layouts["message"] \
        and "'ddp'" in layouts["message"] and "reshard" in layouts["message"]
    assert layouts["overlap"].startswith("ConfigError") and "'overlap_sampling'" in layouts["overlap"] \
        and "'fsdp'" in layouts["overlap"]
    assert one["message"].startswith("CheckpointError") and "2 rank(s)" in one["message"] \
        and "this run has 1" in one["message"]
    # adapters of another rank: refused before anything changed (the optimiser did not even get a state)
    assert one["mismatch"].startswith("CheckpointError") and "shape mismatches" in one["mismatch"] \
        and "lora_rank" in one["mismatch"]
    assert one["mismatch_untouched"]
    # resharded: two ranks' shards whole in one process, and unsharded in a ddp run of two ranks, exactly as saved
    saved = _load(runs, "checkpointed")
    assert not torch.equal(saved["weights"], one["before"])  # loading has something to change
    for loaded in (layouts, one):
        assert loaded["epoch"] == 1
        assert torch.equal(loaded["weights"], saved["weights"]) and torch.equal(loaded["ema"], saved["ema"])
    assert torch.equal(one["moments"], saved["moments"])


def test_bf16_base_with_fp32_adapters(runs):
    bf16 = _load(runs, "bf16")
    # reduce-scattered in fp32 into the fp32 adapters, although the first forward had no trainable parameter
    assert bf16["dtypes"] == ["torch.float32"] and bf16["with_grad"] == bf16["adapters"] and bf16["finite"]
    trainer = _load(runs, "bf16_trainer")
    assert not torch.equal(trainer["start"], trainer["end"]) and torch.isfinite(trainer["end"]).all()
    assert trainer["loss"] == trainer["loss"]  # not NaN


def test_every_family_shards_per_block(runs):
    """FLUX.1, Qwen-Image, FLUX.2 / klein, Z-Image and Wan: the sharded transformer's velocity is the unsharded
    one's (both from the same seeded build), each rank holds about half, and a training step runs."""
    families = _load(runs, "families")
    assert set(families) == {"flux", "qwen_image", "flux2", "flux2_klein", "z_image", "wan"}
    for name, result in families.items():
        assert result["units"] >= 2 and result["units_sharded"], name  # one FSDP unit per block
        # float32: the same weights gathered; the forwards differ at most in summation order
        torch.testing.assert_close(result["fsdp"], result["ddp"], rtol=1e-5, atol=1e-6, msg=name)
        assert sum(result["held"]) == result["total"], name
        assert max(result["held"]) <= 0.55 * result["total"], (name, result["held"], result["total"])
        assert result["loss"] == result["loss"], name


def test_plan_predicts_each_ranks_transformer_bytes(runs):
    """``orwcfm-fast plan`` on the saved tiny SD3.5 pipeline, 2 GPUs: its FSDP rows (transformer weights + the two
    fp32 adapters) equal the bytes the first rank holds at rest (its dim-0 shards, the largest; the buffers whole),
    and no rank holds more (here both hold as much); its DDP rows equal the replicated transformer of the ddp run."""
    from orwcfm_fast import plan as P

    report = P.make_plan(runs / "plan_pipeline", _config(runs / "plan-report"), gpus=WORLD, dtype="fp32")
    rows = {prefix: next(m for m in report.memory if m.name.startswith(prefix))
            for prefix in ("transformer weights", "LoRA adapters")}
    fsdp = sum(m.fsdp for m in rows.values())
    held = [params + buffers for params, buffers in _load(runs, "plan")["held"]]
    assert fsdp == held[0] == max(held), (fsdp, held)  # measured: 227,840 bytes on each rank
    ddp = _load(runs, "ddp_lora")["held"]  # the same trainer config under ddp, after its steps
    buffers = _load(runs, "plan")["held"][0][1]
    assert buffers >= 256 * 32 * 4  # SD3's pos_embed table, fp32
    assert sum(m.ddp for m in rows.values()) == ddp[0] + buffers == ddp[1] + buffers


def test_fsdp_needs_a_pipeline_and_a_process_group(tmp_path):
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.config import ConfigError
    from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 2)

        def forward(self, t, x):
            return self.net(torch.cat([x, t[:, None]], 1))

    with pytest.raises(ConfigError, match="plain velocity module .*'ddp'"):
        ORWCFMTrainer(Velocity(), {"parallelism": "fsdp", "sample_shape": (2,), "reward": lambda x: x.sum(1)})
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="no torch.distributed process group.*torchrun"):
        ORWCFMTrainer(tiny_sd3_pipeline(), _config(tmp_path), "cpu")
    with pytest.raises(ConfigError, match="'parallelism'.*'ddp'"):
        ORWCFMTrainer(tiny_sd3_pipeline(), _config(tmp_path, parallelism="zero3"), "cpu")


# ----------------------------------------------------------------------------- CUDA (make gpu-check)


def _cuda_worker(rank: int, init_file: str, outdir: str) -> None:
    """One process on cuda:0 with NCCL: a bf16 LoRA pipeline sharded under a bf16 compute policy, and full
    fine-tuning's fp32 master shards; a sharded checkpoint saved and loaded back exactly."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    from orwcfm_fast import ORWCFMTrainer
    from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

    out, results = Path(outdir), {}
    try:
        for name, extra in (("lora", {}), ("full", {"lora_rank": None, "learning_rate": 1e-4})):
            def build():
                pipe = tiny_sd3_pipeline(sd35=True, seed=0).to(torch.bfloat16)
                return ORWCFMTrainer(pipe, _config(out / name, precision="bf16", ema_decay=0.9, **extra), "cuda")

            trainer = build()
            start = _full(trainer.models.trainable_parameters())
            trainer.train(1, 2)
            trainer.save_checkpoint(out / name / "ck.dcp")
            loaded = build()
            loaded.load_checkpoint(out / name / "ck.dcp")
            results[name] = {
                "dtypes": sorted({str(p.dtype) for p in trainer.models.trainable_parameters()}),
                "moved": float((_full(trainer.models.trainable_parameters()) - start).abs().max()),
                "loss": trainer.history[-1]["total_loss"],
                "same_weights": torch.equal(_full(trainer.models.trainable_parameters()),
                                            _full(loaded.models.trainable_parameters())),
                "same_ema": torch.equal(_full(trainer._ema), _full(loaded._ema)),
                "same_moments": torch.equal(_optimizer_moments(trainer), _optimizer_moments(loaded))}
        torch.save(results, out / "cuda.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_fsdp_on_cuda_with_nccl(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        _children_import_this_module(patch)
        mp.spawn(_cuda_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=1, join=True)
    results = torch.load(tmp_path / "cuda.pt", weights_only=True)
    for name, result in results.items():
        assert result["dtypes"] == ["torch.float32"], name  # fp32 adapters / fp32 master shards
        assert result["moved"] > 0 and result["loss"] == result["loss"], name
        assert result["same_weights"] and result["same_ema"] and result["same_moments"], name
