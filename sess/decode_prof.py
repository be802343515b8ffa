# scratch: kernels per compiled decode step (no CUDA graph), attention vs AAM, d12 b1
import torch, sys
from torch.profiler import profile, ProfilerActivity
from nanochat.gpt import GPT, build_model
for pattern in ("", "AAM"):
    hybrid = dict(mamba_pattern=pattern, mamba3_qknorm=True, mamba3_bias=True, mamba3_complex_rope=True, mamba3_trapezoidal=True) if pattern else {}
    config = GPT.config_for_depth(12, vocab_size=32768, sequence_len=2048, **hybrid)
    model = build_model(config, torch.device("cuda")).to(torch.bfloat16).eval()
    cache = model.init_cache(1, 2048, device="cuda")
    step = torch.compile(model.decode_step, dynamic=False)
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda"); pos = torch.tensor(100, device="cuda")
    with torch.inference_mode():
        for _ in range(5): step(ids, cache, pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10): step(ids, cache, pos)
            torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_time_total > 0]
    n = sum(e.count for e in ev) / 10
    tot = sum(e.device_time_total for e in ev) / 10
    print(f"== pattern={pattern or 'attn'} kernels/step={n:.0f} gpu_us/step={tot:.1f}")
    for e in sorted(ev, key=lambda e: -e.device_time_total)[:25]:
        print(f"  {e.count/10:5.1f} x {e.device_time_total/10:8.1f}us  {e.key[:110]}")
