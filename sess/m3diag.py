# scratch: Mamba-3 Triton kernels vs the torch chunked form on the GPU
import sys, torch
sys.path.insert(0, "tests")
from test_mamba3_triton import reference
from test_gpu import model_pair
from nanochat.mamba3_triton import ssd_rotated
from nanochat.mamba3 import set_mamba3_kernel
torch.manual_seed(0)
Bsz, T, H, P, N, A, chunk = 2, 1024, 8, 64, 128, 32, 64
dev = "cuda"
x, Bm, Cm = torch.randn(Bsz, T, H, P, device=dev), torch.randn(Bsz, T, N, device=dev), torch.randn(Bsz, T, N, device=dev)
bB, bC = torch.randn(H, N, device=dev), torch.randn(H, N, device=dev)
phi = 6 * torch.rand(Bsz, T, H, A, device=dev)
a = -0.05 * torch.rand(Bsz, T, H, device=dev)
w, wn = 0.1 * torch.rand(Bsz, T, H, device=dev), 0.1 * torch.rand(Bsz, T, H, device=dev)
s0 = torch.randn(Bsz, H, P, N, device=dev)
names = "x Bm Cm bB bC phi a w wn s0".split()
base = [x, Bm, Cm, bB, bC, phi, a, w, wn, s0]
def run(fn, dtype, autocast):
    ins = [t.to(dtype).detach().requires_grad_() if i < 3 else t.detach().clone().requires_grad_() for i, t in enumerate(base)]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y, f = fn(*ins, chunk)
    gy = torch.randn(y.shape, device=dev, generator=torch.Generator(dev).manual_seed(1))
    gf = torch.randn(f.shape, device=dev, generator=torch.Generator(dev).manual_seed(2))
    gs = torch.autograd.grad((y.double() * gy).sum() + (f.double() * gf).sum(), ins)
    return [y.double(), f.double()] + [g.double() for g in gs]
rel = lambda g, r: ((g - r).norm() / r.norm()).item()
# model level: per-parameter gradient rel error of each bf16 kernel against the fp32 torch form
_, gpu = model_pair("SSSL", recipe="hybrid_siso")
idx = torch.randint(0, 500, (2, 256), device="cuda")
runs = {}
for kernel, ac in [("torch", False), ("torch", True), ("triton", True)]:
    set_mamba3_kernel(gpu, kernel); torch._dynamo.reset(); gpu.zero_grad(set_to_none=True)
    with torch.amp.autocast("cuda", dtype=torch.bfloat16, enabled=ac):
        loss = torch.compile(gpu, dynamic=False)(idx, idx)
    loss.backward()
    runs[(kernel, ac)] = loss.item(), {n: p.grad.float().clone() for n, p in gpu.named_parameters() if p.grad is not None}
l0, g0 = runs[("torch", False)]
for key in [("torch", True), ("triton", True)]:
    l, g = runs[key]
    worst = sorted(((rel(g[n], g0[n]), n) for n in g0), reverse=True)[:8]
    print(key, f"loss {l:.5f} vs fp32 {l0:.5f}", " ".join(f"{n}={r:.3f}" for r, n in worst))
# a short training run on one batch, each kernel, bf16
for kernel in ("torch", "triton"):
    _, m = model_pair("SSSL", recipe="hybrid_siso"); set_mamba3_kernel(m, kernel); torch._dynamo.reset()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    cm = torch.compile(m, dynamic=False); losses = []
    for i in range(40):
        with torch.amp.autocast("cuda", dtype=torch.bfloat16):
            loss = cm(idx, idx)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); losses.append(loss.item())
    print(kernel, "train losses", " ".join(f"{v:.3f}" for v in losses[::5]), f"{losses[-1]:.3f}")
