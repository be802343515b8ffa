"""
AdamW (Loshchilov & Hutter 2019) for the embedding, the unembedding and any
non-matrix parameters, split across DDP ranks in the ZeRO-2 manner (Rajbhandari et
al. 2020): each rank keeps optimizer state for, and updates, one slice of each
parameter.

Per parameter slice, at step t, with gradient g (averaged over ranks):
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Distributed: a parameter whose first dimension divides by the world size is
reduce-scattered along it, updated slice by slice, then all-gathered; anything else
(small tensors) is all-reduced and updated whole on every rank. With one process no
communication happens and this is plain AdamW.
"""

import torch

from nanochat.common import all_gather_into, all_reduce_mean, reduce_scatter_mean, world_size


class DistAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        W = world_size()
        rank = torch.distributed.get_rank() if W > 1 else 0
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:  # not trained this step (DSA's warm-up trains only the indexers)
                    continue
                sliced = W > 1 and p.size(0) % W == 0
                if sliced:
                    n = p.size(0) // W
                    g = p.grad.new_empty((n,) + p.shape[1:])
                    reduce_scatter_mean(g, p.grad)
                    p_slice = p[rank * n:(rank + 1) * n]
                else:
                    g = p.grad
                    all_reduce_mean(g)
                    p_slice = p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p_slice)
                    state["exp_avg_sq"] = torch.zeros_like(p_slice)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.lerp_(g.square(), 1 - b2)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p_slice.mul_(1 - group["lr"] * group["weight_decay"])
                p_slice.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** t))
                if sliced:
                    all_gather_into(p, p_slice.clone())
