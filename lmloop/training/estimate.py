"""What a run will cost before it runs: memory per process, FLOPs per token and the peak FLOP/s
that MFU is measured against; the `--dry-run` report and the refusal of a run that cannot fit."""

from __future__ import annotations

from pathlib import Path

import torch

from lmloop.errors import UserError
from lmloop.models.base import ModelConfig
from lmloop.training.config import TrainConfig
from lmloop.training.distributed import Dist

# Dense bf16 tensor-core peaks (FLOP/s) of GPUs whose MFU we can state without being told.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(cfg: TrainConfig, d: Dist) -> float | None:
    """Peak FLOP/s of all processes (for MFU): --peak-tflops, or a known GPU's."""
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
    if peak is None and d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        peak = next((v for k, v in GPU_PEAKS.items() if k in name), None)
    return peak * d.world if peak is not None else None


def memory_estimate(
    config: ModelConfig,
    trainable: int,
    micro_batch: int,
    seq_len: int,
    half_acts: bool = False,
    shards: int = 1,
) -> dict[str, int]:
    """Bytes per process for fp32 weights, gradients, AdamW moments and one micro-batch's activations.

    `shards` > 1 (FSDP) divides weights, gradients and moments over the processes; the one block
    FSDP gathers at a time is small beside them and left out.

    Activations follow Korthikanti et al. 2022: s·b·h·34 bytes per layer at 16 bit (doubled for
    fp32; `half_acts` under bf16 autocast), without their 5·a·s²·b attention-matrix term because
    scaled_dot_product_attention's fused kernels never store that matrix; plus the logits, their
    softmax and its gradient in fp32.
    """
    layers, vocab, width = config.num_layers, config.vocab_size, config.d_model
    n = config.num_params()
    per_layer = seq_len * micro_batch * width * 34 * (1 if half_acts else 2)
    return {
        "weights": 4 * n // shards,
        "grads": 4 * trainable // shards,
        "optimizer": 8 * trainable // shards,
        "activations": int(layers * per_layer + 3 * 4 * micro_batch * seq_len * vocab),
    }


def available_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, or the host's available memory; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_memory(
    cfg: TrainConfig, config: ModelConfig, trainable: int, d: Dist
) -> tuple[dict[str, int], int | None]:
    """(this run's `memory_estimate` per process, the memory available on its device); under
    FSDP the training state is split over the world."""
    cuda = d.device is not None and d.device.type == "cuda"
    shards = d.world if cfg.parallel == "fsdp" else 1
    est = memory_estimate(config, trainable, cfg.batch.micro_batch, cfg.batch.seq_len, cuda, shards)
    return est, available_memory(d.device) if d.device is not None else None


def check_memory(cfg: TrainConfig, config: ModelConfig, trainable: int, d: Dist) -> None:
    """Refuse a run whose estimate exceeds the memory its device has free."""
    est, avail = run_memory(cfg, config, trainable, d)
    need = sum(est.values())
    if avail is not None and need > avail:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in est.items())
        raise UserError(
            f"this config needs about {fmt_bytes(need)} of memory ({parts}) but "
            f"{fmt_bytes(avail)} is available on {d.device}",
            hint="lower batch.micro_batch (raise accumulation instead), batch.seq_len, "
            "or the model size; or use LoRA",
        )


def dry_run_report(
    cfg: TrainConfig, config: ModelConfig, trainable: int, fpt: float, accum: int, d: Dist
) -> str:
    """`--dry-run`'s lines: parameters, FLOPs per token, tokens per step, memory, the whole run."""
    n, ne = config.num_params(), config.num_params(non_embedding=True)
    G, T = cfg.batch.global_batch, cfg.batch.seq_len
    est, avail = run_memory(cfg, config, trainable, d)
    tokens = G * T
    lines = [
        f"model         {config.family}: {n:,} params ({ne:,} non-embedding, "
        f"{trainable:,} trainable)",
        f"FLOPs/token   {fmt_count(fpt)} (6 x matmul params + attention)",
        f"tokens/step   {tokens:,} ({G} sequences x {T} tokens; {accum} micro-batches of "
        f"{cfg.batch.micro_batch} x {d.world} process(es))",
        "memory        "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in est.items())
        + f": about {fmt_bytes(sum(est.values()))}"
        + (f" ({fmt_bytes(avail)} available)" if avail else ""),
        f"run           {cfg.max_steps:,} steps = {fmt_count(tokens * cfg.max_steps)} tokens "
        f"= {fmt_count(fpt * tokens * cfg.max_steps)} FLOPs",
    ]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_count(n: float) -> str:
    for unit, div in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
