"""Prompt encoding at scale (orwcfm_fast.flows.diffusers_base): chunked text-encoder batches, the
embedding cache in host memory, its optional LRU bound, and the trainer's two modes.

Tiny random-init SD3 and Flux pipelines (orwcfm_fast.flows.tiny) built in-process. This machine has
no accelerator, so "on the device" is checked two ways: a tensor subclass stands in for the text
encoders' outputs on an accelerator (only ``.to("cpu")`` turns it into a plain CPU tensor), and the
flow's device is set to ``meta`` to see which tensors are moved there. The real CUDA path (pinned
staging, non-blocking copies) is checked by one test that skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers", reason="the text-to-image flows need the 'diffusers' extra")
pytest.importorskip("peft", reason="the text-to-image flows need the 'diffusers' extra")

from orwcfm_fast.flows.flux import FluxFlow  # noqa: E402
from orwcfm_fast.flows.sd3 import SD3Flow  # noqa: E402
from orwcfm_fast.flows.tiny import TINY_SIZE, tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402

SEQ = 16  # max_sequence_length: T5 tokens
# 5 distinct prompts, duplicates, not in sorted order
PROMPTS = ["a dog", "zebra", "a red cat", "a dog", "two birds", "a red cat", "an owl", "a dog"]
DISTINCT = sorted(set(PROMPTS))

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

BUILD = {"sd3": (tiny_sd3_pipeline, SD3Flow), "flux": (tiny_flux_pipeline, FluxFlow)}


def make(family, dtype=torch.float32, **kwargs):
    build, cls = BUILD[family]
    pipe = build()
    if dtype != torch.float32:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(dtype)
    return pipe, cls(pipe, resolution=TINY_SIZE, max_sequence_length=SEQ, **kwargs)


def reference(pipe, family, prompts):
    """One unchunked call of the pipeline's own encode_prompt: (prompt_embeds, pooled)."""
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=SEQ)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=SEQ)
    return embeds, pooled


def record_encoder_batches(pipe):
    """``{encoder name: [batch size of each forward]}``, filled by forward pre-hooks."""
    seen = {}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, name, None)
        if enc is None:
            continue
        seen[name] = []

        def hook(module, args, kwargs, sizes=seen[name]):
            ids = args[0] if args else kwargs["input_ids"]
            sizes.append(ids.shape[0])

        enc.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


class OnAccelerator(torch.Tensor):
    """Stand-in for a tensor on an accelerator: ops keep the type; only ``.to("cpu")`` / ``.cpu()`` give a CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                return args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs)


def outputs_on_accelerator(flow):
    original = flow._encode_prompts
    flow._encode_prompts = lambda prompts: tuple(e.as_subclass(OnAccelerator) for e in original(prompts))


class RecordMeta(TorchFunctionMode):
    """Records the shape of every tensor an op puts on the ``meta`` device."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "meta":
            self.shapes.append(tuple(out.shape))
        return out


# ----------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_encoders_never_see_more_than_the_chunk(family):
    pipe, flow = make(family, text_encoder_batch_size=2)
    seen = record_encoder_batches(pipe)
    flow.precompute(PROMPTS)  # 5 distinct prompts: chunks of 2, 2, 1
    assert seen and all(sizes == [2, 2, 1] for sizes in seen.values()), seen
    assert sorted(flow._cache) == DISTINCT
    for sizes in seen.values():
        sizes.clear()
    flow.encode(["new one", "a dog", "new two", "new three", "zebra"])  # 3 missing: 2 + 1
    assert all(sizes == [2, 1] for sizes in seen.values()), seen
    for sizes in seen.values():
        sizes.clear()
    flow.encode(PROMPTS)  # all cached: no encoder call
    assert all(sizes == [] for sizes in seen.values()), seen


