"""``compile: True`` with LoRA roles: how many graphs dynamo compiles for one transformer, and no fallback.

The three LoRA roles (policy; last policy = a second peft adapter; reference = adapters disabled,
see :class:`~orwcfm_fast.flows.lora.LoraRoles`) are module state around one compiled transformer,
so a role switch can fail dynamo's guards. Measured on the tiny SD3.5 and Flux pipelines (torch
2.14, diffusers 0.42, peft 0.21), two epochs of ``train`` plus ``sample`` compile one frame (the
transformer's forward, no graph break) into 4 graphs, one per call site of the trainer:

=====  ======================================  ==========================================================
graph  call                                    guard that failed against the earlier graphs
=====  ======================================  ==========================================================
0/0    sampler: last policy, no grad, 2B       (first compile; static batch)
0/1    loss: policy, with grad, 2B (B unless   grad mode (and the batch where it differs: the batch dim
       ``cfg_mode`` is ``guided``)             turns dynamic)
0/2    loss: reference, no grad                grad mode; the last-policy LoRA weights' ``requires_grad``
                                               (peft's ``set_adapter`` turns it on for the active adapter)
0/3    ``sample()``: policy, no grad, eval     ``_disable_adapters``; grad mode; ``requires_grad`` as above
=====  ======================================  ==========================================================

What the bound counts: the distinct ``(adapter role, grad mode, transformer input shape)`` of the
transformer calls after the trainer is built (the role is the :class:`RoleVelocity`'s; grad mode is
in the key because a graph with autograd is a different graph, whatever the weights; the input
shape is the latents' shape as the transformer sees it, ``2B`` under CFG). At most one graph per
such key is the contract. The measured count is tighter: one graph per ``(role, grad mode)``,
because dynamo makes the batch dimension dynamic at its first size change (``B`` vs ``2B``, the
chunks of ``sample``); a batch of 1 is always specialised by dynamo, so a one-image chunk without
CFG adds one graph (still within the per-shape bound).

The no-grad roles (last policy, reference, policy in ``sample()``) are separate graphs because
the adapter state is in dynamo's guards; they could share one only with the role state out of
the guards (scalings held as tensors, weights swapped in place). A run far from
``torch._dynamo.config.recompile_limit`` (8) never falls back to eager; here the limit is made a
hard error, so a fallback fails the test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the text-to-image path needs the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image path needs the 'diffusers' extra")

from orwcfm_fast import ORWCFMTrainer  # noqa: E402
from orwcfm_fast.flows.pipeline_models import RoleVelocity  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE, tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PROMPTS = ["a dog", "a red cat", "a tree", "a blue car"]
PIPELINES = {"sd35": lambda: tiny_sd3_pipeline(sd35=True), "flux": tiny_flux_pipeline}


def reward(images, prompts):
    return images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))


def config(tmp_path, **overrides):
    cfg = {"prompts": PROMPTS, "reward": reward, "resolution": TINY_SIZE, "guidance_scale": 4.5,
           "ode_steps": 2, "lora_rank": 4, "batch_size": 4, "images_per_prompt": 2, "max_sequence_length": 16,
           "seed": 0, "warmup_steps": 0, "learning_rate": 1e-2, "savedir": str(tmp_path), "handle_signals": False,
           "compile": True, "compile_backend": "eager"}  # dynamo's guards and graphs do not depend on the backend
    cfg.update(overrides)
    return cfg


def compiled_run(pipe, tmp_path, monkeypatch, **overrides):
    """``train(2, 2)`` and ``sample(3)`` with a compiled transformer, then ``sample(4)`` and ``sample(5)``.

    Returns:
        ``(stats, calls, reasons, more)``: dynamo's counters after ``sample(3)`` (``graphs``,
        ``frames``, ``frames_ok``, ``graph_breaks``), the ``(role, grad mode, input shape)`` of every
        transformer call after the trainer is built up to then, the recompilation reasons dynamo gave
        (its first failed guard per earlier graph), and the graph count after the two further samples.
    """
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    active: list[str] = []
    calls: list[tuple[str, bool, tuple[int, ...]]] = []
    reasons: list[list[str]] = []

    real_forward = RoleVelocity.forward

    def forward(self, t, x, *cond):
        active.append(self.role)
        try:
            return real_forward(self, t, x, *cond)
        finally:
            active.pop()

    monkeypatch.setattr(RoleVelocity, "forward", forward)
    real_reasons = getattr(convert_frame, "get_and_maybe_log_recompilation_reasons", None)
    if real_reasons is not None:  # private, but the clearest failure message there is
        def record(*args, **kwargs):
            out = real_reasons(*args, **kwargs)
            reasons.append([r.splitlines()[0][:300] for r in out])
            return out

        monkeypatch.setattr(convert_frame, "get_and_maybe_log_recompilation_reasons", record)

    torch._dynamo.reset()
    counters.clear()
    try:
        # a fallback to eager (recompile limit hit) raises instead of running silently
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            trainer = ORWCFMTrainer(pipe, config(tmp_path, **overrides), "cpu")
            flow = trainer.models.flow
            real_call = flow._transformer_call

            def call(t, x, cond, transformer):  # the transformer's own input: 2B under CFG
                calls.append((active[-1] if active else "?", torch.is_grad_enabled(), tuple(x.shape)))
                return real_call(t, x, cond, transformer)

            monkeypatch.setattr(flow, "_transformer_call", call)
            history = trainer.train(2, 2)
            trainer.sample(3)
            first = len(calls)
            stats = {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
                     "frames_ok": counters["frames"]["ok"],
                     "graph_breaks": sum(counters["graph_break"].values()), "breaks": dict(counters["graph_break"])}
            trainer.sample(4)
            trainer.sample(5, batch_size=5)
            more = counters["stats"]["unique_graphs"]
        assert all(torch.isfinite(torch.tensor(h["total_loss"])) for h in history)
    finally:
        torch._dynamo.reset()
    return stats, calls[:first], reasons, more


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_role_switches_compile_at_most_one_graph_per_shape_and_role(family, tmp_path, monkeypatch):
    stats, calls, reasons, more = compiled_run(PIPELINES[family](), tmp_path, monkeypatch)
    keys = set(calls)  # (role, grad mode, transformer input shape)
    role_modes = {(role, grad) for role, grad, _ in calls}
    why = f"{stats}; calls {sorted(keys)}; recompile reasons {reasons}"
    # every role ran; gradients only through the policy
    assert {role for role, _ in role_modes} == {"policy", "last_policy", "reference"}, why
    assert {(role, grad) for role, grad in role_modes if grad} == {("policy", True)}, why
    # the contract: at most one graph per (role, grad mode, input shape)
    assert stats["graphs"] <= len(keys), why
    # measured, tighter: one per (role, grad mode): B vs 2B adds no graph (the batch dim turns dynamic)
    assert stats["graphs"] <= len(role_modes), why
    # one frame (the transformer's forward), whole: no graph break, nothing fell back to eager
    assert stats["graph_breaks"] == 0, why
    assert stats["frames"] == stats["frames_ok"] == stats["graphs"], why
    # other sample() chunk sizes (2 x 4, 2 x 5 under CFG) reuse the policy's sampling graph
    assert more == stats["graphs"], f"{more} graphs after sample(4), sample(5); {why}"
