"""
TPU training with torch_xla SPMD: a (data, model) device mesh, a Megatron-style tensor
parallel plan applied from outside the model, XLA gradient checkpointing and the Pallas
flash attention. The model code stays plain PyTorch; this file only annotates tensors.

SPMD (GSPMD, Xu et al. 2021; the PyTorch/XLA SPMD user guide, torch_xla 2.9): one
process drives every chip of the host. Tensors are annotated with a partition spec over
a named mesh (xs.mark_sharding) and XLA's partitioner inserts the collectives, so a
sharded program computes what the unsharded one does: the plan changes the layout and
the communication, never the math (the CPU XLA tests check losses against one device).

The mesh is (data, model) = (devices / tp, tp). The plan (Megatron-LM, Shoeybi et al.
2019: column-parallel first matmul, row-parallel second, one all-reduce per pair), by
module role, for a weight (out, in):
- column ("model", None): attention c_q, c_k/c_v (when the kv heads divide by tp; else
  replicated, as Megatron does with fewer kv heads than ranks), MLP c_fc, Mamba-3's
  z_proj and x_proj (their rows are head-major, so the split is by heads), lm_head
  (vocab-parallel: it splits the (B, T, vocab) logits, the largest activation at 64K);
- row (None, "model"): attention, MLP and Mamba-3 c_proj;
- value embeddings (vocab, kv dim) (None, "model") when the kv heads divide by tp: split
  by heads like c_v's output, so a lookup lands where v is (no communication);
- replicated: the token embedding, value embeddings whose kv heads do not divide, and
  Engram's tables (lookups of a replicated table need no communication; small next to the blocks),
  Engram's w_k/w_v and conv, mHC's Phi and scalars, DSA's lightning indexer (it reads
  the full hidden state and makes one small score matrix), Mamba-3's B/C and control
  projections and per-head vectors, MTP's projection, and every scalar. The MTP modules'
  own blocks get the attention/MLP plan above.
Shards that do not divide evenly are padded by XLA: still exact, only less even.

Inputs are sharded on the data axis, so --device_batch_size is per data-parallel slice
and a micro-batch has device_batch_size * (devices / tp) rows.

XLA flash attention: torch_xla.experimental.custom_kernel.flash_attention wraps JAX's
Pallas TPU kernel; its sm_scale defaults to 1.0, so it is passed 1/sqrt(head_dim) here
(the SDPA paths' scale). Its SPMD wrapper maps the kernel over shards of
partition_spec and rebuilds the global shape as local shape * mesh axis size, so the
heads must divide by tp and the rows by the data axis: that, not SPMD, is why a model
whose heads do not divide by tp cannot use --xla_flash_attn (layout() checks it).
"""

import math

import torch

DATA, MODEL = "data", "model"
COLUMN, ROW = (MODEL, None), (None, MODEL)


def require_xla():
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        raise SystemExit("--device_type=xla needs torch_xla: uv sync --extra tpu (docs/TPU_SETUP.md)")


