"""Tests for orwcfm_fast.models: weight-preserving speed-ups of torchcfm UNets.

Every model-level check compares an optimized UNet with a deep copy of the UNMODIFIED torchcfm
model (same weights). The UNets are small random-init torchcfm models on CPU; the zero-initialised
convolutions (attention ``proj_out``, the output conv) are re-initialised and the GroupNorm affine
parameters randomised, otherwise attention would not reach the output and the test would be blind.

Tolerances:

* fp32, ``rtol = atol = 1e-5`` (outputs are O(1)). SDPA computes the same sums as the einsum code in
  another order (scale applied once to the logits instead of ``C**-0.25`` to q and k, fused/online
  softmax), so each attention output moves by a few fp32 ulp (~1e-7 relative, measured <= 5e-7 at
  module level); ~10 layers of O(1) gain downstream give the measured ~1e-6 at the output. 1e-5
  leaves ~10x margin, while a convention error (head split, q/k/v order, scale) moves outputs by
  O(0.1), see ``test_wrong_head_order_is_detected``. GroupNorm is bit-identical in fp32.
* fp64, ``atol = 1e-12``: the optimized model is an fp64 computation; it is compared with an fp64
  oracle (torchcfm's formulas without their fp32 downcasts, since torchcfm's own modules cannot run
  in fp64, see ``_exact_fp64_reference``).
* bf16 autocast: FlashAttention's rule, the optimized model's error against the fp32 reference is
  at most 2x the unmodified model's bf16 error.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchcfm")
from torchcfm.models.unet.nn import GroupNorm32  # noqa: E402
from torchcfm.models.unet.unet import (  # noqa: E402
    QKVAttention,
    QKVAttentionLegacy,
    UNetModelWrapper,
)

from orwcfm_fast.models import (  # noqa: E402
    FastGroupNorm32,
    SDPAQKVAttention,
    SDPAQKVAttentionLegacy,
    UNetReport,
    describe_unet,
    optimize_unet,
    sdpa_qkv_attention,
    to_channels_last,
    unwrap_model,
)

# name -> (UNetModelWrapper kwargs, batch size)
CONFIGS = {
    "legacy_8x8": dict(dim=(1, 8, 8), num_heads=2, num_head_channels=-1, attention_resolutions="4"),
    "new_order_8x8": dict(
        dim=(1, 8, 8),
        num_heads=2,
        num_head_channels=16,
        attention_resolutions="4",
        use_new_attention_order=True,
    ),
    "rgb_16x16": dict(dim=(3, 16, 16), num_heads=2, num_head_channels=-1, attention_resolutions="8"),
}
RTOL32 = ATOL32 = 1e-5

_MODELS: dict[str, nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models are tiny: intra-op threads only add OpenMP contention (10x slower on a busy
    # 2-core machine). Restored for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference(name: str) -> nn.Module:
    """A fresh deep copy of the unmodified random-init torchcfm UNet ``name`` (built once)."""
    if name not in _MODELS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sorted(CONFIGS).index(name))
            model = UNetModelWrapper(
                num_channels=32, num_res_blocks=1, channel_mult=(1, 2), dropout=0.0, **CONFIGS[name]
            )
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not m.weight.any():
                        m.reset_parameters()  # zero_module()'d convs: make attention matter
                    if isinstance(m, nn.GroupNorm):
                        m.weight.normal_(1.0, 0.2)
                        m.bias.normal_(0.0, 0.2)
        _MODELS[name] = model.eval()
    return copy.deepcopy(_MODELS[name])


def _inputs(name: str, batch: int = 4, dtype=torch.float32):
    c, h, w = CONFIGS[name]["dim"]
    g = torch.Generator().manual_seed(123)
    x = torch.randn(batch, c, h, w, generator=g).to(dtype)
    t = torch.rand(batch, generator=g).to(dtype)
    return t, x


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# fp64 oracles: torchcfm's formulas without the fp32 downcasts
# --------------------------------------------------------------------------------------


class _ExactQKVAttentionLegacy(QKVAttentionLegacy):
    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class _ExactQKVAttention(QKVAttention):
    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum(
            "bct,bcs->bts",
            (q * scale).reshape(bs * self.n_heads, ch, length),
            (k * scale).reshape(bs * self.n_heads, ch, length),
        ).softmax(dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


def _exact_fp64_reference(model: nn.Module) -> nn.Module:
    """``model`` in fp64 with torchcfm's fp32 casts removed (a test oracle, in place).

    torchcfm's modules cannot run fp64: ``GroupNorm32`` feeds fp32 input to fp64 parameters and the
    softmax runs in fp32 (``weight.float()``). The oracle uses the same formulas in fp64.
    """
    swap = {
        QKVAttentionLegacy: _ExactQKVAttentionLegacy,
        QKVAttention: _ExactQKVAttention,
        GroupNorm32: nn.GroupNorm,
    }
    for m in model.modules():
        if type(m) in swap:
            m.__class__ = swap[type(m)]
    return _to_fp64(model)


def _to_fp64(model: nn.Module) -> nn.Module:
    # torchcfm casts the input to `model.dtype` and its timestep_embedding always returns fp32.
    model.double()
    model.dtype = torch.float64
    model.time_embed.register_forward_pre_hook(lambda mod, args: (args[0].double(),))
    return model


# --------------------------------------------------------------------------------------
# SDPA attention modules
# --------------------------------------------------------------------------------------

ATTN_SHAPES = [(2, 32, 16), (4, 16, 64), (1, 64, 9), (3, 8, 1)]  # (heads, head channels, T)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "new_order"])
@pytest.mark.parametrize("heads,ch,length", ATTN_SHAPES)
def test_sdpa_attention_matches_torchcfm(legacy, heads, ch, length):
    ref_cls = QKVAttentionLegacy if legacy else QKVAttention
    oracle_cls = _ExactQKVAttentionLegacy if legacy else _ExactQKVAttention
    sdpa_cls = SDPAQKVAttentionLegacy if legacy else SDPAQKVAttention
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 3 * heads * ch, length, dtype=torch.float64, generator=g)
    out = sdpa_cls(heads)(qkv)
    assert out.shape == (3, heads * ch, length) and out.dtype == torch.float64
    # fp64: the same function to machine precision (any layout/scale mistake would be O(1))
    torch.testing.assert_close(out, oracle_cls(heads)(qkv), rtol=0, atol=1e-12)
    # fp32 against torchcfm's own module: only the summation order differs
    q32 = qkv.float()
    torch.testing.assert_close(sdpa_cls(heads)(q32), ref_cls(heads)(q32), rtol=1e-5, atol=1e-6)
    assert torch.equal(sdpa_qkv_attention(q32, heads, legacy=legacy), sdpa_cls(heads)(q32))


def test_sdpa_attention_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible"):
        SDPAQKVAttention(2)(torch.randn(1, 10, 4))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "new_order"])
def test_sdpa_attention_bf16_not_less_accurate(legacy):
    ref_cls = QKVAttentionLegacy if legacy else QKVAttention
    sdpa_cls = SDPAQKVAttentionLegacy if legacy else SDPAQKVAttention
    qkv = torch.randn(2, 3 * 4 * 32, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    exact = (_ExactQKVAttentionLegacy if legacy else _ExactQKVAttention)(4)(qkv.double())
    out = sdpa_cls(4)(qkv)
    assert out.dtype == torch.bfloat16
    err = (out.double() - exact).abs().max()
    err_ref = (ref_cls(4)(qkv).double() - exact).abs().max()
    assert err <= 2 * err_ref, (err, err_ref)


# --------------------------------------------------------------------------------------
# FastGroupNorm32
# --------------------------------------------------------------------------------------


def _norm_pair(groups=8, channels=32):
    ref = GroupNorm32(groups, channels)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(2))
        ref.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(3))
    fast = copy.deepcopy(ref)
    fast.__class__ = FastGroupNorm32
    return ref, fast


def _activation(dtype, channels_last=False):
    x = torch.randn(2, 32, 6, 5, generator=torch.Generator().manual_seed(4)) * 3 + 2
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _RecordFloat32Outputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that produce an fp32 tensor with at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.numel() >= self.numel:
                self.ops.append(str(func))
        return out


def test_fast_groupnorm_fp32_is_bit_identical():
    ref, fast = _norm_pair()
    for cl in (False, True):
        x = _activation(torch.float32, cl)
        assert torch.equal(fast(x), ref(x))
        x3 = x.reshape(2, 32, -1)  # the attention blocks normalise [N, C, T]
        assert torch.equal(fast(x3), ref(x3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fast_groupnorm_low_precision_matches_without_fp32_copy(dtype, autocast, channels_last):
    ref, fast = _norm_pair()
    x = _activation(dtype, channels_last)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        expected = ref(x)
        with _RecordFloat32Outputs(x.numel()) as rec:
            out = fast(x)
    assert out.dtype == dtype == expected.dtype and out.shape == x.shape
    assert rec.ops == []  # no activation-sized fp32 tensor was created
    # The same arithmetic (fp32 statistics and affine, one rounding): equal up to one ulp.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=0)
    exact = F.group_norm(x.double(), 8, ref.weight.double(), ref.bias.double(), ref.eps)
    assert (out.double() - exact).abs().max() <= (expected.double() - exact).abs().max() * 1.01


def test_fast_groupnorm_grads_match_low_precision():
    ref, fast = _norm_pair()
    x = _activation(torch.bfloat16).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    fast(x).backward(g)
    ref(xr).backward(g)
    torch.testing.assert_close(x.grad.float(), xr.grad.float(), rtol=2**-7, atol=1e-2)
    for p, pr in zip(fast.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-4, atol=1e-3)


def test_fast_groupnorm_other_devices_take_the_fp32_path():
    # Stand-in for CUDA (not in native_lowp_devices): GroupNorm32's exact computation.
    ref, fast = _norm_pair()
    fast.native_lowp_devices = frozenset()
    x = _activation(torch.bfloat16)
    assert torch.equal(fast(x), ref(x))


def test_fast_groupnorm_fp64_is_fp64():
    ref, fast = _norm_pair()
    x = _activation(torch.float64)
    exact = F.group_norm(x, 8, ref.weight.double(), ref.bias.double(), ref.eps)
    torch.testing.assert_close(fast(x), exact, rtol=0, atol=1e-13)
    fast.double()
    torch.testing.assert_close(fast(x), exact, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------
# optimize_unet on whole UNets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_optimize_unet_fp32_matches_and_keeps_weights(name):
    ref = _reference(name)
    model = _reference(name)
    params_before = {k: p for k, p in model.named_parameters()}
    state_before = _state(model)
    before = describe_unet(model)
    legacy = not CONFIGS[name].get("use_new_attention_order", False)
    assert before.einsum_attention_legacy + before.einsum_attention == 4
    assert (before.einsum_attention_legacy == 4) == legacy

    assert optimize_unet(model) is model
    after = describe_unet(model)
    assert (after.sdpa_attention_legacy, after.sdpa_attention) == ((4, 0) if legacy else (0, 4))
    assert after.einsum_attention_legacy == after.einsum_attention == after.groupnorm32 == 0
    assert after.fast_groupnorm == before.groupnorm32 > 0
    # weights: same keys, same values, same parameter objects; a checkpoint loads both ways
    state_after = model.state_dict()
    assert list(state_after) == list(state_before) == list(ref.state_dict())
    for k, v in state_before.items():
        assert torch.equal(state_after[k], v), k
    assert all(p is params_before[k] for k, p in model.named_parameters())
    ref.load_state_dict(state_after)
    model.load_state_dict(ref.state_dict())

    t, x = _inputs(name)
    with torch.no_grad():
        expected, out = ref(t, x), model(t, x)
    assert out.shape == x.shape and expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=RTOL32, atol=ATOL32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_optimize_unet_fp64_matches_exact_oracle(name):
    oracle = _exact_fp64_reference(_reference(name))
    model = _to_fp64(optimize_unet(_reference(name)))
    t, x = _inputs(name, dtype=torch.float64)
    with torch.no_grad():
        expected, out = oracle(t, x), model(t, x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_optimize_unet_bf16_autocast_error_at_most_twice_reference(name):
    ref = _reference(name)
    model = optimize_unet(_reference(name))
    t, x = _inputs(name)
    with torch.no_grad():
        truth = ref(t, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16, out_bf16 = ref(t, x), model(t, x)
    assert out_bf16.dtype == ref_bf16.dtype
    err = (out_bf16.float() - truth).abs().max()
    err_ref = (ref_bf16.float() - truth).abs().max()
    assert 0 < err <= 2 * err_ref, (err, err_ref)
    rel = (out_bf16.float() - truth).norm() / truth.norm()
    rel_ref = (ref_bf16.float() - truth).norm() / truth.norm()
    assert rel <= 2 * rel_ref, (rel, rel_ref)


@pytest.mark.parametrize("name", ["legacy_8x8", "new_order_8x8"])
def test_optimize_unet_use_fp16_model_error_at_most_twice_reference(name):
    # torchcfm's use_fp16 mode: fp16 convolutions and activations, fp32 norms and time MLP.
    truth_model = _reference(name)
    ref = _reference(name)
    ref.convert_to_fp16()
    ref.dtype = torch.float16
    model = optimize_unet(copy.deepcopy(ref))
    t, x = _inputs(name)
    with torch.no_grad():
        truth, expected, out = truth_model(t, x), ref(t, x), model(t, x)
    assert out.dtype == expected.dtype == torch.float32  # cast back to x's dtype at the end
    err, err_ref = (out - truth).abs().max(), (expected - truth).abs().max()
    assert 0 < err <= 2 * err_ref, (err, err_ref)


@pytest.mark.parametrize("name", ["legacy_8x8", "new_order_8x8"])
def test_optimize_unet_fp32_gradients_match(name):
    ref = _reference(name).train()
    model = optimize_unet(_reference(name)).train()
    t, x = _inputs(name)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for m, xi in zip((ref, model), xs):
        (m(t, xi) * w).sum().backward()
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for (k, p), pr in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-4, atol=1e-5 * scale, msg=k)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5 * xs[0].grad.abs().max())


def test_wrong_head_order_is_detected():
    # Negative control: the fp32 tolerance is tight enough to catch a layout mistake.
    ref = _reference("legacy_8x8")
    model = _reference("legacy_8x8")
    for m in model.modules():
        if type(m) is QKVAttentionLegacy:
            m.__class__ = SDPAQKVAttention  # the other channel layout
    t, x = _inputs("legacy_8x8")
    with torch.no_grad():
        assert (model(t, x) - ref(t, x)).abs().max() > 100 * ATOL32


@pytest.mark.parametrize("name", ["legacy_8x8", "rgb_16x16"])
def test_channels_last_same_outputs(name):
    ref = _reference(name)
    model = optimize_unet(_reference(name), channels_last=True)
    report = describe_unet(model)
    assert report.conv_weights_4d > 0 and report.channels_last == report.conv_weights_4d
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    t, x = _inputs(name)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref(t, x)
        out_cl, out = model(t, x_cl), model(t, x)
    torch.testing.assert_close(out_cl, expected, rtol=RTOL32, atol=ATOL32)
    torch.testing.assert_close(out, expected, rtol=RTOL32, atol=ATOL32)
    # the helper alone, on a wrapper
    other = nn.DataParallel(_reference(name))
    assert to_channels_last(other) is other
    assert describe_unet(other).channels_last == report.conv_weights_4d


def test_torch_compile_wrapped_model():
    torch._dynamo.reset()
    ref = _reference("legacy_8x8")
    compiled = torch.compile(_reference("legacy_8x8"), backend="aot_eager", fullgraph=True)
    assert optimize_unet(compiled) is compiled
    assert describe_unet(compiled).sdpa_attention_legacy == 4
    assert describe_unet(compiled._orig_mod) == describe_unet(compiled)
    t, x = _inputs("legacy_8x8")
    with torch.no_grad():
        expected = ref(t, x)
        torch.testing.assert_close(compiled(t, x), expected, rtol=RTOL32, atol=ATOL32)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast(enabled=False) inside traces
            assert compiled(t, x).dtype == torch.bfloat16


def test_optimize_after_compiled_run_recompiles():
    torch._dynamo.reset()
    eager = optimize_unet(_reference("legacy_8x8"))
    compiled = torch.compile(_reference("legacy_8x8"), backend="eager")
    t, x = _inputs("legacy_8x8")
    with torch.no_grad():
        before = compiled(t, x)  # traced with the einsum attention
        optimize_unet(compiled)
        after = compiled(t, x)  # Dynamo guards on module types: re-traced with SDPA
        assert torch.equal(after, eager(t, x))
        assert not torch.equal(after, before)


def test_wrappers_are_unwrapped():
    ref = _reference("new_order_8x8")
    inner = _reference("new_order_8x8")
    dp = nn.DataParallel(inner)
    wrapped = torch.compile(dp, backend="eager")
    assert unwrap_model(wrapped) is inner and unwrap_model(inner) is inner
    assert optimize_unet(wrapped) is wrapped
    assert describe_unet(inner).sdpa_attention == 4
    t, x = _inputs("new_order_8x8")
    with torch.no_grad():
        torch.testing.assert_close(dp(t, x), ref(t, x), rtol=RTOL32, atol=ATOL32)


def test_ddp_wrapped_model():
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised by another test")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = _reference("legacy_8x8")
        ddp = nn.parallel.DistributedDataParallel(inner)
        assert unwrap_model(ddp) is inner
        assert optimize_unet(ddp) is ddp
        assert describe_unet(inner).sdpa_attention_legacy == 4
        t, x = _inputs("legacy_8x8")
        ddp(t, x).sum().backward()
        assert all(p.grad is not None for p in inner.parameters())
    finally:
        dist.destroy_process_group()


def test_optimize_unet_is_idempotent():
    model = optimize_unet(_reference("legacy_8x8"), channels_last=True)
    report, state = describe_unet(model), _state(model)
    t, x = _inputs("legacy_8x8")
    with torch.no_grad():
        out = model(t, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert optimize_unet(model, channels_last=True) is model
            assert optimize_unet(model, sdpa=False, groupnorm=False) is model  # undoes nothing
        assert describe_unet(model) == report
        assert torch.equal(model(t, x), out)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_flags_select_swaps():
    only_attn = describe_unet(optimize_unet(_reference("legacy_8x8"), groupnorm=False))
    assert only_attn.sdpa_attention_legacy == 4 and only_attn.fast_groupnorm == 0
    assert only_attn.groupnorm32 > 0 and only_attn.channels_last < only_attn.conv_weights_4d
    only_norm = describe_unet(optimize_unet(_reference("legacy_8x8"), sdpa=False))
    assert only_norm.einsum_attention_legacy == 4 and only_norm.groupnorm32 == 0


def test_subclasses_are_left_alone():
    class MyAttention(QKVAttentionLegacy):
        pass

    model = _reference("legacy_8x8")
    first = next(m for m in model.modules() if type(m) is QKVAttentionLegacy)
    first.__class__ = MyAttention
    optimize_unet(model)
    assert type(first) is MyAttention
    assert describe_unet(model).sdpa_attention_legacy == 3


def test_non_unet_is_returned_unchanged_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU())
    state = _state(model)
    with pytest.warns(UserWarning, match="returning it unchanged"):
        assert optimize_unet(model, channels_last=True) is model
    assert [type(m) for m in model] == [nn.Conv2d, nn.GroupNorm, nn.SiLU]
    assert model[0].weight.is_contiguous()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert describe_unet(model) == UNetReport(conv_weights_4d=1, channels_last=0)
    assert not describe_unet(model).is_unet


def test_import_is_light():
    code = (
        "import sys, torch, orwcfm_fast.models as m; "
        "assert not any(k.startswith('torchcfm') for k in sys.modules), 'torchcfm imported'; "
        "assert not torch.cuda.is_initialized(); "
        "assert sorted(m.__all__) == sorted(set(m.__all__)); "
        "assert all(hasattr(m, n) for n in m.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
