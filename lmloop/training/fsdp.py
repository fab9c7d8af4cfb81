"""FSDP (fully sharded data parallel) for `lmloop train --parallel fsdp` under torchrun.

PyTorch's FSDP2 (`fully_shard`) shards each Transformer block, then the root (embedding, final
norm, `lm_head`, so a tied head stays tied), on gloo or NCCL, which is why there is no FSDP1
fallback (docs/train.md). Checkpoints stay in the single-process format: `full_model_state` and
`full_optimizer_state` gather each sharded tensor in turn (a collective every process must call,
in the same order) and keep the full CPU copy on rank 0 only; `shard_optimizer_state` cuts a
full optimizer state back into this process's shards on resume."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard `model` in place over `world` processes: each block, then the root."""
    mesh = init_device_mesh(device.type, (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(t: Any, keep: bool) -> Any:
    """The whole tensor on the CPU when `keep`, else None; gathers a DTensor on every rank."""
    if isinstance(t, DTensor):
        t = t.full_tensor()  # collective: every rank takes part, one tensor at a time
    if not keep:
        return None
    return t.detach().to("cpu").clone() if isinstance(t, torch.Tensor) else t


def full_model_state(model: nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """The unsharded CPU state dict on the main rank (None elsewhere); call it on every rank."""
    out = {k: _full(v, main) for k, v in model.state_dict().items()}
    return out if main else None


def full_optimizer_state(opt: torch.optim.Optimizer, main: bool) -> dict[str, Any] | None:
    """`opt.state_dict()` with every sharded tensor gathered, on the main rank (None elsewhere).

    The result is the very format a single process's optimizer writes (states keyed by the
    parameter's index), so it loads with `load_state_dict` under any world size.
    """
    sd = opt.state_dict()
    state = {}
    for idx in sorted(sd["state"]):  # the same order on every rank: the gathers pair up
        state[idx] = {k: _full(v, main) for k, v in sd["state"][idx].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else None


def shard_optimizer_state(opt: torch.optim.Optimizer, full: dict[str, Any]) -> dict[str, Any]:
    """A full (single-process format) optimizer state cut into this rank's shards.

    Index i names the i-th parameter over `opt.param_groups` in order, as `state_dict` numbers
    them. A state tensor shaped like its DTensor parameter (Adam's moments) is sharded like it;
    anything else (the step counter) stays as it is. Every rank holds the full state already
    (each reads the checkpoint), so sharding needs no communication.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for idx, st in full["state"].items():
        p = params[int(idx)]
        out = {}
        for k, v in st.items():
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape:
                v = distribute_tensor(
                    v.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None
                )
            out[k] = v
        state[idx] = out
    return {"state": state, "param_groups": full["param_groups"]}
