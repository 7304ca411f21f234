"""One transformer, three roles: the trained policy, the sampling policy and the frozen reference.

ORW-CFM-W2 needs three velocity fields: ``net_model`` (trained), ``last_policy`` (samples the
epoch's data, refreshed once an epoch) and ``ref_model`` (the pretrained model the W2 term
pulls toward). With LoRA they are one transformer in memory:

- policy: the adapter :data:`POLICY`, the only parameters the optimiser sees (kept in float32
  whatever the base's dtype);
- last policy: a second adapter :data:`LAST_POLICY`, refreshed by an in-place copy of the
  policy's LoRA weights (:meth:`LoraRoles.update_last_policy`);
- reference: the same transformer with adapters disabled, exactly the base weights.

Both adapters start from the same weights with LoRA's ``B = 0``, so at the start all three
roles give the base model's output exactly and the W2 term is exactly zero; base weights
never change (peft freezes them). peft keeps the active adapter as state on the modules, and
``set_adapter``/``disable_adapters`` also flip ``requires_grad``: :meth:`LoraRoles.role` is the
one helper that switches it, and it always puts the policy back (active, trainable).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch

__all__ = ["DEFAULT_TARGET_MODULES", "LAST_POLICY", "POLICY", "LoraRoles"]

POLICY = "orwcfm_policy"
LAST_POLICY = "orwcfm_last_policy"

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""The attention projections the peers adapt (SD3/SD3.5's ``attn2`` and Flux's single blocks
are matched by the same suffixes)."""

ROLES = ("policy", "last_policy", "reference")


def _local(tensors):
    from orwcfm_fast.distributed import local_tensors

    return local_tensors(tensors)


class LoraRoles:
    """The policy / last-policy / reference roles of one peft-adapted diffusers transformer.

    Args:
        transformer: a diffusers model with peft support (``add_adapter``); adapted in place.
        rank: LoRA rank ``r``.
        alpha: LoRA ``lora_alpha`` (default ``rank``: scale 1).
        target_modules: module name suffixes to adapt.
        seed: seed of the adapters' ``A`` initialisation (``B`` starts at zero).

    Raises:
        ValueError: no module of the transformer matches ``target_modules``.
    """

    def __init__(self, transformer: torch.nn.Module, rank: int, alpha: float | None = None,
                 target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, seed: int = 0):
        from peft import LoraConfig

        self.transformer = transformer
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.target_modules = tuple(target_modules)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                            init_lora_weights=True)
        # peft draws the adapters' initial weights from the global generator of the device it builds
        # them on (the CPU, before it moves them to the base layer's device): seed that generator alone
        # (torch.manual_seed would reseed every CUDA generator too, outside what the fork restores), and
        # fork the CUDA generators as well where CUDA is initialised: building the roles leaves every
        # global generator as it found it.
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.random.default_generator.manual_seed(seed)
            try:
                transformer.add_adapter(config, adapter_name=POLICY)
            except ValueError as err:
                raise ValueError(f"lora_target_modules {list(self.target_modules)} match no module of "
                                 f"{type(transformer).__name__}: {err}") from None
            with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the design
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                transformer.add_adapter(config, adapter_name=LAST_POLICY)  # overwritten by the policy below
        self._policy, self._last = self._adapter_pairs()
        if not self._policy:
            raise ValueError(f"lora_target_modules {list(self.target_modules)} match no module of "
                             f"{type(transformer).__name__}")
        for p in self._policy + self._last:  # fp32 adapters on a bf16/fp16 base (peft casts the inputs)
            p.data = p.data.float()
        self.update_last_policy()
        transformer.set_adapter(POLICY)
        from peft.tuners.tuners_utils import BaseTunerLayer

        # The adapted layers, found once: switching roles touches only them (peft's per-layer
        # set_adapter / enable_adapters, which is what the model-level calls do after a walk of
        # every module of the transformer).
        self._layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]

    def _adapter_pairs(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        params = dict(self.transformer.named_parameters())
        policy, last = [], []
        for name, p in params.items():
            if f".{POLICY}." in name:
                policy.append(p)
                last.append(params[name.replace(f".{POLICY}.", f".{LAST_POLICY}.")])
        return policy, last

    def refresh_parameters(self) -> None:
        """Collect the adapters' parameters again, after something replaced the transformer's parameter
        objects (FSDP2's ``fully_shard`` turns them into ``DTensor`` parameters, the modules staying the same)."""
        self._policy, self._last = self._adapter_pairs()

    def named_adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Both adapters' parameters by their names in the transformer (sharded checkpoints key them so)."""
        return {name: p for name, p in self.transformer.named_parameters()
                if f".{POLICY}." in name or f".{LAST_POLICY}." in name}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy adapter's LoRA weights (the optimiser's parameters), in a fixed order."""
        return list(self._policy)

    def last_policy_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._last)

    @torch.no_grad()
    def update_last_policy(self, decay: float = 0.0) -> None:
        """The last-policy adapter becomes ``decay * last + (1 - decay) * policy``, in place (``0``: a copy)."""
        # sharded (FSDP) adapters shard by shard: the two adapters of a layer are sharded alike
        last, policy = _local(self._last), _local(self._policy)
        if decay == 0.0:
            torch._foreach_copy_(last, policy)
        else:
            torch._foreach_lerp_(last, policy, 1.0 - decay)

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        """The transformer as ``"policy"``, ``"last_policy"`` or ``"reference"`` (adapters off) for the block.

        Afterwards the policy adapter is active and trainable again, whatever the block did.
        """
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r}; one of {ROLES}")
        if name == "policy":  # the resting state: nothing to switch
            yield
            return
        try:
            for layer in self._layers:
                if name == "reference":
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter(LAST_POLICY)
            yield
        finally:
            for layer in self._layers:
                if name == "reference":
                    layer.enable_adapters(True)  # re-activates (and makes trainable) the active adapter
                layer.set_adapter(POLICY)

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy adapter's weights in diffusers' LoRA format (what ``save_lora_weights`` writes)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer, adapter_name=POLICY)

    def policy_adapter_metadata(self) -> dict:
        """The policy adapter's ``LoraConfig`` as a dict: the adapter metadata diffusers' LoRA loader reads.

        Without it ``load_lora_weights`` takes ``lora_alpha = r`` and an adapter trained with another
        alpha loads at the wrong scale (``save_lora_weights(..., transformer_lora_adapter_metadata=...)``).
        """
        return self.transformer.peft_config[POLICY].to_dict()

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """Both adapters' weights (checkpoints; the base weights are not included)."""
        return {"policy": [p.detach().clone() for p in self._policy],
                "last_policy": [p.detach().clone() for p in self._last]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Sequence[torch.Tensor]]) -> None:
        """Restore :meth:`state_dict`'s weights in place; shapes are checked before anything is copied."""
        for key, params in (("policy", self._policy), ("last_policy", self._last)):
            saved = state.get(key)
            if saved is None or len(saved) != len(params):
                raise ValueError(f"LoRA state {key!r}: expected {len(params)} tensors, got "
                                 f"{None if saved is None else len(saved)} (another lora_rank or target modules?)")
            for i, (p, s) in enumerate(zip(params, saved)):
                if p.shape != s.shape:
                    raise ValueError(f"LoRA state {key!r}[{i}]: shape {tuple(s.shape)} but the adapter has "
                                     f"{tuple(p.shape)} (another lora_rank?)")
        for key, params in (("policy", self._policy), ("last_policy", self._last)):
            torch._foreach_copy_(_local(params), _local([s.to(p.device) for p, s in zip(params, state[key])]))
