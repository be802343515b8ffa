"""
Reinforcement learning on GSM8K, as nanochat does it: a simple on-policy policy gradient.

    python -m scripts.chat_rl                                       # one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl
    python -m scripts.chat_rl --device_type=cpu --examples_per_step=2 --num_samples=4 \
        --max_new_tokens=32 --num_iterations=3 --eval_every=-1     # CPU

Each step, for each of --examples_per_step training problems (split across ranks):
sample --num_samples completions with the engine (tool use on), reward each 1 or 0 by
the final answer, and take advantage = reward - mean reward of the problem's group (no
division by the std, no KL term, no clipping: the samples are fresh from the current
policy, so the ratio is 1). The loss is -(sum of advantage x log p(sampled token)) over
sampled tokens, divided by their number, the end token of a completion that stopped
included (nanochat's leaves it out, so stopping was never rewarded or discouraged); tokens
forced by the tool are not trained.
Every --eval_every steps, pass@k on GSM8K test for k = 1..--eval_num_samples.
"""

import argparse
import time

import torch

from nanochat.chat_data import pad_rows, policy_gradient_loss
from nanochat.checkpoint_manager import (checkpoint_dir, load_previous_stage, resume_stage, save_checkpoint,
                                         warn_earlier_run)
from nanochat.common import (autocast_for, autodetect_device_type, compute_cleanup, compute_init, init_wandb,
                             print0, synchronize)
from nanochat.engine import Engine
from nanochat.report import get_report
from tasks.gsm8k import GSM8K

parser = argparse.ArgumentParser(description="RL on GSM8K with a group-mean baseline policy gradient")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device_type", default="", help="cuda|mps|cpu (default: autodetect; XLA/TPU: base_train only)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--source", default="sft", help="stage to start from: base|mid|sft|rl")
parser.add_argument("--model_tag", default=None, help="model to start from (default: the largest)")
parser.add_argument("--model_step", type=int, default=None, help="its checkpoint step (default: the last)")
parser.add_argument("--examples_per_step", type=int, default=16, help="problems per optimizer step (all ranks)")
parser.add_argument("--num_samples", type=int, default=16, help="completions sampled per problem")
parser.add_argument("--device_batch_size", type=int, default=8, help="sequences per forward/backward pass")
parser.add_argument("--max_new_tokens", type=int, default=256)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--top_k", type=int, default=50)
parser.add_argument("--num_epochs", type=int, default=1)
parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: num_epochs over GSM8K train)")
parser.add_argument("--embedding_lr", type=float, default=0.2)
parser.add_argument("--unembedding_lr", type=float, default=0.004)
parser.add_argument("--matrix_lr", type=float, default=0.02)
parser.add_argument("--init_lr_frac", type=float, default=0.05, help="start at this fraction of the base lrs, decay to 0")
parser.add_argument("--eval_every", type=int, default=60, help="pass@k on GSM8K test every N steps (-1: only at the end)")
parser.add_argument("--eval_examples", type=int, default=400)
parser.add_argument("--eval_num_samples", type=int, default=4, help="report pass@1 .. pass@this")
parser.add_argument("--save_every", type=int, default=60, help="checkpoint every N steps (-1: only at the end)")
parser.add_argument("--resume_from_step", type=int, default=-1, help="resume this stage's checkpoint (0: latest)")
args = parser.parse_args()
user_config = vars(args).copy()

device_type = autodetect_device_type(args.device_type, xla=False, script="chat_rl")  # (TPU: base_train only)
ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
autocast = autocast_for(device_type)
wandb_run = init_wandb(args.run, "nanochat-rl", user_config)

model, tokenizer, source_meta = load_previous_stage(args.source, device, args.model_tag, args.model_step)
model_tag = source_meta["model_tag"]
engine = Engine(model, tokenizer)
train_task = GSM8K(subset="main", split="train")
val_task = GSM8K(subset="main", split="test", stop=args.eval_examples)
if args.examples_per_step % world_size:
    raise SystemExit(f"--examples_per_step={args.examples_per_step} must be a multiple of the {world_size} processes")
