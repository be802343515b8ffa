"""
Muon: MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024,
https://kellerjordan.github.io/posts/muon/), for the 2D weight matrices of the blocks.

For each matrix W with gradient G:
    B <- mu * B + (1 - mu) * G                 momentum (as an EMA, lerp)
    U <- (1 - mu) * G + mu * B                 Nesterov look-ahead
    O <- polar(U) ~= U (U^T U)^(-1/2)          orthogonalize: all singular values -> ~1
    W <- W * (1 - lr * wd) - lr * sqrt(max(1, rows/cols)) * O

polar() is approximated (in bf16 on CUDA, fp32 elsewhere) by 5 odd-polynomial iterations
    X <- a X + b (X X^T) X + c (X X^T)^2 X
with the per-step coefficients of Polar Express (Amsel, Persson, Musco & Gower 2025,
arXiv:2505.16932), the "polar express" variant nanochat and modded-nanogpt use. X is
first normalized by its Frobenius norm (times 1.02 as a safety margin) so every singular
value starts in (0, 1].

Options (off by default; the reference nanochat 2026 uses all of them):
- cautious_wd: decay only the entries where the update and the weight agree in sign,
  i.e. where the step already moves the weight toward zero (Cautious Weight Decay,
  Chen et al. 2025; reference nanochat);
- row_eq (MuonEq, arXiv:2603.28254): before orthogonalizing, scale each row of U to the
  mean row norm, so the spectrum entering the iteration is better conditioned;
- renorm (Muon+, arXiv:2602.21545): after it, set ||O||_F to sqrt(min(rows, cols)), the
  norm of an exactly semi-orthogonal matrix (corrects under-converged iterations);
- beta2 > 0 (NorMuon, arXiv:2510.05491): an EMA v of O's mean square per row (per column
  for wide matrices); O <- O / sqrt(v), rescaled to keep ||O||_F: evens out the update
  size across neurons.

Distributed: matrices of one shape are stacked and split among the ranks. Gradients
are reduce-scattered (averaged), each rank runs momentum + orthogonalization only for
the matrices it owns, and the updated matrices are all-gathered. With one process
the same code runs with no communication, so results match (tests/test_optim.py).
"""

import torch

from nanochat.common import all_gather_into, reduce_scatter_mean, world_size

POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G, steps=5, dtype=torch.bfloat16):
    """Approximate orthogonalization of a stack of matrices (..., m, n), in bf16
    (fp32 only for exactness tests)."""
    X = G.to(dtype)
    transpose = G.size(-2) > G.size(-1)
    if transpose:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transpose else X


_compiled_polar = None


def orthogonalize(G, steps=5, dtype=None):
    """torch.compile'd on CUDA (fuses the small elementwise ops), eager elsewhere.
    dtype None: bf16 on CUDA; fp32 elsewhere: the CPU has no fast bf16 matmul, and on
    XLA's CPU backend bf16 iterations lost accuracy (13% off the fp32 result, against
    3-4% on CUDA) and training went NaN by step 2 (TPU's own bf16 is to be measured)."""
    global _compiled_polar
    if dtype is None:
        dtype = torch.bfloat16 if G.device.type == "cuda" else torch.float32
    if G.is_cuda:
        if _compiled_polar is None:
            _compiled_polar = torch.compile(polar_express)
        return _compiled_polar(G, steps, dtype)
    return polar_express(G, steps, dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 ns_dtype=None, cautious_wd=False, beta2=0.0, row_eq=False, renorm=False):
        params = list(params)
        if any(p.dim() != 2 for p in params):
            raise ValueError("Muon is for 2D matrices only; give other parameters to AdamW")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        ns_dtype=ns_dtype, cautious_wd=cautious_wd, beta2=beta2, row_eq=row_eq, renorm=renorm)
        # one group per shape, so each group is stacked and orthogonalized in one batched call
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self):
        W = world_size()
        rank = torch.distributed.get_rank() if W > 1 else 0
        for group in self.param_groups:
            params = group["params"]
            if all(p.grad is None for p in params):  # not trained this step (DSA's warm-up)
                continue
            # a group may mix trained matrices with untrained ones of the same shape (RL's loss
            # leaves the MTP modules out): zeros stand in for the missing gradients, and those
            # matrices are not written back below (no update, no decay), as torch's optimizers
            # skip a None grad; their momentum, if any, decays by `momentum` this step
            trained = [p.grad is not None for p in params]
            n = -(-len(params) // W)  # matrices per rank (the last rank may have padding)
            grads = torch.stack([p.grad if t else torch.zeros_like(p) for p, t in zip(params, trained)])
            if n * W > len(params):
                grads = torch.cat([grads, grads.new_zeros((n * W - len(params),) + grads.shape[1:])])
            my_grads = grads.new_empty((n,) + grads.shape[1:])
            reduce_scatter_mean(my_grads, grads)
            mine = list(range(rank * n, min((rank + 1) * n, len(params))))
            new = torch.stack([p for p in params] + [params[0]] * (n * W - len(params)))
            if mine:
                g = my_grads[:len(mine)]
                state = self.state[params[mine[0]]]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
                if group["row_eq"]:
                    target = update.norm(dim=(-2, -1), keepdim=True) / update.size(-2) ** 0.5
                    update = update * (target / update.norm(dim=-1, keepdim=True).clamp_min(1e-6))
                O = orthogonalize(update, group["ns_steps"], group["ns_dtype"]).float()
                rows, cols = params[0].shape
                if group["renorm"]:
                    O = O * (min(rows, cols) ** 0.5 / O.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
                if group["beta2"] > 0:
                    O = self._normalize_variance(O, state, group["beta2"])
                mine_new = new[mine[0]:mine[-1] + 1]
                decay = group["lr"] * group["weight_decay"]
                if group["cautious_wd"]:
                    mine_new.sub_(decay * mine_new * ((O * mine_new) >= 0))  # O is subtracted: same sign = toward 0
                else:
                    mine_new.mul_(1 - decay)
                mine_new.add_(O.to(mine_new.dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)
            gathered = torch.empty_like(new)
            all_gather_into(gathered, new[rank * n:(rank + 1) * n])
            for i, p in enumerate(params):
                if trained[i]:
                    p.copy_(gathered[i])

    @staticmethod
    def _normalize_variance(O, state, beta2):
        """NorMuon: divide O by the running rms of each row (column, if wide), then rescale
        to O's own Frobenius norm, so only the shares between neurons change."""
        dim = -1 if O.size(-2) >= O.size(-1) else -2
        v_now = O.square().mean(dim=dim, keepdim=True)
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros_like(v_now)
        v = state["second_moment"]
        v.lerp_(v_now, 1 - beta2)
        scaled = O * v.clamp_min(1e-10).rsqrt()
        return scaled * (O.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