def test_unbounded_chunk_and_bad_values():
    pipe, flow = make("sd3", text_encoder_batch_size=None)
    seen = record_encoder_batches(pipe)
    flow.precompute(PROMPTS)
    assert all(sizes == [5] for sizes in seen.values()), seen
    for key in ("text_encoder_batch_size", "prompt_cache_size"):
        with pytest.raises(ValueError, match=key):
            make("sd3", **{key: 0})


# ----------------------------------------------------------------------------- where the cache lives


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cache_lives_on_the_cpu_in_the_encoders_dtype(family):
    pipe, flow = make(family, dtype=torch.bfloat16, text_encoder_batch_size=2, guidance_scale=1.0)
    outputs_on_accelerator(flow)  # the encoders' outputs are "on the accelerator"
    embeds, pooled = flow.encode(PROMPTS)
    assert sorted(flow._cache) == DISTINCT
    for rows in flow._cache.values():
        assert len(rows) == 2
        for t in rows:
            assert type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.bfloat16
    want_embeds, want_pooled = reference(pipe, family, DISTINCT[:1])
    assert flow._cache[DISTINCT[0]][0].shape == want_embeds.shape[1:]
    assert flow._cache[DISTINCT[0]][1].shape == want_pooled.shape[1:]
    assert want_embeds.dtype == torch.bfloat16  # the encoders' output dtype, kept as is
    assert embeds.dtype == pooled.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_precompute_moves_nothing_to_the_device(family):
    pipe, flow = make(family, text_encoder_batch_size=2)
    flow.release_text_encoders()  # the text encoders run on the CPU,
    flow.device = torch.device("meta")  # the "training device" is meta
    with RecordMeta() as moved:
        flow.precompute(PROMPTS)
    assert moved.shapes == []  # the old precompute built every prompt's rows on the device at once
    assert all(t.device.type == "cpu" for rows in flow._cache.values() for t in rows)
    with RecordMeta() as moved:
        embeds, pooled = flow.encode(PROMPTS[:3])
    assert embeds.device.type == pooled.device.type == "meta"
    assert embeds.shape[0] == pooled.shape[0] == 3
    assert sorted(moved.shapes) == sorted([tuple(embeds.shape), tuple(pooled.shape)])  # this batch's rows only


