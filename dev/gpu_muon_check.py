"""Polar Express on the GPU, eager and compiled, against the CPU (fp32 reference)."""
import torch
from nanochat.muon import orthogonalize, polar_express
torch.manual_seed(0)
for shape in [(4, 256, 512), (2, 512, 256), (3, 128, 128)]:
    G = torch.randn(shape)
    ref = polar_express(G, dtype=torch.float32)
    rel = lambda o: ((o.float().cpu() - ref).norm() / ref.norm()).item()
    print(shape, "cpu bf16", round(rel(polar_express(G)), 4), "| gpu eager", round(rel(polar_express(G.cuda())), 4),
          "| gpu compiled", round(rel(orthogonalize(G.cuda())), 4))
