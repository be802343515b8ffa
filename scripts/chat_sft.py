"""
Supervised finetuning: train on whole conversations, one per row (padded, not packed),
with the loss only on the assistant's tokens (the mask from render_conversation).

    python -m scripts.chat_sft                                      # one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
    python -m scripts.chat_sft --device_type=cpu --device_batch_size=2 --target_examples_per_step=4 \
        --num_iterations=10                                         # CPU

The mixture (nanochat's): ARC-Easy and ARC-Challenge train, GSM8K train, 10K SmolTalk
conversations, the identity conversations, 300 SimpleSpelling and 300 SpellingBee.
As it goes it reports the validation loss (SmolTalk test) and, every
--eval_metrics_every steps, MMLU and ARC-Easy accuracy.
"""

import argparse
import time

import torch

from nanochat.chat_data import PaddedConversations
from nanochat.chat_eval import run_categorical
from nanochat.checkpoint_manager import (checkpoint_dir, load_previous_stage, resume_stage, save_checkpoint,
                                         warn_earlier_run)
from nanochat.common import (autocast_for, autodetect_device_type, compute_cleanup, compute_init, init_wandb,
                             max_memory_allocated_mib, print0, synchronize)
from nanochat.report import get_report
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import IDENTITY_FILE, CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

parser = argparse.ArgumentParser(description="Supervised finetuning of a chat model")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device_type", default="", help="cuda|mps|cpu (default: autodetect; XLA/TPU: base_train only)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--source", default="mid", help="stage to start from: base|mid|sft|rl")
parser.add_argument("--model_tag", default=None, help="model to start from (default: the largest)")
parser.add_argument("--model_step", type=int, default=None, help="its checkpoint step (default: the last)")
parser.add_argument("--device_batch_size", type=int, default=4, help="conversations per device per micro-step")
parser.add_argument("--max_seq_len", type=int, default=-1, help="longest conversation kept (default: the model's context)")
parser.add_argument("--target_examples_per_step", type=int, default=32, help="conversations per optimizer step")
parser.add_argument("--num_epochs", type=int, default=1)
parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: num_epochs over the mixture)")
parser.add_argument("--embedding_lr", type=float, default=0.2)
parser.add_argument("--unembedding_lr", type=float, default=0.004)
parser.add_argument("--matrix_lr", type=float, default=0.02)
parser.add_argument("--init_lr_frac", type=float, default=0.02, help="start at this fraction of the base lrs, decay to 0")
parser.add_argument("--eval_every", type=int, default=100, help="val loss every N steps (-1: only at the end)")
parser.add_argument("--eval_steps", type=int, default=100, help="batches per val loss evaluation")
parser.add_argument("--eval_metrics_every", type=int, default=200, help="MMLU / ARC-Easy accuracy every N steps (-1: off)")
parser.add_argument("--eval_metrics_max_problems", type=int, default=1024)
parser.add_argument("--save_every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
parser.add_argument("--resume_from_step", type=int, default=-1, help="resume this stage's checkpoint (0: latest)")
parser.add_argument("--smoltalk_examples", type=int, default=10_000)
parser.add_argument("--simple_spelling", type=int, default=300)
parser.add_argument("--spelling_bee", type=int, default=300)
parser.add_argument("--identity_file", default=IDENTITY_FILE, help="JSONL conversations about who the model is")
args = parser.parse_args()
user_config = vars(args).copy()

device_type = autodetect_device_type(args.device_type, xla=False, script="chat_sft")  # (TPU: base_train only)
ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
autocast = autocast_for(device_type)
wandb_run = init_wandb(args.run, "nanochat-sft", user_config)

model, tokenizer, source_meta = load_previous_stage(args.source, device, args.model_tag, args.model_step)
model_tag = source_meta["model_tag"]
max_len = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
examples_per_micro = args.device_batch_size * world_size
if args.target_examples_per_step % examples_per_micro:
    raise SystemExit(f"--target_examples_per_step={args.target_examples_per_step} must be a multiple of "
                     f"device_batch_size * world_size = {examples_per_micro}")
grad_accum = args.target_examples_per_step // examples_per_micro
optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * args.init_lr_frac,
                                    embedding_lr=args.embedding_lr * args.init_lr_frac,
                                    matrix_lr=args.matrix_lr * args.init_lr_frac)

