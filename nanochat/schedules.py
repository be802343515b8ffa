"""
Per-step schedules of base_train: the learning-rate multiplier, Muon's momentum and
Muon's weight decay. Pure functions of the step, so they are tested directly
(tests/test_optim.py) rather than through a training run.
"""

import math


def lr_multiplier(it, num_iterations, warmup, warmdown_ratio, final_lr_frac):
    """Linear warmup over `warmup` steps, constant, then linear warmdown over the last
    round(warmdown_ratio * num_iterations) steps, the last one (it = num_iterations - 1)
    at exactly final_lr_frac. (The reference nanochat's formula stops one step short.)"""
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it < num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - 1 - it) / warmdown  # (warmdown-1)/warmdown -> 0
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it, num_iterations, schedule="legacy", warmdown_ratio=0.2):
    """legacy: 0.85 -> 0.95 over the first 300 steps. ref (reference nanochat 2026): 0.85 ->
    0.97 over the first 400 steps, then from the warmdown's start down to 0.90 at its end
    (while both would apply the ramp wins, as in the reference)."""
    if schedule == "legacy":
        frac = min(it / 300, 1.0)
        return (1 - frac) * 0.85 + frac * 0.95
    if schedule != "ref":
        raise ValueError(f"unknown momentum schedule {schedule!r}")
    warmdown = round(warmdown_ratio * num_iterations)
    if it < 400:
        return 0.85 + (0.97 - 0.85) * it / 400
    if it >= num_iterations - warmdown:
        return 0.97 + (0.90 - 0.97) * (it - (num_iterations - warmdown)) / warmdown
    return 0.97


def muon_weight_decay(it, num_iterations, weight_decay, schedule="constant"):
    """constant, or cosine from weight_decay at step 0 to 0 at the end (reference nanochat)."""
    if schedule == "constant":
        return weight_decay
    if schedule != "cosine":
        raise ValueError(f"unknown weight decay schedule {schedule!r}")
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def scaled_weight_decay(weight_decay, batch_tokens, horizon_tokens, ref_horizon_tokens, ref_batch_tokens=2**19):
    """The reference nanochat's transfer of a d12-tuned weight decay to another batch B and
    horizon D, keeping the decay's timescale: lambda * sqrt(B / B_ref) * (D_ref / D)."""
    return weight_decay * (batch_tokens / ref_batch_tokens) ** 0.5 * (ref_horizon_tokens / horizon_tokens)
