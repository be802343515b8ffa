"""
Midtraining: teach the base model the chat format, tool use and multiple choice on a
mixture of conversations, packed into full rows as in pretraining.

    python -m scripts.mid_train                                     # one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train
    python -m scripts.mid_train --device_type=cpu --device_batch_size=4 --max_seq_len=256 \
        --total_batch_size=2048 --num_iterations=20                 # CPU

The mixture (nanochat's): SmolTalk conversations, MMLU auxiliary-train multiple choice,
GSM8K with calculator tool calls, the identity conversations (twice), SimpleSpelling and
SpellingBee. Validation: SmolTalk test, MMLU test (first 5200), GSM8K test (first 420).
The datasets load from the Hugging Face hub or from local copies (tasks/common.py).
"""

import argparse
import time

import torch

from nanochat.chat_data import PackedConversations
from nanochat.checkpoint_manager import (checkpoint_dir, load_previous_stage, resume_stage, save_checkpoint,
                                         warn_earlier_run)
from nanochat.common import (autocast_for, autodetect_device_type, compute_cleanup, compute_init, init_wandb,
                             max_memory_allocated_mib, print0, synchronize)
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from tasks.common import TaskMixture
from tasks.customjson import IDENTITY_FILE, CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

parser = argparse.ArgumentParser(description="Midtrain a base model on a conversation mixture")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device_type", default="", help="cuda|mps|cpu (default: autodetect; XLA/TPU: base_train only)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model (default: on for CUDA)")
parser.add_argument("--source", default="base", help="stage to start from: base|mid|sft|rl")
parser.add_argument("--model_tag", default=None, help="model to start from (default: the largest)")
parser.add_argument("--model_step", type=int, default=None, help="its checkpoint step (default: the last)")
parser.add_argument("--device_batch_size", type=int, default=32)
parser.add_argument("--max_seq_len", type=int, default=-1, help="row length (default: the model's context)")
parser.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step")
parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: one pass over the mixture)")
parser.add_argument("--embedding_lr", type=float, default=0.2)
parser.add_argument("--unembedding_lr", type=float, default=0.004)
parser.add_argument("--matrix_lr", type=float, default=0.02)
parser.add_argument("--init_lr_frac", type=float, default=1.0, help="start at this fraction of the base lrs")
parser.add_argument("--warmdown_ratio", type=float, default=0.2, help="linear decay to 0 over this last fraction")
parser.add_argument("--eval_every", type=int, default=150, help="val bpb every N steps (-1: only at the end)")
parser.add_argument("--eval_tokens", type=int, default=20 * 524288)
parser.add_argument("--save_every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
parser.add_argument("--resume_from_step", type=int, default=-1, help="resume this stage's checkpoint (0: latest)")
parser.add_argument("--simple_spelling", type=int, default=200_000, help="SimpleSpelling examples in the mixture")
parser.add_argument("--spelling_bee", type=int, default=80_000, help="SpellingBee examples in the mixture")
parser.add_argument("--identity_file", default=IDENTITY_FILE, help="JSONL conversations about who the model is")
args = parser.parse_args()
user_config = vars(args).copy()

device_type = autodetect_device_type(args.device_type, xla=False, script="mid_train")  # (TPU: base_train only)
ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
autocast = autocast_for(device_type)
wandb_run = init_wandb(args.run, "nanochat-mid", user_config)

model, tokenizer, source_meta = load_previous_stage(args.source, device, args.model_tag, args.model_step)
model_tag = source_meta["model_tag"]
T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
B = args.device_batch_size
tokens_per_micro = B * T * world_size
if args.total_batch_size % tokens_per_micro:
    raise SystemExit(f"--total_batch_size={args.total_batch_size} must be a multiple of device_batch_size * "
                     f"max_seq_len * world_size = {tokens_per_micro}")
grad_accum = args.total_batch_size // tokens_per_micro
print0(f"from {args.source}/{model_tag} step {source_meta['step']}; {tokens_per_micro:,} tokens per micro-step "
       f"x {grad_accum} accumulation steps")
optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * args.init_lr_frac,
                                    embedding_lr=args.embedding_lr * args.init_lr_frac,
                                    matrix_lr=args.matrix_lr * args.init_lr_frac)
adamw, muon = optimizers

train_task = TaskMixture([
    SmolTalk(split="train"),
    MMLU(subset="auxiliary_train", split="train"),
    GSM8K(subset="main", split="train"),
    CustomJSON(args.identity_file),
    CustomJSON(args.identity_file),  # twice: identity matters more than its size suggests
    SimpleSpelling(size=args.simple_spelling, split="train"),
    SpellingBee(size=args.spelling_bee, split="train"),
])
val_task = TaskMixture([
    SmolTalk(split="test"),
    MMLU(subset="all", split="test", stop=5200),
    GSM8K(subset="main", split="test", stop=420),
])
print0(f"mixture: {len(train_task):,} training conversations, {len(val_task):,} validation")