train_task = TaskMixture([
    ARC(subset="ARC-Easy", split="train"),
    ARC(subset="ARC-Challenge", split="train"),
    GSM8K(subset="main", split="train"),
    SmolTalk(split="train", stop=args.smoltalk_examples),
    CustomJSON(args.identity_file),
    SimpleSpelling(size=args.simple_spelling, split="train"),
    SpellingBee(size=args.spelling_bee, split="train"),
])
val_task = SmolTalk(split="test")
num_iterations = (args.num_iterations if args.num_iterations > 0
                  else max(1, len(train_task) * args.num_epochs // args.target_examples_per_step))
print0(f"from {args.source}/{model_tag} step {source_meta['step']}; {len(train_task):,} conversations; "
       f"{num_iterations} steps of {args.target_examples_per_step} ({grad_accum} accumulation steps)")

ckpt_dir = checkpoint_dir("sft", model_tag)
step, loader_state, meta = 0, None, {}
if args.resume_from_step < 0:
    warn_earlier_run(ckpt_dir, f"to keep it: move {ckpt_dir} away first", print0)
if args.resume_from_step >= 0:
    step, rank_state, meta = resume_stage(ckpt_dir, args.resume_from_step, model, optimizers, rank, world_size,
                                     num_iterations)
    loader_state = rank_state["loader"]
    print0(f"resumed {ckpt_dir} at step {step}")
# epochs=None: the loader cycles; num_iterations decides when to stop, the same on every rank
train_loader = PaddedConversations(train_task, tokenizer, args.device_batch_size, max_len, device, rank,
                                   world_size, epochs=None, state=loader_state)


def lr_multiplier(it):
    return 1.0 - it / num_iterations


@torch.no_grad()
def val_loss():
    loader = PaddedConversations(val_task, tokenizer, args.device_batch_size, max_len, device, rank, world_size,
                                 epochs=None)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(args.eval_steps):
        x, y = next(loader)
        with autocast:
            losses = model(x, y, loss_reduction="none").view(-1)
        valid = y.view(-1) >= 0
        total += torch.stack([(losses.double() * valid).sum(), valid.sum().double()])
    if ddp:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


metrics, val, loss_curve = meta.get("metrics", {}), meta.get("val_loss"), []
while True:
    last_step = step == num_iterations
    if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
        model.eval()
        val = val_loss()
        print0(f"step {step:05d} | val loss: {val:.6f}")
        wandb_run.log({"step": step, "val/loss": val})
        model.train()
    if args.eval_metrics_every > 0 and (last_step or (step > 0 and step % args.eval_metrics_every == 0)):
        model.eval()
        with autocast:
            metrics = {name: run_categorical(task, tokenizer, model, args.device_batch_size * 2,
                                             args.eval_metrics_max_problems, rank, world_size, progress=False)
                       for name, task in [("MMLU", MMLU(subset="all", split="test")),
                                          ("ARC-Easy", ARC(subset="ARC-Easy", split="test"))]}
        print0(f"step {step:05d} | " + " | ".join(f"{k} acc: {v:.4f}" for k, v in metrics.items()))
        wandb_run.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        model.train()
    if step > 0 and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
        save_checkpoint(ckpt_dir, step, model.state_dict(),
                        {"optimizers": [o.state_dict() for o in optimizers], "loader": train_loader.state_dict()},
                        {"step": step, "model_config": model.config.to_dict(), "user_config": user_config,
                         "source": args.source, "source_step": source_meta["step"], "val_loss": val,
                         "metrics": metrics, "num_iterations": num_iterations}, rank)
    if last_step:
        break

    synchronize(device_type)
    t0 = time.time()
    num_tokens = torch.zeros((), dtype=torch.long, device=device)
    for micro in range(grad_accum):
        x, y = next(train_loader)
        with autocast:  # mean over the batch's trained tokens; 0, not NaN, if it has none (all cut off)
            n = (y >= 0).sum().clamp(min=1)
            loss, main_loss, mtp_loss = (l / n for l in model(x, y, loss_reduction="sum", return_parts=True))
        (loss / grad_accum).backward()
        num_tokens += (y >= 0).sum()
    lrm = lr_multiplier(step)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    train_loss = main_loss.item()  # the main loss; with MTP the modules' own is logged beside it
    if ddp:
        torch.distributed.all_reduce(num_tokens)
    synchronize(device_type)
    step += 1
    print0(f"step {step:05d}/{num_iterations:05d} | loss: {train_loss:.6f} | "
           + (f"mtp_loss: {mtp_loss.item():.6f} | " if model.config.mtp else "") + f"lrm: {lrm:.4f} | "
           f"trained tokens: {num_tokens.item():,} | dt: {1000 * (time.time() - t0):.0f}ms")
    loss_curve.append((step, train_loss))
    wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/num_tokens": num_tokens.item()})

print0(f"peak memory: {max_memory_allocated_mib(device_type):.0f} MiB")
report = get_report()
report.log(section="Chat SFT", data=[user_config, {"num_iterations": num_iterations, "conversations": len(train_task),
                                                   "val_loss": val, **metrics}])
report.log_curve("sft", "train loss", loss_curve)
wandb_run.finish()
compute_cleanup()
