"""A version as a LoRA adapter folder over a base version (PEFT's layout), for servers that load
adapters at run time on top of the model they started with (vLLM's `/v1/load_lora_adapter`).

    export_adapter(base, version, Path("exports/v3-over-v1"), rank=16)
    # -> adapter_config.json + adapter_model.safetensors: W_version = W_base + B @ A

Versions chain and lmloop's LoRA runs merge their adapters, so the adapter is recomputed from the
weights: each linear layer's difference factored by SVD at `rank` (why that is exact, and what
is refused, is in docs/scale.md); what a lower rank loses is measured and refused past
`max_loss` (relative Frobenius norm of the dropped part). Llama family only (its HF layout has
plain `nn.Linear` projections)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmloop.artifacts import atomic_dir
from lmloop.errors import UserError
from lmloop.models.adapter import to_hf
from lmloop.models.io import LoadedModel, model_state

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def export_adapter(
    base: LoadedModel,
    version: LoadedModel,
    out: Path,
    *,
    rank: int = 16,
    max_loss: float = 1e-3,
    atol: float = 0.0,
) -> dict[str, float]:
    """Write `version` as a PEFT LoRA adapter over `base` at `out` (atomically); returns
    {"rank", "modules", "loss"} (loss: the largest relative part of a difference dropped)."""
    for lm in (base, version):
        if lm.model.config.family != "llama":
            raise UserError(
                f"a LoRA adapter export supports the llama family, not '{lm.model.config.family}'",
                hint="serve the version by restart (--upstream-format hf and a reload command)",
            )
    _, b = to_hf(base.model.config, model_state(base.model))
    _, v = to_hf(version.model.config, model_state(version.model))
    if b.keys() != v.keys() or any(b[k].shape != v[k].shape for k in v):
        raise UserError("the version and its base have different shapes: not an adapter")
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    loss = 0.0
    for key in sorted(v):
        d = v[key].double() - b[key].double()
        if not bool((d.abs() > atol).any()):
            continue
        module = key.removesuffix(".weight")
        short = module.rsplit(".", 1)[-1]
        if d.ndim != 2 or not key.endswith(".weight") or short not in LINEAR:
            raise UserError(
                f"the version differs from its base in {key}, which a LoRA adapter cannot "
                "carry (a full fine-tune)",
                hint="serve it by restart (--upstream-format hf and a reload command)",
            )
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank, s.numel())
        total = float(s.square().sum().sqrt())
        dropped = float(s[r:].square().sum().sqrt()) / total if total > 0 else 0.0
        loss = max(loss, dropped)
        root = s[:r].sqrt()
        lora_b = torch.zeros(d.shape[0], rank, dtype=torch.float64)
        lora_a = torch.zeros(rank, d.shape[1], dtype=torch.float64)
        lora_b[:, :r] = u[:, :r] * root
        lora_a[:r] = root[:, None] * vh[:r]
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora_b.float().contiguous()
        targets.add(short)
    if not tensors:
        raise UserError("the version equals its base: there is no adapter to write")
    if loss > max_loss:
        raise UserError(
            f"rank {rank} keeps all but {loss:.2%} of the version's difference from its base "
            f"(limit {max_loss:.2%})",
            hint="raise --upstream-lora-rank (and the upstream's --max-lora-rank)",
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # scaling alpha / r = 1: W + B @ A
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(targets),
        "base_model_name_or_path": str(base.path),
        "inference_mode": True,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"rank": rank, "modules": len(tensors) // 2, "loss": loss}
