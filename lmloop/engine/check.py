"""`lmloop serve --check`: what the engine can use on this machine, found before any model loads.

    for item in run_checks():
        print(item.line())

The C kernel's build, the instruction set it runs, and the torch operators the fast runner
calls; docs/architecture.md says which are `needed` (serving cannot go on without them) and
what runs when an optional one is missing."""

from __future__ import annotations

import dataclasses

import torch

from lmloop.engine import kernels

SIMD = {0: "plain C (no AVX2)", 1: "AVX2", 2: "AVX2 with VNNI (8-bit dot products)"}
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
# (operator, needed, what uses it)
TORCH_OPS = (
    ("quantized.linear_prepack", True, "int8 weights (fbgemm)"),
    ("quantized.linear_dynamic", True, "int8 weights (fbgemm)"),
    ("mkldnn._reorder_linear_weight", False, "fp32 packed linears (else plain F.linear)"),
    ("mkldnn._linear_pointwise", False, "fp32 packed linears (else plain F.linear)"),
)


@dataclasses.dataclass
class Item:
    name: str
    ok: bool
    detail: str
    needed: bool = False

    def line(self) -> str:
        mark = "ok" if self.ok else ("MISSING" if self.needed else "no")
        return f"{self.name:<40} {mark:<8} {self.detail}"


def torch_op(name: str) -> bool:
    """Whether `torch.ops.<namespace>.<op>` resolves in this torch."""
    ns, op = name.split(".", 1)
    try:
        getattr(getattr(torch.ops, ns), op)
    except (AttributeError, RuntimeError):
        return False
    return True


def run_checks() -> list[Item]:
    info = kernels.build_info()
    items = [
        Item("torch", True, f"{torch.__version__} (tested: 2.13)"),
        Item(
            "C compiler",
            info["compiler"] is not None,
            f"{info['compiler']} ({info['version']})"
            if info["compiler"]
            else (f"CC={info['CC']} is not an executable" if info["CC"] else "none found")
            + ": int4 unavailable, int8 attends with torch ops",
        ),
        Item("kernel flags", True, str(info["flags"])),
    ]
    simd = None
    if info["compiler"] is not None:
        try:
            lib = kernels.library()
        except kernels.KernelUnavailable as e:
            items.append(Item("kernel build", False, str(e), needed=True))
        except kernels.KernelSelfCheckFailed as e:
            items.append(Item("kernel self-check", False, str(e), needed=True))
        else:
            simd = int(lib.lm_simd())
            done = f"{info['path']} (self-check against torch passed)"
            items.append(Item("kernel build", True, done))
    used = "not built" if simd is None else SIMD.get(simd, f"unknown ({simd})")
    items.append(Item("kernel instruction set", simd is not None, used))
    have = set(kernels.cpu_flags().split())
    shown = ", ".join(f for f in CPU_FLAGS if f in have) or "none of " + ", ".join(CPU_FLAGS)
    items.append(Item("CPU flags (/proc/cpuinfo)", True, shown))
    items.append(
        Item("oneDNN (mkldnn)", torch.backends.mkldnn.is_available(), "fp32 packed linears")
    )
    for name, needed, use in TORCH_OPS:
        items.append(Item(f"torch.ops.{name}", torch_op(name), use, needed=needed))
    return items


def failed(items: list[Item]) -> list[Item]:
    return [i for i in items if i.needed and not i.ok]
