"""Weight-only int8 and int4 for the frozen backbones' linear layers: 8 or 4 bits per weight in memory, the
weight dequantized inside each matmul. Nothing quantized trains, so no gradient is ever quantized.

- int8: one scale per output channel, symmetric: w ~ q * s, q in [-127, 127], s = max|w_row| / 127.
- int4: a scale and a zero per group of `group_size` consecutive inputs of a row (min-max): w ~ (q - 8) * s + z,
  q in [0, 15], two per byte, the even input in the high nibble. That is the formula, the scales-and-zeros layout
  (groups, out, 2) and the packing that torch's int4 kernel (`_weight_int4pack_mm`, tinygemm) reads.
- Quantized while loading: hub.build makes the model on the meta device, quantize_linears swaps its nn.Linear
  modules for QuantizedLinear and quantizes each checkpoint weight as it is read (memory-mapped), so the
  full-precision model never exists; the float32 copy each weight is quantized from is handed back to the system
  at once (glibc would keep it), so the peak is the quantized model (bench.py --quantize measures it).
- The matmul. Gradients cross the frozen LM (to the soft prompt and the injected tokens), so the forward must be
  differentiable in its input. An autograd function dequantizes the weight in the forward and again in the
  backward, and keeps only the quantized weight for the backward: F.linear on a dequantized weight would keep
  every layer's float copy alive until the backward, the full-precision model again. Per device:
    - CPU: always that. torch's CPU int8 and int4 kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
      have no backward and were 11x and 13x slower than dequantize-then-matmul at a training shape here (256 rows
      of 768 into 3072; faster only at a few rows);
    - CUDA (sm80+, bf16): int4 forwards that need no gradient, on at most KERNEL_MAX_ROWS rows (decode steps),
      run torch's int4 kernel, which reads 4 bits per weight; its tiled layout is built on each call from the
      stored one (the tiled layout cannot be dequantized for a backward, so it is not what is stored). Every
      other matmul dequantizes; int8 scales the output instead of the weight, as gpt-fast does for
      torch.compile to fuse the cast into the matmul. None of the CUDA paths was run here: no GPU was lent
      (`bench.py --device cuda --quantize` is ready).
- What stays in full precision: embeddings (and a tied LM head), norms, biases, convolutions.

References: pytorch-labs/gpt-fast quantize.py (WeightOnlyInt8Linear; group-wise int4 with scales and zeros);
torch's _weight_int4pack_mm / _convert_weight_to_int4pack and the packing in torch.testing._internal.
common_quantization._group_quantize_tensor; Dettmers et al. 2022, "LLM.int8()" (absmax per channel); Dettmers &
Zettlemoyer 2023, "The case for 4-bit precision" (group sizes).
"""
import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
KERNEL_MAX_ROWS = 64  # tinygemm is written for decode-sized inputs; bigger ones go to cuBLAS (torchao does so too)
try:  # the C library, to hand memory back to the system while a model loads (quantize_linears)
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    LIBC = None


@dataclass(frozen=True)
class Quantization:
    mode: str             # int8 | int4
    group_size: int = 128  # int4: consecutive inputs of a row that share a scale and a zero

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size}: expected one of {', '.join(map(str, GROUP_SIZES))}")


def cpu_dtype_problem(mode: str, dtype: str, device: str) -> str | None:
    """Why weights quantized to mode should not run in dtype on device (None: they can): on a CPU every matmul
    dequantizes into the compute dtype, and bf16 / fp16 matmuls run hundreds of times slower than float32 on the
    CPUs this project is tested on."""
    if mode in MODES and dtype != "float32" and device.startswith("cpu"):
        return (f"--quantize {mode} with --dtype {dtype} on a CPU: the quantized weights are dequantized into "
                f"{dtype} for every matmul, which CPUs run hundreds of times slower than float32: use --dtype float32")
    return None


def _nonzero(scales: Tensor) -> Tensor:
    return scales.masked_fill(scales == 0, 1)  # an all-zero row or group (or an underflow): q = 0 reads back 0