def make_mesh(tp):
    """The (data, model) mesh over every device of the host, data-major (devices
    i * tp .. i * tp + tp - 1 form one tensor-parallel group), set as the global mesh."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    n = xr.global_runtime_device_count()
    if tp < 1 or n % tp:
        raise SystemExit(f"--tensor_parallel={tp} must divide the {n} XLA devices (e.g. 1, 2, 4, 8 on a v6e-8)")
    mesh = xs.Mesh(np.arange(n), (n // tp, tp), (DATA, MODEL))
    xs.set_global_mesh(mesh)
    return mesh


def layout(config, tp, data=1, rows=None, flash=False):
    """The divisibility rules for tensor parallelism of degree tp (and data parallelism
    over `data` slices of `rows` rows): a list of (what, count, divides, consequence).
    Raises ValueError for a layout that cannot run: tp that is not positive, rows that do
    not split over the data axis, or the flash kernel with heads that do not divide."""
    from nanochat.gpt import layer_plan, padded_vocab
    if tp < 1:
        raise ValueError(f"tensor parallel degree {tp} must be at least 1")
    kinds = {s.mixer for s in layer_plan(config)}
    items = [("query heads (c_q, c_proj)", config.n_head, "padded shards: exact, less even"),
             ("kv heads (c_k, c_v)", config.n_kv_head, "replicated instead of sharded"),
             ("MLP width (c_fc, c_proj)", 4 * config.n_embd, "padded shards: exact, less even"),
             ("vocab rows (lm_head)", padded_vocab(config), "padded shards: exact, less even")]
    if "mamba3" in kinds:
        H = config.mamba3_expand * config.n_embd // config.mamba3_headdim
        items.append(("Mamba-3 heads (z/x_proj, c_proj)", H, "padded shards: a head split over two devices"))
    table = [(what, n, n % tp == 0, "" if n % tp == 0 else why) for what, n, why in items]
    if rows is not None and rows % data:
        raise ValueError(f"{rows} rows per micro-batch do not split over the {data} data-parallel slices")
    if flash and config.n_head % tp:
        raise ValueError(f"--xla_flash_attn with --tensor_parallel={tp}: the {config.n_head} heads must divide by "
                         f"{tp} (the kernel's SPMD wrapper rebuilds the global shape as local shape * {tp}); "
                         "pick a tp that divides the heads, or drop --xla_flash_attn (plain SPMD pads)")
    return table


def format_layout(table, tp):
    return "\n".join(f"tp={tp}: {what} = {n}: " + ("divides" if ok else f"does not divide ({why})")
                     for what, n, ok, why in table)


def sharding_plan(model, tp):
    """{parameter name: partition spec} for every parameter of `model` (a GPT), by
    module role; None = replicated."""
    from nanochat.attention import CausalSelfAttention
    from nanochat.gpt import MLP
    from nanochat.mamba3 import Mamba3
    roles = {}
    for prefix, m in model.named_modules():
        p = prefix + "." if prefix else ""
        if isinstance(m, CausalSelfAttention):  # DSA's SparseAttention too; its indexer stays replicated
            kv = COLUMN if m.n_kv_head % tp == 0 else None
            roles.update({p + "c_q.weight": COLUMN, p + "c_k.weight": kv, p + "c_v.weight": kv,
                          p + "c_proj.weight": ROW})
            if m.has_ve:  # (vocab, kv dim) split on its columns, by heads as c_v's output: its lookup lands
                # where v is, no communication, and 1/tp of the table (with AdamW's two moments ~7 GB a chip at d24)
                roles[p + "ve.weight"] = ROW if kv else None
        elif isinstance(m, MLP):
            roles.update({p + "c_fc.weight": COLUMN, p + "c_proj.weight": ROW})
        elif isinstance(m, Mamba3):
            roles.update({p + "z_proj.weight": COLUMN, p + "x_proj.weight": COLUMN, p + "c_proj.weight": ROW})
    roles["lm_head.weight"] = COLUMN
    return {name: roles.get(name) for name, _ in model.named_parameters()}


def shard_model(model, mesh, tp):
    """Annotate every parameter of `model` (on the XLA device) with its plan's spec."""
    import torch_xla.distributed.spmd as xs
    plan = sharding_plan(model, tp)
    for name, p in model.named_parameters():
        xs.mark_sharding(p, mesh, plan[name] or (None,) * p.dim())
    return plan


def shard_optimizer_states(optimizers, model, mesh, plan):
    """Annotate the optimizers' state as its parameters are (plan: shard_model's): a tensor
    shaped as its parameter (AdamW's moments) gets the parameter's spec, a stack of a Muon
    group's matrices (its momentum) the specs' stack where the group's matrices share one.
    A resume loads the state unannotated, which XLA keeps whole on every chip (at d24 a
    replicated copy of the moments) until a step's output sharding replaces it. The rest
    (step counts, NorMuon's row statistics) stays as it is."""
    import torch_xla.distributed.spmd as xs
    names = {p: n for n, p in model.named_parameters()}
    for opt in optimizers:
        for group in opt.param_groups:
            specs = {plan[names[p]] or (None,) * p.dim() for p in group["params"]}
            for p in group["params"]:
                spec = plan[names[p]] or (None,) * p.dim()  # (replicated ones marked so, as shard_model does)
                for t in opt.state.get(p, {}).values():
                    if torch.is_tensor(t) and t.shape == p.shape:
                        xs.mark_sharding(t, mesh, spec)
                    elif torch.is_tensor(t) and t.shape[1:] == p.shape and len(specs) == 1:
                        xs.mark_sharding(t, mesh, (None, *spec))


def shard_batch(t, mesh):
    """Rows of a (B, T) batch on the data axis, replicated over the model axis."""
    import torch_xla.distributed.spmd as xs
    xs.mark_sharding(t, mesh, (DATA,) + (None,) * (t.dim() - 1))
    return t