def test_negative_prompt_row_stays_on_the_device_outside_the_cache():
    pipe, flow = make("sd3", guidance_scale=4.5, negative_prompt="blurry", prompt_cache_size=1)
    flow.release_text_encoders()
    flow.device = torch.device("meta")
    flow.precompute(["a dog"])
    assert all(t.device.type == "meta" and t.shape[0] == 1 for t in flow._negative)
    assert "blurry" not in flow._cache
    flow.device = torch.device("cpu")
    flow._negative = None
    neg = flow._negative_cond(3)
    want_embeds, want_pooled = reference(pipe, "sd3", ["blurry"])
    # the same batch of one: equal up to float32 rounding (CPU matmul paths vary with alignment)
    torch.testing.assert_close(neg[0], want_embeds.expand(3, -1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(neg[1], want_pooled.expand(3, -1), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- values and order


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_encode_equals_one_unchunked_encode_prompt_in_order(family):
    pipe, flow = make(family, text_encoder_batch_size=2)
    embeds, pooled = flow.encode(PROMPTS)
    want_embeds, want_pooled = reference(pipe, family, PROMPTS)  # one call, duplicates included
    assert embeds.shape == want_embeds.shape and pooled.shape == want_pooled.shape
    assert embeds.device == pooled.device == flow.device
    # chunks of 2 against one batch of 8: equal up to float32 rounding of batched matmuls
    torch.testing.assert_close(embeds, want_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-6)
    for i, p in enumerate(PROMPTS):  # each row is its prompt's cached row, duplicates identical
        assert torch.equal(embeds[i], flow._cache[p][0]) and torch.equal(pooled[i], flow._cache[p][1])
    assert not torch.equal(embeds[0], embeds[1])
    # a second call (all cached) gives the same tensors, in the new order
    again = flow.encode(PROMPTS[::-1])
    assert torch.equal(again[0], embeds.flip(0)) and torch.equal(again[1], pooled.flip(0))


def test_returned_rows_do_not_alias_the_cache():
    _, flow = make("sd3", text_encoder_batch_size=2)
    embeds, _ = flow.encode(PROMPTS[:2])
    kept = flow._cache[PROMPTS[0]][0].clone()
    embeds.zero_()
    assert torch.equal(flow._cache[PROMPTS[0]][0], kept)


# ----------------------------------------------------------------------------- the LRU bound


def test_bounded_cache_drops_the_least_recently_used():
    pipe, flow = make("sd3", text_encoder_batch_size=2, prompt_cache_size=2)
    _, full = make("sd3", text_encoder_batch_size=2)
    seen = record_encoder_batches(pipe)
    # more distinct prompts in one batch than the cache holds: every row still comes out right
    embeds, pooled = flow.encode(PROMPTS)
    want_embeds, want_pooled = full.encode(PROMPTS)
    assert torch.equal(embeds, want_embeds) and torch.equal(pooled, want_pooled)
    assert list(flow._cache) == ["two birds", "zebra"]  # the last two encoded (sorted within the batch)
    for rows in flow._cache.values():  # own storage: dropping a row frees its memory
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in rows)
    for sizes in seen.values():
        sizes.clear()
    flow.encode(["two birds"])  # a hit: no encoder call, and "two birds" becomes the most recent
    assert all(sizes == [] for sizes in seen.values())
    flow.encode(["a dog"])  # a miss: encoded again; drops "zebra", the least recently used
    assert all(sizes == [1] for sizes in seen.values())
    assert list(flow._cache) == ["two birds", "a dog"]
    assert torch.equal(flow.encode(["a dog"])[0], want_embeds[:1])


# ----------------------------------------------------------------------------- the trainer's two modes


def test_trainer_precomputes_or_encodes_on_demand(tmp_path):
    from orwcfm_fast import ORWCFMTrainer

    prompts = ["a dog", "a red cat", "a tree", "a blue car"]
    cfg = {"prompts": prompts, "reward": lambda images, prompts: images.mean((1, 2, 3)), "resolution": TINY_SIZE,
           "ode_steps": 2, "lora_rank": 4, "batch_size": 2, "max_sequence_length": SEQ, "seed": 0,
           "savedir": str(tmp_path), "handle_signals": False, "text_encoder_batch_size": 3}
    pipe = tiny_sd3_pipeline()
    seen = record_encoder_batches(pipe)
    trainer = ORWCFMTrainer(pipe, cfg, "cpu")
    flow = trainer.models.flow
    assert flow.text_encoder_batch_size == 3 and sorted(flow._cache) == sorted(prompts)
    assert seen["text_encoder_3"][:2] == [3, 1]  # the four prompts in chunks of 3
    assert getattr(flow, "_text_device", None) == torch.device("cpu")  # released

    pipe = tiny_sd3_pipeline()
    trainer = ORWCFMTrainer(pipe, dict(cfg, prompt_cache_size=2), "cpu")
    flow = trainer.models.flow
    assert flow.prompt_cache_size == 2 and len(flow._cache) <= 2  # nothing precomputed beyond what was used
    assert not hasattr(flow, "_text_device")  # the text encoders stay on the training device
    trainer.sample(2)
    assert len(flow._cache) <= 2


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cuda_rows_from_a_host_cache(family):
    pipe, flow = make(family, text_encoder_batch_size=2, device="cuda")
    pipe.to("cuda")
    embeds, pooled = flow.encode(PROMPTS)
    assert embeds.device.type == pooled.device.type == "cuda"
    assert all(t.device.type == "cpu" and not t.is_pinned() for rows in flow._cache.values() for t in rows)
    want_embeds, want_pooled = reference(pipe, family, PROMPTS)
    torch.testing.assert_close(embeds, want_embeds, rtol=1e-4, atol=1e-5)  # TF32 / kernel choice on the GPU
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-4, atol=1e-5)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(embeds[i].cpu(), flow._cache[p][0])
