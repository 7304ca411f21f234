"""The ``train`` command's text-to-image task on a tiny SD3.5 pipeline (saved with save_pretrained):
clear errors before any model is loaded, a run that writes its checkpoint and a LoRA that
diffusers loads, a resume, and a two-process torchrun run (LoRA identical on both ranks,
different prompts and samples per rank, one writer)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image task needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image task needs the 'diffusers' extra")

from orwcfm_fast.cli import main  # noqa: E402
from orwcfm_fast.precision import native_low_precision  # noqa: E402
from orwcfm_fast.train_run import weights_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a dog", "a red cat", "a tree", "a blue car", "a green boat", "a small house", "a yellow bird",
           "a white cloud"]
# The brief's tiny settings: 64 px (8x8 latents), 2 Euler steps, 4 samples = 2 prompts x 2 images, rank-4 LoRA.
TINY = {"resolution": 64, "ode_steps": 2, "batch_size": 4, "images_per_prompt": 2, "lora_rank": 4,
        "max_sequence_length": 16, "guidance_scale": 2.0, "warmup_steps": 0, "learning_rate": 1e-2,
        "checkpoint_every": 1}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from orwcfm_fast.flows.tiny import tiny_sd3_pipeline

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("t2i")
    tiny_sd3_pipeline(sd35=True).save_pretrained(root / "sd35")
    (root / "prompts.txt").write_text("# training prompts\n" + "\n".join(PROMPTS) + "\n")
    (root / "tiny.json").write_text(json.dumps(TINY))
    yield root
    mp.undo()


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _argv(root: Path, outdir: Path, *extra: str) -> list[str]:
    return ["train", "--task", "text-to-image", "--pretrained", str(root / "sd35"), "--prompts",
            str(root / "prompts.txt"), "--config", str(root / "tiny.json"), "--steps-per-epoch", "2",
            "--device", "cpu", "--outdir", str(outdir), "--quiet", *extra]


def _lora_digest(ckpt: dict) -> str:
    """The CLI's replica digest of a checkpoint's trained LoRA (the policy adapter, in parameter order)."""
    return weights_digest({f"trainable.{i}": p for i, p in enumerate(ckpt["lora"]["policy"])})


def _same_tensors(file_tensors, ckpt_tensors) -> bool:
    """Every tensor of the LoRA file equals one of the checkpoint's policy tensors (names differ), one to one."""
    left = list(ckpt_tensors)
    for t in file_tensors:
        match = next((i for i, c in enumerate(left) if c.shape == t.shape and torch.equal(c, t)), None)
        if match is None:
            return False
        left.pop(match)
    return not left


# ----------------------------------------------------------------------------- errors, before any model is loaded


def _set(flag: str, value: str):
    def change(root: Path, argv: list[str]) -> None:
        argv[argv.index(flag) + 1] = value.format(root=root)

    return change


def _drop(flag: str):
    def change(root: Path, argv: list[str]) -> None:
        i = argv.index(flag)
        del argv[i:i + 2]

    return change


def _add(*extra: str):
    return lambda root, argv: argv.extend(extra)


@pytest.mark.parametrize("change, message", [
    (_set("--pretrained", "{root}/missing"), "no such folder"),
    (_set("--pretrained", "{root}"), "no model_index.json"),
    (_set("--prompts", "{root}/missing.txt"), "does not exist"),
    (_set("--prompts", "{root}/tiny.json"), ".txt"),
    (_drop("--prompts"), "needs --prompts FILE"),
    (_drop("--pretrained"), "needs --pretrained DIR"),
    (_drop("--steps-per-epoch"), "needs --steps-per-epoch"),
    (_add("--reward", "jpeg_compresibility"), "did you mean 'jpeg_compressibility'"),
    (_add("--reward", "clip"), "'text_prompts'"),
    (_add("--ema"), "--ema does not apply"),
], ids=["no-dir", "no-model-index", "no-prompts-file", "prompts-suffix", "no-prompts", "no-pretrained",
        "no-steps", "reward-typo", "clip-without-text-prompts", "ema"])
