"""Per-prompt evaluation of a trainer's current policy: reward (every configured term) and diversity.

:func:`evaluate_policy` is what :meth:`ORWCFMTrainer.evaluate` and ``orwcfm-fast eval`` run:

- for each prompt (held-out ``eval_prompts`` by default; one unconditional group for models without
  prompts) it draws ``samples_per_prompt`` samples from the current policy (EMA weights with
  ``ema_decay``, dropout off) from noise seeded by ``(seed, prompt index)``, so two evaluations of
  two models see the same noise whatever the world size;
- scores them with the trainer's reward (a reward dict: every term too, unweighted) and, with config
  ``eval_reward``, with that held-out reward too (``held_out_reward``; built once, at the first evaluation, cached
  as ``trainer._eval_reward_fn``, scored exactly as the training reward is; training never calls it);
- measures within-prompt diversity: the mean pairwise Euclidean distance
  (:func:`orwcfm_fast.metrics.mean_pairwise_distance`) between embeddings of the prompt's samples:
  the samples themselves (``"pixels"``; for pixel tasks the ORW-CFM-W2 paper's diversity measure),
  L2-normalised CLIP image embeddings (``"clip"``) or DINOv2 CLS embeddings (``"dino"``); for videos
  the per-video embedding is the whole video's pixels, or the mean of its frames' embeddings (:func:`embed_videos`),
  and an image reward scores every frame, reduced per video (config ``video_frame_reduction``); and the Vendi
  score of the same embeddings (:func:`orwcfm_fast.metrics.vendi_score`, cosine similarity);
- appends a summary to ``trainer.eval_history`` and sounds the reward-hacking alarm of :mod:`orwcfm_fast.hacking`
  (``hacking_alarm`` in the result; rank 0 warns with a :class:`~orwcfm_fast.hacking.RewardHackingWarning`);
- writes ``evaluation.json`` and one sample grid per prompt (a scatter plot for 2-D points; for videos one
  video a row, up to 8 evenly spaced frames), and, when the trainer keeps a run log, one row of ``eval/*``
  metrics at step ``trainer.epoch`` (:func:`log_evaluation`).

The trainer's random states are left exactly as they were (training continues bit-identically),
and under ``torch.distributed`` the prompts are shared out between the ranks and the results
gathered on every rank (rank 0 writes the files).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import warnings

import torch

__all__ = ["UNCONDITIONAL", "embed_videos", "eval_reward", "evaluate_policy", "log_evaluation", "make_embedding",
           "isolated_rng", "sample_grid", "save_samples_figure", "video_frames"]

#: the ``per_prompt`` key of a model without prompts
UNCONDITIONAL = "<unconditional>"


@contextlib.contextmanager
def isolated_rng(trainer, seed: int):
    """Within the block ``trainer.generator`` starts from ``seed``; on exit every random state the
    block could touch (the trainer's generators, torch's CPU and CUDA default generators) is restored."""
    saved = (trainer.generator.get_state(), trainer.cpu_generator.get_state(), torch.get_rng_state())
    cuda = trainer.device.type == "cuda"
    cuda_state = torch.cuda.get_rng_state(trainer.device) if cuda else None
    trainer.generator.manual_seed(int(seed))
    try:
        yield
    finally:
        trainer.generator.set_state(saved[0])
        trainer.cpu_generator.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda:
            torch.cuda.set_rng_state(cuda_state, trainer.device)


# ----------------------------------------------------------------------------- embeddings


class _PixelEmbedding:
    name = "pixels"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(images.shape[0], -1).to(torch.float64)


class _ModelEmbedding:
    """Image embeddings of a transformers vision model from a local folder (CLIP or DINOv2), batched."""

    def __init__(self, kind: str, path: str, device: torch.device, batch_size: int | None):
        from transformers import AutoImageProcessor

        from orwcfm_fast.rewards.preprocess import ImagePreprocess

        self.name, self.device, self.batch_size = kind, device, batch_size
        if kind == "clip":
            from transformers import CLIPModel

            self.model = CLIPModel.from_pretrained(path).to(device).eval()
        else:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(path).to(device).eval()
        # The folder's own image processor, reproduced on the device (no PIL round trip).
        self.preprocess = ImagePreprocess.from_hf_image_processor(AutoImageProcessor.from_pretrained(path)).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        step = self.batch_size or images.shape[0]
        for i in range(0, images.shape[0], step):
            pixels = self.preprocess(images[i:i + step].to(self.device, torch.float32))
            if self.name == "clip":
                features = self.model.get_image_features(pixel_values=pixels)
                features = getattr(features, "pooler_output", features)
            else:
                features = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # the CLS token
            out.append(torch.nn.functional.normalize(features.to(torch.float64), dim=-1))
        return torch.cat(out)


def embed_videos(embed: Callable[[torch.Tensor], torch.Tensor], videos: torch.Tensor) -> torch.Tensor:
    """Per-video embeddings ``[B, D]`` of videos ``[B, C, F, H, W]``: the pixel embedding flattens each whole video;
    an image model's embedding is the mean of the video's frame embeddings (each frame embedded as an image)."""
    if getattr(embed, "name", None) == "pixels":
        return embed(videos)
    b, c, f, h, w = videos.shape
    frames = embed(videos.transpose(1, 2).reshape(b * f, c, h, w))
    return frames.reshape(b, f, -1).mean(dim=1)


def video_frames(videos: torch.Tensor, max_frames: int = 8) -> tuple[torch.Tensor, int]:
    """``(images [B k, C, H, W], k)``: up to ``max_frames`` evenly spaced frames of each video ``[B, C, F, H, W]``
    (first and last included), video after video: a grid of ``k`` columns shows one video per row."""
    f = videos.shape[2]
    k = min(f, max_frames)
    index = torch.linspace(0, f - 1, k).round().long() if k > 1 else torch.zeros(1, dtype=torch.long)
    picked = videos.index_select(2, index.to(videos.device))
    return picked.transpose(1, 2).reshape(-1, *picked.shape[1:2], *picked.shape[3:]), k


def make_embedding(config: Mapping[str, Any], device, images_like: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The diversity embedding of config ``diversity_embedding``.

    Args:
        config: the trainer's validated config (``diversity_embedding``, ``reward_paths``, ``reward_batch_size``).
        device: where the embedding model runs.
        images_like: whether the reward inputs are ``[B, 3, H, W]`` images (a model embedding needs them).

    Returns:
        ``embed(images [N, ...]) -> [N, D]`` float64. ``.name`` says which embedding it is.

    Raises:
        ValueError: ``clip`` / ``dino`` without their folder in ``reward_paths`` (the message names the key), or
            for samples that are not RGB images.
    """
    kind = config["diversity_embedding"]
    paths = config["reward_paths"] or {}
    if kind == "auto":
        kind = "clip" if images_like and isinstance(paths.get("clip_score"), str) else "pixels"
    if kind == "pixels":
        return _PixelEmbedding()
    if not images_like:
        raise ValueError(f"config key 'diversity_embedding': {kind!r} embeds RGB images [N, 3, H, W]; "
                         "this model's samples are not (use 'pixels')")
    key = "clip_score" if kind == "clip" else "dino"
    path = paths.get("diversity_" + kind, paths.get(key))
    if not isinstance(path, str):
        raise ValueError(f"config key 'diversity_embedding': {kind!r} needs a local transformers folder in "
                         f"config key `reward_paths['{key}']` (or `reward_paths['diversity_{kind}']`)")
    if not Path(path).exists():
        raise ValueError(f"config key `reward_paths['{key}']`: {path!r} does not exist")
    return _ModelEmbedding(kind, path, torch.device(device), config["reward_batch_size"])


