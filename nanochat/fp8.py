"""
FP8 matmuls for training the Transformer blocks' linear layers (opt-in: base_train --fp8).

Recipe: Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (arXiv:2209.05433),
with dynamic tensorwise scaling (one scale per tensor, from its current abs-max), the
recipe torchao calls "tensorwise". A linear layer y = x W^T does three matmuls; each
runs on the FP8 tensor cores (torch._scaled_mm) with inputs scaled into FP8's range:

    s(t) = fmax / max|t|,            t8 = cast(t * s(t))      (saturating)
    forward:  y  = (x8 W8^T)  / (s(x) s(W))        x, W in E4M3 (fmax 448, 3 mantissa bits)
    backward: dx = (g8 W8)    / (s(g) s(W))        g = dL/dy in E5M2 (fmax 57344: range
              dW = (g8^T x8)  / (s(g) s(x))        for gradients, 2 mantissa bits)

The matmuls accumulate in fp32; y and dx come out in bf16, dW in fp32 (the master
weights' dtype). The forward uses the tensor cores' fast accumulation, the two backward
matmuls do not (as torchao, for gradient precision). The saved activation is x8, half
the bytes of bf16 x.

What stays in bf16: attention itself, the norms, the embedding and lm_head (the logits
feed a softmax over 32K classes; FP8 there costs accuracy for ~10% of the FLOPs), and
every layer in eval mode, so validation loss and sampling measure the weights, not the
rounding. Weights, gradients, optimizer state and checkpoints are unchanged: convert()
only swaps the forward of existing nn.Linear modules, so a checkpoint trained with FP8
loads into a plain model. Needs tensor cores with FP8 (H100/H200, sm_89+) for speed;
torch._scaled_mm also runs on CPU, which the tests use.
"""

import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t, dtype):
    """(t8, inverse scale): t8 * inv_scale ~= t. The scale maps max|t| onto the format's
    largest finite value; clamping guards the rounding at the top of the range."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = fmax / amax
    t8 = (t.float() * scale).clamp(-fmax, fmax).to(dtype)
    return t8, scale.reciprocal()


def col_major(t):
    """The same matrix stored column-major, the layout _scaled_mm wants for its second operand."""
    return t.t().contiguous().t()


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        # x (M, K) activations, weight (N, K) fp32 master weights
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.weight_dtype = weight.dtype
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad, E5M2)
        dx = torch._scaled_mm(g8, col_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=torch.bfloat16)
        dw = torch._scaled_mm(g8.t().contiguous(), col_major(x8), scale_a=g_inv, scale_b=x_inv,
                              out_dtype=ctx.weight_dtype)
        return dx, dw


class FP8Linear(nn.Linear):
    """nn.Linear whose training forward runs its three matmuls in FP8 (see module doc).
    Falls back to the ordinary (autocast bf16) linear in eval mode, with a bias, or when
    a dimension is not a multiple of 16 (a _scaled_mm requirement)."""

    def forward(self, x):
        M = x.numel() // x.size(-1)
        if not self.training or self.bias is not None or M % 16 or self.in_features % 16 or self.out_features % 16:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            y = _FP8Linear.apply(x.reshape(M, x.size(-1)).to(torch.bfloat16), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


def convert(model):
    """Switch every nn.Linear inside the Transformer blocks to FP8Linear, in place (same
    parameters, same state_dict). Returns how many layers were switched. Layers with a
    dimension that is not a multiple of 16 (tiny gates such as ve_gate, 12 -> n_kv_head)
    stay bf16: FP8 matmuls need multiples of 16, and such layers cost nothing anyway."""
    device = next(model.parameters()).device
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"FP8 training runs on CUDA GPUs (and slowly on the CPU), not on {device.type}. Train without --fp8.")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"FP8 training needs FP8 tensor cores (compute capability 8.9+: H100, H200, L4, RTX 4090); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Train without --fp8.")
    n = 0
    for module in model.blocks.modules():
        if type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0:
            module.__class__ = FP8Linear
            n += 1
    return n