def test_bad_arguments_exit_2_before_loading(pipeline_dir, tmp_path, capsys, change, message):
    argv = _argv(pipeline_dir, tmp_path / "out", "--epochs", "1")
    change(pipeline_dir, argv)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unsupported_pipeline_and_flags_of_other_tasks(pipeline_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    argv = _argv(pipeline_dir, tmp_path / "out", "--epochs", "1")
    argv[argv.index("--pretrained") + 1] = str(other)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'StableDiffusionXLPipeline'" in err and "StableDiffusion3Pipeline" in err
    gaussians = ["train", "--task", "gaussians", "--epochs", "1", "--outdir", str(tmp_path / "g")]
    assert main([*gaussians, "--prompts", str(pipeline_dir / "prompts.txt")]) == 2
    assert "--prompts applies to --task text-to-image and prompted-digits only" in capsys.readouterr().err
    assert main([*gaussians, "--dtype", "bf16"]) == 2
    assert "--dtype applies" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a run, its files, a resume


def test_text_to_image_run_writes_checkpoint_and_a_lora_diffusers_loads(pipeline_dir, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    out = tmp_path / "out"
    argv = _argv(pipeline_dir, out, "--epochs", "1")
    argv.remove("--quiet")  # the summary line is checked
    assert main(argv) == 0
    summary = capsys.readouterr().out
    # --dtype's default: what this CPU runs natively (fp32 on AVX2-only CPUs, bf16 where avx512_bf16 is fast)
    native = native_low_precision("cpu").dtype_name
    assert f"ORW-CFM-W2 train text-to-image (StableDiffusion3Pipeline, {native}) on cpu: epoch 0 -> 1 of 1" in summary
    assert "jpeg_compressibility" in summary and f"LoRA {out / 'lora'}" in summary
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final.pt", "lora", "orw-cfm-w2_metrics.csv",
                                                     "train_run.json"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-e000001.pt"]
    final = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert final["epoch"] == 1 and final["global_step"] == 2 and "base_fingerprint" in final
    assert final["lora_rank"] == 4 and not any(k.startswith("transformer") for k in final)  # adapters only
    assert final["config"]["prompts"] == str(pipeline_dir / "prompts.txt")
    assert final["config"]["resolution"] == 64 and final["config"]["max_sequence_length"] == 16
    reward = final["history"][0]["reward"]
    assert -100 < reward < 0  # minus the JPEG size in kB of 64 x 64 images, quantised from [0, 1] correctly
    record = json.loads((out / "train_run.json").read_text())
    assert record["task"] == "text-to-image" and record["pretrained"] == str(pipeline_dir / "sd35")

    # The LoRA file holds the trained policy adapter (the checkpoint's), and diffusers loads it.
    files = sorted(p.name for p in (out / "lora").iterdir())
    assert files == ["pytorch_lora_weights.safetensors"]
    saved = load_file(out / "lora" / files[0])
    assert all(k.startswith("transformer.") and "lora_" in k for k in saved)
    assert _same_tensors(saved.values(), final["lora"]["policy"])
    assert any(("lora_B" in k) and t.abs().max() > 0 for k, t in saved.items())  # it trained (B starts at 0)
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir / "sd35")
    base = StableDiffusion3Pipeline.from_pretrained(pipeline_dir / "sd35").transformer
    pipe.load_lora_weights(out / "lora")
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    cond = dict(encoder_hidden_states=torch.randn(1, 77 + 16, 32), pooled_projections=torch.randn(1, 16))
    with torch.no_grad():
        adapted = pipe.transformer(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
        plain = base(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, plain)

    # --resume auto (the default): one more epoch from final.pt, the LoRA rewritten.
    assert main(_argv(pipeline_dir, out, "--epochs", "2")) == 0
    resumed = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 4 and len(resumed["history"]) == 2
    assert _same_tensors(load_file(out / "lora" / files[0]).values(), resumed["lora"]["policy"])
    assert not _same_tensors(saved.values(), resumed["lora"]["policy"])


def test_flux_folder_in_bf16(tmp_path, capsys, monkeypatch, exported_trainers):
    """The class comes from model_index.json (here FluxPipeline); --dtype bf16 loads bf16 weights. The exported
    LoRA (lora_alpha 8 at rank 4: scale 2, which diffusers can only learn from the file's metadata) loads into a
    fresh bf16 pipeline as the trainer's policy: its adapters exactly, and its outputs."""
    from diffusers import FluxPipeline
    from peft.tuners.lora import LoraLayer

    from orwcfm_fast.flows.lora import POLICY
    from orwcfm_fast.flows.tiny import tiny_flux_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:3]) + "\n")
    out = tmp_path / "out"
    argv = ["train", "--task", "text-to-image", "--pretrained", str(tmp_path / "flux"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--dtype", "bf16", "--epochs", "1", "--steps-per-epoch", "1",
            "--device", "cpu", "--outdir", str(out), *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")],
            "--set", "guidance_scale=3.5", "--set", "lora_alpha=8"]
    assert main(argv) == 0
    assert "text-to-image (FluxPipeline, bf16) on cpu: epoch 0 -> 1 of 1" in capsys.readouterr().out
    final = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert {t.dtype for t in final["lora"]["policy"]} == {torch.float32}  # fp32 adapters on the bf16 base
    (trainer,) = exported_trainers  # the run's trainer, seen as it exported its LoRA
    policy = trainer.net_model
    pipe = FluxPipeline.from_pretrained(tmp_path / "flux", dtype=torch.bfloat16)
    pipe.load_lora_weights(out / "lora")
    loaded = pipe.transformer

    # The adapters, exactly: diffusers loads them into the bf16 pipeline as bf16, i.e. the trained fp32 policy
    # rounded to bf16, and at the trained scale alpha / r = 2 (1 if the metadata were lost).
    ours_layers = {n: m for n, m in policy.named_modules() if isinstance(m, LoraLayer)}
    their_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, LoraLayer)}
    assert their_layers and their_layers.keys() == ours_layers.keys()
    for name, layer in their_layers.items():
        (adapter,) = layer.active_adapters
        assert layer.scaling[adapter] == ours_layers[name].scaling[POLICY] == 8 / 4, name
        for part in ("lora_A", "lora_B"):
            theirs, ours = getattr(layer, part)[adapter].weight, getattr(ours_layers[name], part)[POLICY].weight
            assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, ours.detach().to(torch.bfloat16)), (name, part)

    flow = trainer.models.flow
    cond = flow.encode(["a dog"])
    t, x = torch.tensor([0.6]), torch.randn(1, *trainer.sample_shape, generator=torch.Generator().manual_seed(0))

    def velocities():
        with torch.no_grad():
            with trainer.models.roles.role("reference"):
                base = flow.transformer_velocity(t, x, cond, policy)
            return flow.transformer_velocity(t, x, cond, policy), flow.transformer_velocity(t, x, cond, loaded), base

    # The outputs in bf16, the user's path: loosely, bf16 rounds outputs of size ~2 to 2^-7, as large as the
    # adapters' effect here (measured: 1 ulp between trainer and loaded, 2 ulp between trainer and base).
    ours, theirs, base = velocities()
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(theirs, ours, rtol=2 ** -7, atol=2 ** -7 * ours.abs().max().item())
    # The outputs in fp32, sharply: both transformers upcast (their bf16 base weights are exact in fp32), so they
    # differ by the bf16 rounding of the loaded adapters only (2^-9 relative in A and B): at most about 2^-8 of
    # the adapters' effect, measured 1.1e-3 (2^-9.8); bound 2^-6. A lost alpha (scale 1) gives 1/2, the
    # initial adapters (B = 0: the base) 1.
    policy.float(), loaded.float()
    ours, theirs, base = velocities()
    assert ours.dtype == theirs.dtype == torch.float32
    effect = (ours - base).norm()
    assert (ours - base).abs().max() > 1e-3  # the adapters move the output far beyond fp32 noise (~1e-6)
    assert (theirs - ours).norm() <= 2 ** -6 * effect, ((theirs - ours).norm() / effect).item()