# ----------------------------------------------------------------------------- figures


def _slug(text: str, limit: int = 48) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return (slug[:limit] or "prompt")


def save_samples_figure(samples: torch.Tensor, path: str | os.PathLike, *, samples_range=(-1.0, 1.0),
                        title: str | None = None) -> Path:
    """A grid of ``[N, C, H, W]`` images (values in ``samples_range``), of videos ``[N, C, F, H, W]`` (one per row,
    up to 8 evenly spaced frames), or a scatter plot of ``[N, 2]`` points.

    Returns:
        the PNG's path.
    """
    from orwcfm_fast.tasks.plots import _new_figure, save_sample_grid

    path = Path(path)
    nrow = None
    if samples.dim() == 5:
        samples, nrow = video_frames(samples)
    if samples.dim() == 4:
        lo, hi = samples_range if samples_range is not None else (-1.0, 1.0)
        images = (samples.detach().float().cpu() - lo) / (hi - lo) * 2 - 1
        nrow = nrow or max(1, math.ceil(math.sqrt(samples.shape[0])))
        scale = max(1, 128 // max(samples.shape[-1], 1))
        return save_sample_grid(images, path, nrow=nrow, title=title, scale=scale)
    points = samples.detach().float().cpu().reshape(samples.shape[0], -1)
    if points.shape[1] != 2:
        raise ValueError(f"save_samples_figure: expected images [N, C, H, W] or 2-D points [N, 2], "
                         f"got {tuple(samples.shape)}")
    fig = _new_figure((4.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=4, alpha=0.6)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


@torch.no_grad()
def sample_grid(trainer, n: int, seed: int = 0) -> torch.Tensor | None:
    """``n`` samples of the current policy tiled into one image ``[C, H', W']`` in [0, 1], from fixed noise
    (the eval prompts, else the training prompts, cycled); None for samples that are not images.
    The trainer's random states are left as they were."""
    from orwcfm_fast.tasks.plots import make_grid

    if len(trainer.sample_shape) != 3 and trainer.prompts is None:
        return None
    prompts = None
    if trainer.prompts is not None:
        pool = trainer.eval_prompts or trainer.prompts
        prompts = [pool[i % len(pool)] for i in range(n)]
    with isolated_rng(trainer, seed):
        samples = trainer.sample(n, batch_size=min(n, trainer.batch_size), prompts=prompts)
    images = trainer.models.reward_inputs(samples).detach().float().cpu()
    lo, hi = trainer.models.reward_inputs_range or (-1.0, 1.0)
    images = ((images - lo) / (hi - lo)).clamp(0.0, 1.0)
    if images.dim() == 5:  # videos: one per row, a few frames each
        images, per_row = video_frames(images)
        return make_grid(images, nrow=per_row, pad_value=0.0)
    return make_grid(images, nrow=max(1, math.ceil(math.sqrt(n))), pad_value=0.0)


# ----------------------------------------------------------------------------- the evaluation


def _check_prompts(trainer, prompts) -> list[str | None]:
    if trainer.prompts is None:
        if prompts is not None:
            raise ValueError("evaluate(prompts=...): this model takes no prompts")
        return [None]
    if prompts is None:
        prompts = trainer.eval_prompts or trainer.prompts
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"evaluate(prompts=...): expected a non-empty list of strings, got {prompts!r}")
    return list(dict.fromkeys(prompts))  # each prompt once, in order


_UNBUILT = object()  # trainer._eval_reward_fn before the first evaluation


def eval_reward(trainer):
    """The held-out reward of config ``eval_reward`` (None when unset): built with
    :func:`~orwcfm_fast.rewards.make_reward` at the first call and cached on the trainer as ``_eval_reward_fn``.

    Raises:
        ConfigError: the reward cannot be built (the message names ``eval_reward``).
    """
    cached = getattr(trainer, "_eval_reward_fn", _UNBUILT)
    if cached is not _UNBUILT:
        return cached
    from orwcfm_fast.config import ConfigError
    from orwcfm_fast.rewards import make_reward

    spec = trainer.config["eval_reward"]
    try:
        reward = None if spec is None else make_reward(spec, trainer.config, trainer.device)
    except ValueError as err:
        raise ConfigError(f"config key 'eval_reward': {err}") from err
    setattr(trainer, "_eval_reward_fn", reward)
    return reward


def _score(trainer, reward, images: torch.Tensor, prompts, name: str) -> dict[str, float]:
    """``{name, name_std, name/<term>...}``: the means (and spread) of ``reward`` on ``images``, scored as the
    trainer scores its training reward (:func:`~orwcfm_fast.rewards.score_terms`)."""
    from orwcfm_fast.rewards import score_terms

    total, terms = score_terms(reward, images, prompts, trainer.models.reward_inputs_range,
                               trainer.models.reward_frame_reduction)
    row = {name: float(total.mean()), f"{name}_std": float(total.std()) if total.shape[0] > 1 else 0.0}
    for term, values in terms.items():
        row[f"{name}/{term}"] = float(values.mean())
    return row


def _evaluate_prompt(trainer, index: int, prompt: str | None, n: int, seed: int, embed, keep: int, held_out):
    from orwcfm_fast.metrics import mean_pairwise_distance, vendi_score

    with isolated_rng(trainer, seed + 1_000_003 * index):
        samples = trainer.sample(n, batch_size=min(n, trainer.batch_size),
                                 prompts=None if prompt is None else [prompt] * n)
    prompts = None if prompt is None else [prompt] * n
    with torch.no_grad():
        images = trainer.models.reward_inputs(samples)
        row = _score(trainer, trainer.reward_fn, images, prompts, "reward")
        if held_out is not None:
            row.update(_score(trainer, held_out, images, prompts, "held_out_reward"))
        features = embed_videos(embed, images) if images.dim() == 5 else embed(images)
    row["diversity"] = mean_pairwise_distance(features)
    row["vendi"] = vendi_score(features)
    return row, images[:keep].detach().cpu()


def _sound_alarm(trainer, out: dict[str, Any]) -> None:
    """Appends ``out``'s summary to ``trainer.eval_history`` (every rank: the gathered results are the same) and
    sets ``out``'s ``hacking_alarm`` / ``hacking_signals`` / ``hacking_message``; rank 0 warns."""
    from orwcfm_fast import distributed
    from orwcfm_fast.hacking import RewardHackingWarning, check_hacking, evaluation_summary

    trainer.eval_history.append(evaluation_summary(out, trainer.epoch, trainer.global_step))
    alarm = check_hacking(trainer.eval_history, trainer.config["hacking_window"])
    # the temperature is a knob only of the objectives that weight samples by exp(temperature * r)
    temperature = trainer.config["temperature"] if trainer.objective.uses_reward_weights else None
    message = None if alarm is None else alarm.message(trainer.config["w2_coefficient"], temperature,
                                                       temperature_applies=trainer.objective.uses_reward_weights)
    out.update(hacking_alarm=alarm is not None, hacking_signals=[] if alarm is None else alarm.signals,
               hacking_message=message)
    if message is not None and distributed.is_main_process():
        warnings.warn(message, RewardHackingWarning, stacklevel=4)


def log_evaluation(log, out: Mapping[str, Any], step: int) -> None:
    """One row of ``eval/reward``, ``eval/held_out_reward`` (when configured), ``eval/diversity``, ``eval/vendi``
    and ``eval/hacking_alarm`` (0 / 1) at ``step`` to the run log ``log`` (an :class:`~orwcfm_fast.run_log.EpochLog`):
    wandb and TensorBoard as its epoch metrics, and ``<run_name>_eval.csv`` beside its ``<run_name>_metrics.csv``.

    The epoch CSV's header is its first row's keys (later keys are dropped), so evaluation rows get a CSV of their
    own (the log's ``table="eval"``).
    """
    metrics = {"eval/reward": out["reward"], "eval/held_out_reward": out.get("held_out_reward"),
               "eval/diversity": out["diversity"], "eval/vendi": out["vendi"],
               "eval/hacking_alarm": int(bool(out["hacking_alarm"]))}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    log.log(metrics, step=step, table="eval")


def evaluate_policy(trainer, prompts: Sequence[str] | None = None, samples_per_prompt: int | None = None, *,
                    outdir: str | os.PathLike | None = None, seed: int = 0, grid_samples: int = 16,
                    embedding: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Evaluate ``trainer``'s current policy; see the module docstring.

    Args:
        trainer: an :class:`~orwcfm_fast.ORWCFMTrainer`.
        prompts: the prompts (default: config ``eval_prompts``, else the training prompts); must be None for
            models without prompts.
        samples_per_prompt: samples per prompt (default: config ``eval_samples_per_prompt``), >= 2.
        outdir: where ``evaluation.json`` and ``grids/`` go (None: nothing is written).
        seed: the evaluation noise's seed.
        grid_samples: samples per prompt in its grid.
        embedding: ``embed(images [N, ...]) -> [N, D]`` overriding config ``diversity_embedding``.

    Returns:
        ``{"reward", "held_out_reward"`` (None without config ``eval_reward``), ``"diversity", "vendi"`` (means over
        prompts), ``"reward/<term>"``, ``"held_out_reward/<term>"`` (reward dicts), ``"per_prompt": {prompt:
        {"reward", "reward_std", "diversity", "vendi", "reward/<term>"..., and with a held-out reward
        "held_out_reward", "held_out_reward_std", "held_out_reward/<term>"...}}, "prompts", "samples_per_prompt",
        "embedding", "epoch", "global_step", "seed", "forwards"`` (this rank's model passes of the evaluation,
        :mod:`orwcfm_fast.compute`), ``"training_forwards_total"`` (the run's training passes so far),
        ``"hacking_alarm"`` (bool), ``"hacking_signals"`` (the keys
        that fell: ``"held_out_reward"``, ``"diversity"``), ``"hacking_message"`` (the warning's text or None),
        ``"files"}``. Also appends the evaluation's summary to ``trainer.eval_history``.

    Raises:
        ValueError: bad ``prompts`` / ``samples_per_prompt``; ``ConfigError`` when config ``eval_reward`` cannot be
            built.
    """
    from orwcfm_fast import distributed

    n = trainer.config["eval_samples_per_prompt"] if samples_per_prompt is None else samples_per_prompt
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"evaluate(samples_per_prompt=...): need an integer >= 2 (diversity compares pairs), got {n!r}")
    groups = _check_prompts(trainer, prompts)
    images_like = trainer.prompts is not None or (len(trainer.sample_shape) == 3 and trainer.sample_shape[0] == 3)
    embed = embedding if embedding is not None else make_embedding(trainer.config, trainer.device, images_like)
    held_out = eval_reward(trainer)
    rank, world = distributed.rank(), distributed.world_size()
    keep = grid_samples if outdir is not None else 0
    passes_before = trainer.compute.evaluation
    mine = {}
    for i, prompt in enumerate(groups):
        if i % world == rank:
            mine[i] = _evaluate_prompt(trainer, i, prompt, n, seed, embed, keep, held_out)
    if trainer.models.sharded:
        # a sharded model's forwards are collectives (FSDP gathers each block from every rank): a rank given one
        # prompt fewer samples once more, the same number of passes, and discards it (counted in its forwards)
        for _ in range(-(-len(groups) // world) - len(mine)):
            with isolated_rng(trainer, seed):
                trainer.sample(n, batch_size=min(n, trainer.batch_size),
                               prompts=None if groups[0] is None else [groups[0]] * n)
    results = dict(mine)
    if distributed.is_distributed():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, {i: (row, None) for i, (row, _) in mine.items()})
        for part in gathered:
            for i, value in part.items():
                results.setdefault(i, value)
    labels = [UNCONDITIONAL if p is None else p for p in groups]
    per_prompt = {labels[i]: results[i][0] for i in range(len(groups))}

    def mean(key: str) -> float:
        return sum(r[key] for r in per_prompt.values()) / len(per_prompt)

    out: dict[str, Any] = {"reward": mean("reward"),
                           "held_out_reward": None if held_out is None else mean("held_out_reward"),
                           "diversity": mean("diversity"), "vendi": mean("vendi")}
    for key in next(iter(per_prompt.values())):
        if key.startswith(("reward/", "held_out_reward/")):
            out[key] = mean(key)
    out.update(per_prompt=per_prompt, prompts=labels, samples_per_prompt=n, embedding=getattr(embed, "name", "custom"),
               epoch=trainer.epoch, global_step=trainer.global_step, seed=seed, files={},
               forwards=trainer.compute.evaluation - passes_before,
               training_forwards_total=trainer.compute.forwards_total)
    _sound_alarm(trainer, out)
    if outdir is not None:
        outdir = Path(outdir)
        # Every rank writes the grids of its own prompts; rank 0 the JSON.
        for i, (row, images) in mine.items():
            path = outdir / "grids" / f"{i:03d}_{_slug(labels[i])}.png"
            save_samples_figure(images, path, samples_range=trainer.models.reward_inputs_range,
                                title=f"{labels[i]}: reward {row['reward']:.3f}, diversity {row['diversity']:.3f}")
        out["files"] = {labels[i]: str(outdir / "grids" / f"{i:03d}_{_slug(labels[i])}.png")
                        for i in range(len(groups))}
        if distributed.is_main_process():
            outdir.mkdir(parents=True, exist_ok=True)
            tmp = outdir / ".evaluation.json.tmp"
            tmp.write_text(json.dumps(out, indent=2) + "\n")
            os.replace(tmp, outdir / "evaluation.json")
            out["files"]["json"] = str(outdir / "evaluation.json")
        log = trainer._epoch_log()  # None on ranks other than 0
        if log is not None:
            log_evaluation(log, out, step=trainer.epoch)
    return out