def sharding_of(t):
    """XLA's sharding string of a tensor ('' when unannotated), e.g.
    '{devices=[4,1,2]0,4,1,5,2,6,3,7 last_tile_dim_replicate}'."""
    import torch_xla
    return torch_xla._XLAC._get_xla_sharding_spec(t)


def expected_sharding(mesh, spec, ndim):
    """The sharding string that mark_sharding gives a tensor of ndim dims with spec."""
    import torch_xla
    import torch_xla.distributed.spmd as xs
    t = torch.zeros((mesh.mesh_shape[0] * mesh.mesh_shape[1],) * ndim, device=torch_xla.device())
    xs.mark_sharding(t, mesh, spec or (None,) * ndim)
    return sharding_of(t)


def checkpoint_block(block, x, ctx):
    """GPT.run_block under gradient checkpointing on XLA: torch_xla's checkpoint (its
    optimization barriers keep XLA from merging the recomputation back into the forward).
    It is the reentrant kind, whose forward runs without grad, so losses that a block adds
    (DSA's indexer loss) are returned as outputs to keep their graph (Context.losses_out)."""
    from torch_xla.utils.checkpoint import checkpoint
    y, *aux = checkpoint(ctx.losses_out(block), x, use_reentrant=True)
    ctx.aux_losses.extend(aux)
    return y


def flash_unavailable():
    """Why the Pallas flash kernel cannot run here (None when it can): it needs a TPU and jax."""
    import torch_xla.core.xla_model as xm
    hw = xm.xla_device_hw(xm.xla_device())
    if hw != "TPU":
        return f"the XLA device is {hw}, and the Pallas kernel runs only on a TPU"
    try:
        import jax  # noqa: F401
    except ImportError:
        return "jax is not installed (pip install 'torch_xla[pallas]', docs/TPU_SETUP.md)"
    return None


class FlashAttention:
    """The attention callable for Context.flash: causal, softmax scale 1/sqrt(head_dim),
    kv heads expanded to the query heads (the kernel has no GQA), partitioned as
    (data, model, None, None) over the mesh. `kernel`: torch_xla's flash_attention, or a
    function with its signature (tests check our call against SDPA on the CPU)."""

    def __init__(self, mesh=None, kernel=None):
        if kernel is None:
            from torch_xla.experimental.custom_kernel import flash_attention as kernel
        self.mesh, self.kernel = mesh, kernel

    def __call__(self, q, k, v):
        if k.size(1) != q.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        if self.mesh is not None and q.size(0) % dict(zip(self.mesh.axis_names, self.mesh.mesh_shape))[DATA]:
            # a batch the data axis does not divide (CORE's rows, a sampling prefill's 1): the
            # kernel's shard_map would rebuild the global batch as local x axis size (1 -> 2)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        spec = None if self.mesh is None else (DATA, MODEL, None, None)
        return self.kernel(q, k, v, causal=True, sm_scale=1.0 / math.sqrt(q.size(-1)), partition_spec=spec,
                           mesh=self.mesh)


def to_cpu(obj):
    """obj (nested dicts/lists of tensors, e.g. a state dict) with every tensor copied to
    the CPU: a sharded XLA tensor comes back whole, so checkpoints have the GPU format."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def markdown_table(depths=(16, 24, 32, 48), tps=(1, 2, 4, 8)):
    """docs/TENSOR_PARALLELISM.md's table: the default model of each depth (plus Mamba-3
    heads of a hybrid), what divides by each tp; python -m nanochat.tpu prints it."""
    from nanochat.gpt import GPT
    lines = ["| depth | n_embd | heads | MLP width | Mamba-3 heads | " + " | ".join(f"tp={t}" for t in tps) + " |",
             "|---|---|---|---|---|" + "---|" * len(tps)]
    for d in depths:
        config = GPT.config_for_depth(d, mamba_pattern="AAM")
        cells = []
        for t in tps:
            uneven = [what.split(" (")[0] + (" replicated" if "replicated" in why else " padded")
                      for what, _, ok, why in layout(config, t) if not ok]
            try:
                layout(config, t, flash=True)
                flash = ""
            except ValueError:
                flash = "; no --xla_flash_attn"
            cells.append((", ".join(uneven) or "even") + flash)
        H = config.mamba3_expand * config.n_embd // config.mamba3_headdim
        lines.append(f"| {d} | {config.n_embd} | {config.n_head} | {4 * config.n_embd} | {H} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
