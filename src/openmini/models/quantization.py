"""Weight formats of the linear layers, applied to a loaded model as a module transform.

- ``float32``: exact mode (tests against transformers).
- ``bfloat16``: weights in bfloat16, activations cast to bfloat16 at each matmul; fast on
  CPUs with AMX or AVX512-BF16 (oneDNN), slow on plain AVX2.
- ``int8``: weight-only int8 with one float scale per output row (symmetric, absmax/127),
  the matmul done by ``torch.ops.aten._weight_int8pack_mm`` for few rows (decode, where
  reading the weights dominates: 4x fewer bytes than float32) and by a float32 GEMM on the
  dequantized weight for many rows (prefill, compute bound). Per-channel weight-only int8 as
  in LLM.int8() without outliers (Dettmers et al. 2022, arXiv:2208.07339) / gpt-fast's
  ``WeightOnlyInt8Linear``.

``resolve_dtype_mode`` picks the format for ``dtype_mode="auto"`` from the CPU's features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openmini.models.layers import Linear

DTYPE_MODES = ("auto", "float32", "bfloat16", "int8")
# rows above which an int8 layer dequantizes and runs a float32 GEMM instead of the
# weight-only kernel (that kernel is tuned for matrix-vector products)
INT8_GEMM_MIN_ROWS = 16


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX tiles or AVX512-BF16 (bf16 GEMMs faster than fp32)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch without the probes
        return False


def resolve_dtype_mode(dtype_mode: str) -> tuple[str, torch.dtype]:
    """Map a ``dtype_mode`` to ``(linear weight format, KV cache dtype)``.

    ``"auto"`` -> bfloat16 linears where the CPU has fast bf16 matmuls, else int8 weight-only;
    KV cache bfloat16 in both cases. ``"float32"`` -> everything float32.

    Raises:
        ValueError: unknown mode.
    """
    if dtype_mode not in DTYPE_MODES:
        raise ValueError(f"unknown dtype_mode {dtype_mode!r}; expected one of {DTYPE_MODES}")
    if dtype_mode == "float32":
        return "float32", torch.float32
    if dtype_mode == "auto":
        return ("bfloat16" if cpu_has_fast_bf16() else "int8"), torch.bfloat16
    return dtype_mode, torch.bfloat16


class Int8Linear(nn.Module):
    """``y = x @ (scale[:, None] * q).T (+ bias)`` with int8 ``q`` [out, in] and per-row scales.

    Built from a float ``Linear`` by ``Int8Linear.from_linear``. Input and output float32.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out] bfloat16 (the kernel wants x's dtype)
        self.register_buffer("scales_f32", scales.float())  # [out] float32
        self.bias = bias  # [out] float32 or None

    @classmethod
    def from_linear(cls, linear: Linear) -> "Int8Linear":
        """Quantize a float linear layer: ``scale = max|w_row| / 127``, ``q = round(w / scale)``."""
        w = linear.weight.detach().float()  # [out, in]
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
        scales = scales.to(torch.bfloat16)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(q.contiguous(), scales, bias)

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32 weight this layer multiplies by."""
        return self.weight.float() * self.scales_f32[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] float32 -> [T, out] float32."""
        if x.shape[0] > INT8_GEMM_MIN_ROWS:
            return F.linear(x, self.dequantized(), self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).float()
        return y if self.bias is None else y.add_(self.bias)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``. Shapes: [T, in], [T, out]."""
        if x.shape[0] > INT8_GEMM_MIN_ROWS and self.bias is None:
            return torch.addmm(residual, x, self.dequantized().t())
        return self(x).add_(residual)


def apply_weight_format(model: nn.Module, fmt: str) -> nn.Module:
    """Convert every ``Linear`` of a loaded model to ``fmt`` in place.

    Args:
        model: a model whose weights are loaded (float32).
        fmt: ``"float32"`` (no change), ``"bfloat16"`` or ``"int8"``.

    Returns:
        The same model.

    Raises:
        ValueError: unknown format.
    """
    if fmt == "float32":
        return model
    if fmt not in ("bfloat16", "int8"):
        raise ValueError(f"unknown weight format {fmt!r}")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, Linear):
                continue
            if fmt == "int8":
                setattr(module, child_name, Int8Linear.from_linear(child))
            else:
                child.weight = nn.Parameter(child.weight.detach().to(torch.bfloat16), requires_grad=False)
    return model