per_rank = args.examples_per_step // world_size
num_iterations = (args.num_iterations if args.num_iterations > 0
                  else max(1, len(train_task) * args.num_epochs // args.examples_per_step))
print0(f"from {args.source}/{model_tag} step {source_meta['step']}; {num_iterations} steps of "
       f"{args.examples_per_step} problems x {args.num_samples} samples")
optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * args.init_lr_frac,
                                    embedding_lr=args.embedding_lr * args.init_lr_frac,
                                    matrix_lr=args.matrix_lr * args.init_lr_frac)
ckpt_dir = checkpoint_dir("rl", model_tag)
step = 0
if args.resume_from_step < 0:
    warn_earlier_run(ckpt_dir, f"to keep it: move {ckpt_dir} away first", print0)
if args.resume_from_step >= 0:
    step, _, _ = resume_stage(ckpt_dir, args.resume_from_step, model, optimizers, rank, world_size, num_iterations)
    print0(f"resumed {ckpt_dir} at step {step}")


def problem_index(step, j):
    """The j-th problem of this rank at a step: a pure function of the step, so a
    resumed run picks up exactly where the interrupted one was."""
    return ((step * args.examples_per_step) + rank + j * world_size) % len(train_task)


def answer(row):
    return tokenizer.decode([t for t in row if t not in engine.stop_tokens])


def sample(conv, n, seed, temperature):
    """n completions of one problem: (prompt ids, [completion ids], [tool masks], [rewards]).
    A completion that stopped ends with its stop token (trained: stopping is one of the
    sampled choices that the reward reinforces or discourages)."""
    prompt = tokenizer.render_for_completion(conv)
    model.eval()
    with autocast:
        rows, masks = engine.generate_batch(prompt, num_samples=n, max_tokens=args.max_new_tokens,
                                            temperature=temperature, top_k=args.top_k, seed=seed, keep_stop=True)
    model.train()
    rewards = [train_task.reward(conv, answer(row)) for row in rows]
    return prompt, rows, masks, rewards


@torch.no_grad()
def evaluate_pass_at_k():
    """pass@k for k = 1..eval_num_samples on the validation problems (sampled at T=1)."""
    k = args.eval_num_samples
    hits = torch.zeros(k + 1, dtype=torch.float64, device=device)  # hits[0] counts problems
    for i in range(rank, len(val_task), world_size):
        conv = val_task[i]
        _, rows, _, _ = sample(conv, k, seed=10_000 + i, temperature=1.0)
        right = [val_task.evaluate(conv, answer(r)) for r in rows]
        hits[0] += 1
        for j in range(1, k + 1):
            hits[j] += any(right[:j])
    if ddp:
        torch.distributed.all_reduce(hits)
    return {f"pass@{j}": (hits[j] / hits[0].clamp(min=1)).item() for j in range(1, k + 1)}


metrics, reward_curve = {}, []
while True:
    last_step = step == num_iterations
    if args.eval_every > 0 and (last_step or step % args.eval_every == 0) or (last_step and args.eval_every <= 0):
        metrics = evaluate_pass_at_k()
        print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
        wandb_run.log({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
    if step > 0 and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
        save_checkpoint(ckpt_dir, step, model.state_dict(), {"optimizers": [o.state_dict() for o in optimizers]},
                        {"step": step, "model_config": model.config.to_dict(), "user_config": user_config,
                         "source": args.source, "source_step": source_meta["step"], "metrics": metrics,
                         "num_iterations": num_iterations}, rank)
    if last_step:
        break

    synchronize(device_type)
    t0 = time.time()
    # 1) roll out: sequences, which of their tokens to train on, and their advantages
    seqs, rewards_all = [], []
    for j in range(per_rank):
        idx = problem_index(step, j)
        prompt, rows, masks, rewards = sample(train_task[idx], args.num_samples, seed=step * 100_003 + idx,
                                              temperature=args.temperature)
        mean = sum(rewards) / len(rewards)
        for row, mask, r in zip(rows, masks, rewards):
            seqs.append((prompt + row, [0] * len(prompt) + mask, r - mean))
        rewards_all += rewards
    # 2) policy gradient: -(advantage * log p) over sampled tokens, in device-sized batches
    num_trained = max(1, sum(sum(m[1:]) for _, m, _ in seqs))
    for start in range(0, len(seqs), args.device_batch_size):
        batch = seqs[start:start + args.device_batch_size]
        x, y = pad_rows([(ids, mask) for ids, mask, _ in batch], tokenizer.get_bos_token_id(), device)
        adv = torch.tensor([[a] for _, _, a in batch], dtype=torch.float32, device=device)
        with autocast:
            loss = policy_gradient_loss(model, x, y, adv, num_trained)
        loss.backward()
    lrm = 1.0 - step / num_iterations
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    stats = torch.tensor([sum(rewards_all), len(rewards_all)], dtype=torch.float64, device=device)
    if ddp:
        torch.distributed.all_reduce(stats)
    mean_reward = (stats[0] / stats[1]).item()
    synchronize(device_type)
    step += 1
    print0(f"step {step:05d}/{num_iterations:05d} | mean reward: {mean_reward:.4f} | lrm: {lrm:.3f} | "
           f"sequences: {len(seqs)} | dt: {1000 * (time.time() - t0):.0f}ms")
    reward_curve.append((step, mean_reward))
    wandb_run.log({"step": step, "train/reward": mean_reward, "train/lrm": lrm})

report = get_report()
report.log(section="Chat RL", data=[user_config, {"num_iterations": num_iterations, **metrics}])
report.log_curve("rl", "mean reward", reward_curve)
wandb_run.finish()
compute_cleanup()
