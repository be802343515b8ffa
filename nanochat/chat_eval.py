"""
Evaluating a chat model on tasks (used by scripts/chat_eval.py, chat_sft and chat_rl).

- Categorical tasks (ARC, MMLU): no sampling. The prompt ends where the answer letter
  would start; the model's logits there are compared over the allowed letters only, and
  the highest wins. Batched, with right padding (the logits are read at each row's last
  real position, so padding never matters).
- Generative tasks (GSM8K, HumanEval, SpellingBee, HumanEval-cpp, MBPP-cpp): the engine
  samples n = num_samples completions per example (with the Python tool on), the task
  checks them. From the c right ones, pass@k for k <= n is the unbiased estimator of
  Chen et al. 2021 (pass_at_k), averaged over the examples; "accuracy" is pass@n, an
  example solved when any sample is right. A task with evaluate_batch (the C++ tasks)
  gets all its samples at once, so that it compiles and runs them in parallel.
- ChatCORE: the mean over tasks of centered accuracy (acc - baseline) / (1 - baseline),
  the baseline being random guessing (0.25 for four choices, 0 for generative tasks),
  so 0 means chance and 1 means perfect, as in the CORE metric for base models.

With several processes, rank r evaluates examples r, r + world, ... and the counts are
summed across ranks.
"""

import torch
import torch.distributed as dist
from tqdm import tqdm

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0, "HumanEval-cpp": 0.0, "MBPP-cpp": 0.0}


def _sum_across_ranks(*values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _indices(task, max_problems, rank, world_size):
    n = len(task) if max_problems is None else min(len(task), max_problems)
    return range(rank, n, world_size)


@torch.no_grad()
def run_categorical(task, tokenizer, model, batch_size=8, max_problems=None, rank=0, world_size=1,
                    progress=True):
    """Accuracy of picking the right letter by the logits at the answer position."""
    device = model.wte.weight.device
    indices = _indices(task, max_problems, rank, world_size)
    letter_ids = {}
    correct = total = 0
    bos = tokenizer.get_bos_token_id()
    batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    for batch in tqdm(batches, desc=type(task).__name__, disable=not progress or rank != 0):
        convs = [task[i] for i in batch]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        width = max(len(p) for p in prompts)
        x = torch.full((len(prompts), width), bos, dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p)
        logits = model(x.to(device))  # (B, T, V)
        for i, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    ids = tokenizer.encode(letter)
                    if len(ids) != 1:
                        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens; categorical "
                                         "evaluation needs each letter to be one token")
                    letter_ids[letter] = ids[0]
            scores = logits[i, len(p) - 1, [letter_ids[l] for l in letters]]
            predicted = letters[int(scores.argmax())]
            correct += task.evaluate(conv, predicted)
            total += 1
    correct, total = _sum_across_ranks(correct, total, device=device)
    return correct / max(total, 1)


def pass_at_k(n, c, k):
    """Unbiased estimate of pass@k from n samples of which c are right (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn from the n without
    replacement include a right one. Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i),
    since the binomials overflow floats for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every draw of k holds a right sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_ks(num_samples):
    """The k reported for n samples: 1, 10, 100 where <= n, and n."""
    return sorted({k for k in (1, 10, 100) if k <= num_samples} | {num_samples})


@torch.no_grad()
def run_generative(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                   max_problems=None, rank=0, world_size=1, progress=True, completion=False):
    """{"accuracy": pass@n, "pass@k": ... for k in pass_at_ks(n)} over the examples; for
    the C++ tasks also "statuses": the share of samples per way they ended (passed,
    compile_error, timeout, crash, wrong_answer). completion=True (base models; tasks with evaluate_batch(..., completion=True), the C++
    ones): the prompt is the example's raw "prompt" text after <|bos|>, continued as is."""
    device = engine.device
    indices = _indices(task, max_problems, rank, world_size)
    ks = pass_at_ks(num_samples)
    batched = hasattr(task, "evaluate_batch")
    if completion and not batched:
        raise ValueError(f"{type(task).__name__} has no completion-style scoring (evaluate_batch(..., completion=True))")
    sums = [0.0] * len(ks)
    total = 0
    if batched:
        from nanochat.cpp_exec import STATUSES
    statuses = [0] * len(STATUSES) if batched else []
    pending = []  # (conversation, responses) waiting for evaluate_batch
    bar = tqdm(indices, desc=type(task).__name__, disable=not progress or rank != 0)

    def count(c):
        nonlocal total
        for j, k in enumerate(ks):
            sums[j] += pass_at_k(num_samples, c, k)
        total += 1

    for i in bar:
        conv = task[i]
        prompt = (tokenizer.encode(conv["prompt"], prepend="<|bos|>") if completion
                  else tokenizer.render_for_completion(conv))
        rows, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=i)
        responses = [tokenizer.decode(row) for row in rows]
        if batched:
            pending.append((conv, responses))
            continue
        count(sum(task.evaluate(conv, r) for r in responses))
        bar.set_postfix(acc=f"{sums[-1] / total:.3f}")
    if pending:  # compile/run every sample of every example in one parallel batch
        convs = [c for c, rs in pending for _ in rs]
        responses = [r for _, rs in pending for r in rs]
        results = (task.evaluate_batch(convs, responses, completion=True) if completion
                   else task.evaluate_batch(convs, responses))
        for j in range(len(pending)):
            count(sum(r.passed for r in results[j * num_samples:(j + 1) * num_samples]))
        statuses = [sum(r.status == st for r in results) for st in STATUSES]
    summed = _sum_across_ranks(*sums, total, *statuses, device=device)
    sums, total, statuses = summed[:len(ks)], summed[len(ks)], summed[len(ks) + 1:]
    out = {f"pass@{k}": v / max(total, 1) for k, v in zip(ks, sums)}
    out["accuracy"] = out[f"pass@{num_samples}"]
    if batched:
        out["statuses"] = {st: c / max(sum(statuses), 1) for st, c in zip(STATUSES, statuses)}
    return out


def chatcore(results):
    """Mean centered accuracy over the tasks in `results` ({task name: accuracy})."""
    centered = [(acc - BASELINES[name]) / (1 - BASELINES[name]) for name, acc in results.items()]
    return sum(centered) / len(centered)
