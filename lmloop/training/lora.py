"""LoRA fine-tuning (Hu et al. 2021) on lmloop's own model files, through `peft`.

`peft.inject_adapter_in_model` wraps the named linear layers (e.g. `q_proj`, `v_proj`) of our
plain `nn.Module` in place and freezes everything else. For checkpoints and export the adapters
are merged into a plain copy of the weights (W + B·A·alpha/r), so every checkpoint folder is an
ordinary model that `load_model` reads; the adapter weights themselves ride in train_state.pt so a
LoRA run resumes exactly from its base model.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lmloop.models import build_model

# peft is imported in the functions that use it, not here: it pulls in transformers' PEFT
# machinery (seconds on a cold start, measured ~8 s here), and only LoRA runs need it.


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str],
               last_layers: int = 0):  # fmt: skip
    """Adapters on the `targets` linear layers; with `last_layers` N > 0 only in the last N
    Transformer blocks, so backpropagation stops below them (a shorter backward pass)."""
    import peft  # lazy: see the note at the top

    names: list[str] = list(targets)
    if last_layers > 0:
        block = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
        found = [(int(m.group(1)), n) for n, _ in model.named_modules()
                 if n.rsplit(".", 1)[-1] in targets and (m := block.search(n))]  # fmt: skip
        depth = 1 + max((i for i, _ in found), default=-1)
        names = [n for i, n in found if i >= depth - last_layers]
        if not names:
            raise ValueError("no target layer in the last blocks")
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none"
    )
    model = peft.inject_adapter_in_model(config, model)
    return model, sum(1 for _ in lora_layers(model))


def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer  # lazy: see the note at the top

    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing = set(adapter_state(model)) - set(state)
    if missing:
        raise KeyError(f"adapter weights missing: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Any]:
    """The plain model's state dict with every adapter folded into its base weight."""
    deltas = {f"{name}.weight": m.get_delta_weight("default") for name, m in lora_layers(model)}
    sd = {
        k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k
    }
    return {k: v + deltas[k].to(v.dtype) if k in deltas else v for k, v in sd.items()}


def merged_model(model: nn.Module) -> nn.Module:
    """A plain lmloop model (no peft modules) with the adapters merged in."""
    with torch.random.fork_rng(devices=[]):  # building must not disturb the run's RNG stream
        plain = build_model(model.config)
    plain.load_state_dict(merged_state_dict(model))
    p = next(model.parameters())
    return plain.to(device=p.device, dtype=p.dtype).eval()