# ----------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_text_to_image(pipeline_dir, tmp_path):
    import torch.distributed as dist
    from safetensors.torch import load_file

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out, dump = tmp_path / "out", tmp_path / "dump" / "samples"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "orwcfm_fast.cli",
           *_argv(pipeline_dir, out, "--epochs", "1", "--dump-samples", str(dump))]
    cmd.remove("--quiet")  # the summary lines are checked
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr

    # One writer: rank 0's files only, each once.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final.pt", "lora", "orw-cfm-w2_metrics.csv",
                                                     "train_run.json"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-e000001.pt"]
    assert [p.name for p in (out / "lora").iterdir()] == ["pytorch_lora_weights.safetensors"]
    assert len((out / "orw-cfm-w2_metrics.csv").read_text().splitlines()) == 2  # header + 1 epoch, once
    assert result.stdout.count("ORW-CFM-W2 train text-to-image") == 1 and "2 ranks" in result.stdout
    assert "replicas: weights identical across 2 ranks" in result.stdout
    assert json.loads((out / "train_run.json").read_text())["world_size"] == 2

    # The LoRA adapters end bit-identical on both ranks (one all-reduce of their gradients per step),
    # equal to final.pt's and to the exported file; and they trained.
    final = torch.load(out / "final.pt", map_location="cpu", weights_only=True)
    assert final["world_size"] == 2 and len(final["rng"]) == 2
    dumps = [torch.load(f"{dump}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [d["rank"] for d in dumps] == [0, 1] and all(d["world_size"] == 2 for d in dumps)
    assert dumps[0]["weights_sha256"] == dumps[1]["weights_sha256"] == _lora_digest(final)
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert _same_tensors(saved.values(), final["lora"]["policy"])
    assert any(("lora_B" in k) and t.abs().max() > 0 for k, t in saved.items())

    # Each rank drew its own prompts and noise (its own seed): different next batches and samples.
    p0, p1 = dumps[0]["next_prompts"], dumps[1]["next_prompts"]
    assert len(p0) == len(p1) == 4 and set(p0) | set(p1) <= set(PROMPTS)
    assert p0 != p1
    a, b = dumps[0]["samples"], dumps[1]["samples"]
    assert a.shape == b.shape == (16, 16, 8, 8) and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)


def test_lora_pipelines_do_not_overlap_sampling_by_default_on_cuda(pipeline_dir, tmp_path):
    """overlap_sampling None means 'on CUDA', except with LoRA: the background sampler would switch the
    shared transformer's adapters (and their requires_grad) during the policy's backward."""
    from diffusers import StableDiffusion3Pipeline

    from orwcfm_fast import ORWCFMTrainer

    cfg = {**TINY, "prompts": PROMPTS, "reward": "jpeg_compressibility", "savedir": str(tmp_path)}
    for lora_rank, on_cuda in ((4, False), (None, True)):
        pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir / "sd35")
        trainer = ORWCFMTrainer(pipe, {**cfg, "lora_rank": lora_rank}, "cpu")
        assert trainer._overlap() is False  # the CPU default
        trainer.device = torch.device("cuda")  # what the default would be there (nothing runs)
        assert trainer._overlap() is on_cuda, lora_rank


