"""
Bits per byte: a tokenizer-independent loss.

    bpb = sum over predicted tokens of loss_nats(token) / (ln 2 * sum of token_bytes(target))

Mean cross-entropy per token depends on how many bytes a token holds, so models with
different vocabularies can't be compared on it; per byte they can. Special tokens
(0 bytes) and ignored targets (-1) count in neither sum.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Mean bits per byte over `steps` batches of (inputs, targets). Sums over DDP ranks."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").view(-1)
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        counted = nbytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += nbytes.sum().to(torch.int64)
        if device.type == "xla":  # run this batch's graph now: one graph, compiled once for every batch and
            import torch_xla      # every `steps`, not all steps unrolled into one graph (compiled anew per count)
            torch_xla.sync()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