def quantize_int8(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(q int8 (out, in), scales (out,) in dtype), w ~ q * scales[:, None]; q is computed against the scales as
    stored, so their rounding to dtype is part of what q absorbs. One float32 copy of w, worked on in place: the
    fewer and smaller the temporaries, the less the allocator keeps while a model loads."""
    w = w.to(torch.float32, copy=True)
    scales = _nonzero((torch.linalg.vector_norm(w, float("inf"), dim=1) / 127).to(dtype))
    return w.div_(scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales


def quantize_int4(w: Tensor, group_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(packed uint8 (out, in / 2), scales and zeros (in / group_size, out, 2) in dtype): per group of inputs,
    w ~ (q - 8) * scale + zero, scale = (max - min) / 15, zero = min + 8 * scale, as gpt-fast and torch's
    kernel; q against the stored scale and zero."""
    out, k = w.shape
    g = w.to(torch.float32, copy=True).view(out, k // group_size, group_size)  # worked on in place, as above
    low, high = g.aminmax(dim=-1)
    scales = _nonzero(((high - low) / 15).to(dtype))
    zeros = (low + 8 * scales.float()).to(dtype)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = g.sub_(z - 8 * s).div_(s).round_().clamp_(0, 15).to(torch.uint8).view(out, k)
    return q[:, ::2] << 4 | q[:, 1::2], torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()


def dequantize(weight: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight in dtype, from int8 and its scales or from packed int4 and its scales and zeros."""
    if weight.dtype == torch.int8:
        return weight.to(dtype) * scales.to(dtype)[:, None]
    out = weight.shape[0]
    q = torch.stack([weight >> 4, weight & 15], -1).view(out, -1, group_size).to(dtype)
    s, z = scales.to(dtype).permute(2, 1, 0).contiguous()  # (out, groups) each, contiguous: so is the result
    return torch.addcmul((z - 8 * s)[..., None], q, s[..., None]).view(out, -1)


def compute_dtype(x: Tensor) -> torch.dtype:
    """What a matmul on x runs in: autocast's dtype where autocast is on (F.linear would cast to it anyway)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class QuantizedMatmul(torch.autograd.Function):
    """x @ dequantize(weight).T, differentiable in x only; the backward keeps the quantized weight, not a float
    copy, and dequantizes it again."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scales: Tensor, group_size: int) -> Tensor:
        ctx.save_for_backward(weight, scales)
        ctx.group_size, ctx.x_dtype = group_size, x.dtype
        dtype = compute_dtype(x)
        if weight.dtype == torch.int8:  # scale the outputs, not the weight: one pass over the weight fewer
            return F.linear(x.to(dtype), weight.to(dtype)) * scales.to(dtype)
        return F.linear(x.to(dtype), dequantize(weight, scales, group_size, dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scales = ctx.saved_tensors
        if weight.dtype == torch.int8:
            grad_x = (grad * scales.to(grad.dtype)) @ weight.to(grad.dtype)
        else:
            grad_x = grad @ dequantize(weight, scales, ctx.group_size, grad.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None


def int4_kernel_fits(x: Tensor, layer: "QuantizedLinear") -> bool:
    """Whether torch's CUDA int4 kernel can run this forward: no gradient wanted, few rows, bf16 on sm80+."""
    return (x.is_cuda and compute_dtype(x) == torch.bfloat16 and layer.scales.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and x.requires_grad) and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]
            and layer.out_features % 8 == 0 and torch.cuda.get_device_capability(x.device) >= (8, 0))


def int4_kernel(x: Tensor, layer: "QuantizedLinear") -> Tensor:
    k = layer.in_features
    tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2  # the kernel needs k % (16 * tiles) == 0
    tiled = torch.ops.aten._convert_weight_to_int4pack(layer.weight, tiles)
    rows = x.reshape(-1, k).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm(rows, tiled, layer.group_size, layer.scales)
    return y.view(*x.shape[:-1], layer.out_features)


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored quantized: buffers `weight` (int8 (out, in), or packed int4
    (out, in / 2)) and `scales` (int8: (out,); int4: scales and zeros (in / group_size, out, 2)); the bias, if
    any, stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, group_size: int = 128):
        super().__init__()
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        if mode == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(in_features // group_size, out_features, 2))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "int4" and int4_kernel_fits(x, self):
            y = int4_kernel(x, self)
        else:
            y = QuantizedMatmul.apply(x, self.weight, self.scales, self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}"


def quantize_linears(model: nn.Module, state: dict[str, Tensor], quantization: Quantization,
                     dtype: torch.dtype, source: str = "") -> dict[str, Tensor]:
    """Every nn.Linear of model (on the meta device) becomes a QuantizedLinear, and its weight in state (memory-
    mapped from the checkpoint) is read and quantized now, one at a time: returns state holding the quantized
    weights and their scales, for hub.load_weights. A weight missing or of the wrong shape is left for
    load_weights to name."""
    mode, group = quantization.mode, quantization.group_size
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        k, n = linear.in_features, linear.out_features
        if mode == "int4" and k % group:
            fit = [str(g) for g in GROUP_SIZES if k % g == 0]
            raise ValueError(f"{source or type(model).__name__}: {name} has {k} inputs, which int4 groups of {group} "
                             f"do not divide (group sizes that do: {', '.join(fit) or 'none'})")
        with torch.device(linear.weight.device):
            quantized = QuantizedLinear(k, n, linear.bias is not None, mode, group)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, quantized)
        key = f"{name}.weight"
        if key in state and tuple(state[key].shape) == (n, k):
            w = state[key]
            state[key], state[f"{name}.scales"] = \
                quantize_int8(w, dtype) if mode == "int8" else quantize_int4(w, group, dtype)
            if LIBC is not None:  # glibc keeps the float32 copies just freed, between the quantized tensors kept:
                LIBC.malloc_trim(0)  # without this, loading opt-1.3b in int4 held up to 1 GB more than its weights
    return state


def parameter_count(model: nn.Module) -> int:
    """Parameters as the full-precision model has them: a QuantizedLinear's weight counts in x out."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, scales included: what the model holds in memory."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