ckpt_dir = checkpoint_dir("mid", model_tag)
step, loader_state, meta = 0, None, {}
if args.resume_from_step < 0:
    warn_earlier_run(ckpt_dir, f"to keep it: move {ckpt_dir} away first", print0)
if args.resume_from_step >= 0:
    step, rank_state, meta = resume_stage(ckpt_dir, args.resume_from_step, model, optimizers, rank, world_size)
    loader_state = rank_state["loader"]
    print0(f"resumed {ckpt_dir} at step {step}")
# --num_iterations is honoured even when it is more than one pass (the mixture repeats);
# without it, one pass over the mixture
epochs = None if args.num_iterations > 0 else 1
train_loader = PackedConversations(train_task, tokenizer, B, T, device, rank, world_size, epochs=epochs,
                                   state=loader_state)
if args.num_iterations > 0:
    num_iterations = args.num_iterations
else:  # one pass: tokens in the mixture are unknown until rendered, so estimate from a sample
    sample = [len(tokenizer.render_conversation(train_task[i], max_tokens=T + 1)[0])
              for i in range(0, len(train_task), max(1, len(train_task) // 2000))]
    num_iterations = max(1, int(sum(sample) / len(sample) * len(train_task) / args.total_batch_size))
print0(f"training for {num_iterations:,} steps")

orig_model = model
if args.compile if args.compile >= 0 else device_type == "cuda":
    model = torch.compile(model, dynamic=False)
token_bytes = get_token_bytes(device=device)


def lr_multiplier(it):
    """Constant, then linear warmdown over the last `warmdown` steps to 0 at the last step."""
    warmdown = round(args.warmdown_ratio * num_iterations)
    return 1.0 if it < num_iterations - warmdown else (num_iterations - 1 - it) / warmdown


def checkpoint(step, loader_state):
    save_checkpoint(ckpt_dir, step, orig_model.state_dict(),
                    {"optimizers": [o.state_dict() for o in optimizers], "loader": loader_state},
                    {"step": step, "model_config": orig_model.config.to_dict(), "user_config": user_config,
                     "source": args.source, "source_step": source_meta["step"], "val_bpb": val_bpb}, rank)


val_bpb, loss_curve, bpb_curve = meta.get("val_bpb"), [], []
loader_state = train_loader.state_dict()
batch = next(train_loader, None)
while True:
    last_step = step >= num_iterations or batch is None
    if ddp:  # every rank must stop together, or the others wait for it in the optimizer
        flag = torch.tensor(float(last_step), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        last_step = bool(flag.item())
    if args.eval_every > 0 and (last_step or step % args.eval_every == 0) or (last_step and args.eval_every <= 0):
        model.eval()
        val_loader = PackedConversations(val_task, tokenizer, B, T, device, rank, world_size, epochs=None)
        with autocast:
            val_bpb = evaluate_bpb(model, val_loader, max(1, args.eval_tokens // tokens_per_micro), token_bytes)
        print0(f"step {step:05d} | val bpb: {val_bpb:.4f}")
        bpb_curve.append((step, val_bpb))
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        model.train()
    if step > 0 and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
        checkpoint(step, loader_state)
    if last_step:
        break

    synchronize(device_type)
    t0 = time.time()
    for micro in range(grad_accum):
        x, y = batch
        with autocast:  # mean over the batch's trained tokens; 0, not NaN, if it has none (long user turns cut off)
            n = (y >= 0).sum().clamp(min=1)
            loss, main_loss, mtp_loss = (l / n for l in model(x, y, loss_reduction="sum", return_parts=True))
        (loss / grad_accum).backward()
        loader_state = train_loader.state_dict()
        batch = next(train_loader, None)
        if batch is None:  # the mixture ran out mid-step: finish the step with what we have
            break
    lrm = lr_multiplier(step)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
    for opt in optimizers:
        opt.step()
    orig_model.zero_grad(set_to_none=True)
    train_loss = main_loss.item()
    synchronize(device_type)
    dt = time.time() - t0
    step += 1
    print0(f"step {step:05d}/{num_iterations:05d} | loss: {train_loss:.4f} | "
           + (f"mtp_loss: {mtp_loss.item():.4f} | " if orig_model.config.mtp else "") +
           f"lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | tok/sec: {args.total_batch_size / dt:,.0f}")
    loss_curve.append((step, train_loss))
    wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm})

print0(f"peak memory: {max_memory_allocated_mib(device_type):.0f} MiB; val bpb: {val_bpb:.4f}")
report = get_report()
report.log(section="Midtraining", data=[user_config, {"num_iterations": step, "val_bpb": val_bpb,
                                                      "conversations": len(train_task)}])
report.log_curve("mid", "train loss", loss_curve)
wandb_run.finish()
compute_cleanup()
