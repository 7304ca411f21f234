"""Data-parallel runs on ``torch.distributed``: process-group setup from torchrun's environment.

``torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] ...``
starts one process per GPU and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_from_env` turns that into an initialised default process group
(NCCL for CUDA, gloo for CPU); :class:`~orwcfm_fast.ORWCFMTrainer` notices an initialised group
and runs data-parallel (see its docstring), or, with config ``parallelism: "fsdp"``, shards a pipeline's
transformer with FSDP2 (:func:`shard_module`). Nothing here runs at import time.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "agree_on_stop",
    "full_tensor",
    "is_sharded",
    "local_parameter_bytes",
    "local_tensors",
    "shard_module",
    "wrap_data_parallel",
    "launched_by_torchrun",
    "init_from_env",
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "default_device",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "main_process_first",
]


def launched_by_torchrun() -> bool:
    """True when the environment of a torchrun (or ``torch.distributed.launch``) worker is set."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_distributed() -> bool:
    """True when a default process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the process that logs and writes files."""
    return rank() == 0


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """The device this process should use.

    Args:
        requested: ``None`` (CUDA when available, else CPU), ``"cuda"`` (this process's GPU) or an
            explicit device. Under torchrun, ``"cuda"`` and ``None`` mean ``cuda:LOCAL_RANK``.
    """
    if requested is not None:
        device = torch.device(requested)
        if device.type != "cuda" or device.index is not None:
            return device
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def init_from_env(device: str | torch.device | None = None, backend: str | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment, if launched by it.

    Args:
        device: see :func:`default_device`.
        backend: process-group backend; default NCCL for CUDA devices, gloo otherwise.

    Returns:
        This process's device (with ``torch.cuda.set_device`` called for a CUDA device).
        Without torchrun's environment nothing is initialised and the device is returned.

    Raises:
        RuntimeError: torchrun's environment is incomplete or inconsistent (the message names
            the variable), or the requested CUDA device does not exist.
    """
    device = default_device(device)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"this process wants {device} (LOCAL_RANK={os.environ.get('LOCAL_RANK')}) but only "
                f"{torch.cuda.device_count()} CUDA devices are visible: start at most that many processes per node"
            )
        torch.cuda.set_device(device)
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this torch build has no torch.distributed")
    for name in ("RANK", "WORLD_SIZE"):
        if not os.environ[name].isdigit():
            raise RuntimeError(f"environment variable {name}={os.environ[name]!r} is not a non-negative integer")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, **kwargs)
    return device


def barrier() -> None:
    """``dist.barrier()`` when distributed; nothing otherwise."""
    if is_distributed():
        dist.barrier()


def broadcast_module(module: torch.nn.Module) -> None:
    """Overwrite ``module``'s parameters and buffers with rank 0's, in place (nothing when not distributed)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself when not distributed."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may fill a cache), then the other ranks."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def wrap_data_parallel(model: torch.nn.Module, device: torch.device, parallel: bool) -> torch.nn.Module:
    """The trained module, data-parallel where that applies.

    Under torch.distributed: ``DistributedDataParallel`` (config ``parallel`` is then ignored, with a warning);
    else with ``parallel`` and two or more CUDA devices: ``DataParallel``; else the module itself.
    """
    import warnings

    if is_distributed():
        if parallel:
            warnings.warn("config 'parallel' is ignored under torch.distributed: the run is already data-parallel")
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if not parallel:
        return model
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        return torch.nn.DataParallel(model)
    warnings.warn("config 'parallel' is True but fewer than two CUDA devices are in use: running on one device")
    return model


def agree_on_stop(stop) -> bool:
    """Whether a stop was requested (``stop.signum`` set) on any rank: a collective under torch.distributed.

    A rank that received no signal takes the first received one, so every rank returns the same answer.
    """
    if not is_distributed():
        return stop.signum is not None
    received = [None] * world_size()
    dist.all_gather_object(received, stop.signum)
    received = [signum for signum in received if signum is not None]
    if received and stop.signum is None:
        stop.signum = received[0]
    return bool(received)


# ---------------------------------------------------------------------------------------------- FSDP2


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter, gradient or state sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` gathered from every rank (a collective: every rank must call it), else ``tensor``."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_tensors(tensors) -> list[torch.Tensor]:
    """Each tensor's local part: a ``DTensor`` 's shard on this rank (a view: writing to it writes the ``DTensor``),
    other tensors as they are. For ``torch._foreach_*`` ops, which ``DTensor`` does not implement, on tensors
    sharded alike (a parameter and its EMA or its copy in the other adapter)."""
    return [t.to_local() if is_sharded(t) else t for t in tensors]


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters held by this process: a sharded parameter counts its local shard only."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if is_sharded(p) else p
        total += local.numel() * local.element_size()
    return total


def shard_module(root: torch.nn.Module, units, compute_dtype: torch.dtype | None,
                 device: str | torch.device | None = None) -> None:
    """Shard ``root`` over every rank with FSDP2's ``fully_shard``: one unit per module of ``units``, then the root.

    Each unit's parameters are all-gathered just before its forward (and again before its backward) and freed
    after it, so a rank holds ``1 / world_size`` of the parameters plus one unit at a time. Gradients are
    reduce-scattered (averaged over ranks) during the backward, in float32.

    Args:
        root: the module (its parameters become ``DTensor`` s in place; the module object stays the same).
        units: its sub-modules to shard one by one (a transformer's blocks), in forward order.
        compute_dtype: the dtype the forwards run in (parameters are cast to it when gathered; bf16 /
            fp16 mixed precision), or ``None``: each parameter's own dtype.
        device: where the shards live (FSDP moves each unit there as it shards it): this process's device
            (``cuda`` means the current one); default: FSDP's choice, CUDA whenever it is available.

    Raises:
        RuntimeError: no process group is initialised (start the run under torchrun).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP sharding needs torch.distributed: start the run under torchrun")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": policy}
    if device is not None:  # a 1-D mesh over every rank on this device type (a CPU run on a GPU machine stays there)
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(root, **kwargs)
    # FSDP fixes each unit's gradient dtypes when the root first runs, from the parameters that require
    # gradients then. LoRA's reference role (adapters disabled) requires none, and its base (bf16) and adapters
    # (fp32) differ in dtype: had the first forward been the reference's, the policy's gradients would later
    # reach reduce-scatter uncast. Initialise now, while the trained parameters are the ones requiring grad.
    root._get_fsdp_state()._lazy_init()