def test_torchrun_fsdp_text_to_image_resumes_only_on_its_layout(pipeline_dir, tmp_path):
    """``--set parallelism=fsdp`` under torchrun: sharded checkpoints (``.dcp`` folders), the LoRA gathered and
    written once, the same adapters on both ranks; a resume on another number of ranks is refused (exit 1, both
    sizes named), on the same number it continues."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path / "out"

    def run(ranks: int, epochs: int):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "orwcfm_fast.cli",
               *_argv(pipeline_dir, out, "--epochs", str(epochs), "--set", "parallelism=fsdp")]
        cmd.remove("--quiet")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)

    result = run(2, 1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final.dcp", "lora", "orw-cfm-w2_metrics.csv",
                                                     "train_run.json"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-e000001.dcp"]
    assert "replicas: weights identical across 2 ranks" in result.stdout  # the gathered adapters
    # the exported LoRA is the sharded checkpoint's policy adapter, gathered whole
    dcp_to_torch_save(out / "final.dcp", tmp_path / "final.pt")
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    policy = [t for name, t in final["model"]["lora"].items() if ".orwcfm_policy." in name]
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert len(policy) == len(saved) and _same_tensors(saved.values(), policy)
    assert any(("lora_B" in k) and t.abs().max() > 0 for k, t in saved.items())

    refused = run(1, 2)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "written by 2 rank(s)" in refused.stderr and "this run has 1" in refused.stderr \
        and "--reshard" in refused.stderr
    resumed = run(2, 2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "epoch 1 -> 2 of 2 (1 trained" in resumed.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-e000001.dcp",
                                                                         "checkpoint-e000002.dcp"]
