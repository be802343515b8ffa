import math

import torch

from nanochat.loss_eval import evaluate_bpb


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: its loss is ln V per token, exactly."""

    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*x.shape, self.V)
        return torch.nn.functional.cross_entropy(logits.view(-1, self.V), y.reshape(-1), ignore_index=-1,
                                                 reduction=loss_reduction)


def test_bpb_known_case():
    V = 16
    token_bytes = torch.tensor([0] + [1, 2, 3] * 5, dtype=torch.int32)  # token 0 is special: 0 bytes
    x = torch.zeros(2, 4, dtype=torch.long)
    y = torch.tensor([[1, 2, 3, 0], [4, -1, 5, 6]])  # one special target, one ignored target
    bpb = evaluate_bpb(UniformModel(V), iter([(x, y)] * 3), 3, token_bytes)
    counted = [1, 2, 3, 4, 5, 6]
    nbytes = sum(int(token_bytes[t]) for t in counted)
    assert math.isclose(bpb, len(counted) * math.log(V) / (math.log(2) * nbytes), rel_tol=1e-6)
    # a perfect byte-level model of 256 symbols costs exactly 8 bits per byte
    tb = torch.ones(256, dtype=torch.int32)
    y = torch.randint(0, 256, (2, 8))
    assert math.isclose(evaluate_bpb(UniformModel(256), iter([(y, y)]), 1, tb), 8.0, rel_tol=1e-6)
