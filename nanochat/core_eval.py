"""
The CORE metric for base models, from DCLM: Li et al. 2024, "DataComp-LM: In search of
the next generation of training sets for language models" (arXiv:2406.11794), as nanochat
uses it.

The metric. CORE is a suite of in-context-learning (ICL) tasks (22 in the DCLM eval
bundle). For each task we measure accuracy, then center it against the task's random
baseline (given in percent in eval_meta_data.csv):

    centered = (acc - 0.01 * random_baseline) / (1 - 0.01 * random_baseline)

so that chance scores 0 and a perfect model 1. CORE is the mean of the centered
accuracies over the tasks.

Three task types, as in the DCLM bundle's jsonl schemas:

- multiple_choice  {"query", "choices", "gold"}: one context, several continuations.
  Each option is the prompt followed by one choice; the prediction is the choice whose
  tokens have the lowest mean cross-entropy loss.
- schema  {"context_options", "continuation", "gold"}: several contexts, one
  continuation (Winograd style). The prediction is the context after which the shared
  continuation has the lowest mean loss.
- language_modeling  {"context", "continuation"}: correct iff the greedy (argmax)
  prediction at every continuation position equals the continuation token.

Prompts. An example is preceded by `num_fewshot` other examples of the same task,
sampled with random.Random(1234 + idx) from all examples but the example itself (so
every run and every rank sees the same prompts). Each few-shot example is rendered with
its correct answer as "<context><continuation_delimiter><answer>" and followed by a blank
line ("\\n\\n"); then comes the example itself, "<context><continuation_delimiter><option>".
For language_modeling the context is stripped of surrounding whitespace and the prompt
without the continuation is stripped too, so the delimiter (usually a space) goes with
the continuation's first token. Rendering is plain string formatting.

Scoring. Every option is tokenized with a leading BOS. The scored span is what the
options do not share: the tokens after the options' common prefix (multiple_choice), the
common suffix (schema), or the tokens after the prompt without the continuation
(language_modeling). Sequences longer than model.config.sequence_len are cropped from
the left (the end is kept) and the span shifted with them. All options of one example go
through the model in one forward pass, right-padded with BOS (the model is causal, so
padding never changes a real position's logits and only real positions are read).

The bundle (eval_bundle.zip, ~25MB) holds core.yaml (the `icl_tasks` list),
eval_meta_data.csv (random baselines) and eval_data/<dataset_uri>.jsonl files;
ensure_eval_bundle() downloads and unpacks it atomically.
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import get_base_dir, get_dist_info, print0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234   # few-shot examples of example idx come from random.Random(FEWSHOT_SEED + idx)
SHUFFLE_SEED = 1337   # each task's examples are shuffled once, so --max_per_task takes a random subset
FEWSHOT_SEPARATOR = "\n\n"

# -----------------------------------------------------------------------------
# The arithmetic


def centered_accuracy(acc, random_baseline):
    """Accuracy rescaled so that chance (random_baseline, in percent) is 0 and perfect is 1."""
    b = 0.01 * random_baseline
    if b >= 1.0:
        raise ValueError(f"random baseline {random_baseline}% leaves nothing to center against")
    return (acc - b) / (1.0 - b)


def core_metric(centered_results):
    """CORE: the mean of the centered accuracies ({label: centered} or a list)."""
    values = list(centered_results.values()) if isinstance(centered_results, dict) else list(centered_results)
    if not values:
        raise ValueError("CORE needs at least one task")
    return sum(values) / len(values)

# -----------------------------------------------------------------------------
# Prompts


def sample_fewshot(data, idx, num_fewshot):
    """The few-shot examples for data[idx]: num_fewshot others, chosen deterministically."""
    n = min(num_fewshot, len(data) - 1)
    if n <= 0:
        return []
    pool = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(pool, n)]


def _fewshot_block(shots):
    return "".join(s + FEWSHOT_SEPARATOR for s in shots)


def render_prompts_mc(item, continuation_delimiter, fewshot_examples=()):
    """One prompt per choice: the few-shot block, then query + delimiter + choice."""
    head = _fewshot_block(f"{ex['query']}{continuation_delimiter}{ex['choices'][ex['gold']]}"
                          for ex in fewshot_examples)
    return [f"{head}{item['query']}{continuation_delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=()):
    """One prompt per context option: the few-shot block, then option + delimiter + continuation."""
    head = _fewshot_block(f"{ex['context_options'][ex['gold']]}{continuation_delimiter}{ex['continuation']}"
                          for ex in fewshot_examples)
    return [f"{head}{ctx}{continuation_delimiter}{item['continuation']}" for ctx in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=()):
    """Two prompts: [without the continuation (stripped), with it]."""
    head = _fewshot_block(f"{ex['context'].strip()}{continuation_delimiter}{ex['continuation']}"
                          for ex in fewshot_examples)
    without = f"{head}{item['context'].strip()}{continuation_delimiter}"
    return [without.strip(), f"{without}{item['continuation']}"]


RENDERERS = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
             "language_modeling": render_prompts_lm}


def render_prompts(item, task_meta, fewshot_examples=()):
    task_type = task_meta["task_type"]
    if task_type not in RENDERERS:
        raise ValueError(f"unknown ICL task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
    return RENDERERS[task_type](item, task_meta.get("continuation_delimiter", " "), fewshot_examples)

# -----------------------------------------------------------------------------
# Token sequences and the span to score in each


def _common_prefix_len(seqs):
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == seqs[0][i] for s in seqs):
        i += 1
    return i


def _common_suffix_len(seqs):
    return _common_prefix_len([s[::-1] for s in seqs])


def batch_sequences(tokenizer, prompts, task_type):
    """Tokenize the prompts (BOS first) and find the scored span [start, end) of each
    sequence. Returns (token lists, starts, ends). Every span holds at least one token
    and starts at 1 or later (a token is scored by the logits of the position before it)."""
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    shortest = min(len(t) for t in tokens)
    if task_type == "multiple_choice":
        # options differ only after the shared prompt; if one option is a prefix of
        # another, still score its last token rather than nothing
        start = min(_common_prefix_len(tokens), shortest - 1)
        starts, ends = [start] * len(tokens), [len(t) for t in tokens]
    elif task_type == "schema":
        suffix = min(_common_suffix_len(tokens), shortest - 1)
        starts, ends = [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    elif task_type == "language_modeling":
        without, with_ = tokens
        # normally `without` is a prefix of `with_`; if BPE merged across the boundary,
        # score from the first token where they differ
        start = min(_common_prefix_len([without, with_]), len(with_) - 1)
        tokens, starts, ends = [with_], [start], [len(with_)]
    else:
        raise ValueError(f"unknown ICL task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
    return tokens, starts, ends


def crop_to_max_len(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of each sequence and shift its span with it. A span
    that no longer fits loses its first tokens (start is clamped to 1)."""
    if max_len is None:
        return tokens, starts, ends
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: need at least 2 tokens to score one")
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - max_len)
        out_t.append(t[cut:])
        out_e.append(e - cut)
        out_s.append(max(1, s - cut))
    return out_t, out_s, out_e


def stack_sequences(tokens, pad_token_id):
    """Right-pad the sequences to one length into a (B, T) int64 tensor."""
    T = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), T), pad_token_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return ids

# -----------------------------------------------------------------------------
# Evaluation


def _max_seq_len(model):
    return getattr(getattr(model, "config", None), "sequence_len", None)


@torch.no_grad()
def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """Is the model right on data[idx]? task_meta: {"task_type", "num_fewshot",
    "continuation_delimiter"}."""
    item = data[idx]
    task_type = task_meta["task_type"]
    fewshot = sample_fewshot(data, idx, task_meta.get("num_fewshot", 0))
    prompts = render_prompts(item, task_meta, fewshot)
    tokens, starts, ends = batch_sequences(tokenizer, prompts, task_type)
    tokens, starts, ends = crop_to_max_len(tokens, starts, ends, _max_seq_len(model))
    ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)
    logits = model(ids)
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(ids.shape)}; "
                         "expected (B, T, vocab)")
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        predicted = logits[0, s - 1:e - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, ids[0, s:e]))
    # token j is predicted by the logits at j - 1, so the span [s, e) is scored by [s-1, e-1)
    mean_losses = [F.cross_entropy(logits[i, s - 1:e - 1].float(), ids[i, s:e]).item()
                   for i, (s, e) in enumerate(zip(starts, ends))]
    predicted = min(range(len(mean_losses)), key=mean_losses.__getitem__)
    return predicted == item["gold"]


@torch.no_grad()
def evaluate_task(model, tokenizer, data, device, task_meta, max_examples=None):
    """Mean accuracy on the first max_examples examples of data (all if None); few-shot
    examples are drawn from all of data. Under DDP rank r takes examples r, r+W, ... and
    the per-example results are summed over ranks."""
    n = len(data) if max_examples is None or max_examples < 0 else min(max_examples, len(data))
    if n == 0:
        raise ValueError("no examples to evaluate")
    _, rank, _, world_size = get_dist_info()
    correct = torch.zeros(n, dtype=torch.float32, device=device)
    for idx in range(rank, n, world_size):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta))
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.sum().item() / n

# -----------------------------------------------------------------------------
# The bundle: loading


def _load_yaml(path):
    try:
        import yaml
    except ImportError as e:
        raise ImportError("reading the eval bundle's core.yaml needs PyYAML: pip install pyyaml") from e
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_random_baselines(bundle_dir):
    """{task label: random baseline in percent} from eval_meta_data.csv."""
    path = os.path.join(bundle_dir, "eval_meta_data.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the column(s) {sorted(missing)} (has {reader.fieldnames})")
        return {row["Eval Task"]: float(row["Random baseline"]) for row in reader}


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_core_tasks(bundle_dir):
    """The CORE tasks of an unpacked bundle, in core.yaml order. Each is a dict with
    label, task_type, num_fewshot, continuation_delimiter, dataset_uri, random_baseline
    and data (the examples, shuffled once with a fixed seed)."""
    config = _load_yaml(os.path.join(bundle_dir, "core.yaml"))
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{bundle_dir}/core.yaml has no `icl_tasks` list")
    baselines = load_random_baselines(bundle_dir)
    tasks = []
    for entry in config["icl_tasks"]:
        label = entry["label"]
        task_type = entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise ValueError(f"task {label}: unknown icl_task_type {task_type!r}")
        if label not in baselines:
            raise ValueError(f"task {label} has no row in {bundle_dir}/eval_meta_data.csv")
        shots = entry.get("num_fewshot", [0])
        num_fewshot = int(shots[0] if isinstance(shots, (list, tuple)) else shots)
        data = load_jsonl(os.path.join(bundle_dir, "eval_data", entry["dataset_uri"]))
        random.Random(SHUFFLE_SEED).shuffle(data)
        tasks.append({"label": label, "task_type": task_type, "num_fewshot": num_fewshot,
                      "continuation_delimiter": entry.get("continuation_delimiter", " "),
                      "dataset_uri": entry["dataset_uri"], "random_baseline": baselines[label],
                      "data": data})
    return tasks


def evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1):
    """Evaluate every task of the bundle. Returns {"results": {label: accuracy},
    "centered_results": {label: centered accuracy}, "core_metric": CORE}."""
    results, centered = {}, {}
    for task in load_core_tasks(bundle_dir):
        t0 = time.time()
        acc = evaluate_task(model, tokenizer, task["data"], device, task,
                            max_examples=None if max_per_task < 0 else max_per_task)
        results[task["label"]] = acc
        centered[task["label"]] = centered_accuracy(acc, task["random_baseline"])
        print0(f"{task['label']:<35} ({task['num_fewshot']}-shot, {task['task_type']}): "
               f"accuracy {acc:.4f} | centered {centered[task['label']]:.4f} | {time.time() - t0:.1f}s")
    return {"results": results, "centered_results": centered, "core_metric": core_metric(centered)}

# -----------------------------------------------------------------------------
# The bundle: download


class EvalBundleError(ValueError):
    """The archive arrived whole but is not a usable eval bundle (retrying won't help)."""


def default_bundle_dir():
    return os.path.join(get_base_dir(), "eval_bundle")


def is_eval_bundle(directory):
    return (os.path.isfile(os.path.join(directory, "core.yaml"))
            and os.path.isfile(os.path.join(directory, "eval_meta_data.csv"))
            and os.path.isdir(os.path.join(directory, "eval_data")))


def ensure_eval_bundle(url=EVAL_BUNDLE_URL, dest_dir=None, max_attempts=5, backoff=2.0, timeout=60):
    """Make sure the eval bundle is unpacked at dest_dir (default
    $NANOCHAT_BASE_DIR/eval_bundle) and return that path. Nothing is fetched if it is
    already there. Otherwise the zip is downloaded to a temporary .zip.part file next to it
    (retried with exponential backoff), checked, extracted into a temporary directory next to
    dest_dir and renamed into place, so dest_dir only ever appears complete.
    `url` may also be a local path or file:// URL of the zip."""
    dest_dir = os.path.abspath(dest_dir or default_bundle_dir())
    if is_eval_bundle(dest_dir):
        return dest_dir
    if os.path.isdir(dest_dir) and os.listdir(dest_dir):
        if is_eval_bundle(dest_dir):  # another process renamed it into place between the two checks
            return dest_dir
        raise EvalBundleError(f"{dest_dir} exists but is not an eval bundle (no core.yaml, eval_meta_data.csv "
                              "and eval_data/); move it away or pass another --bundle_dir")
    os.makedirs(os.path.dirname(dest_dir), exist_ok=True)

    local = url[len("file://"):] if url.startswith("file://") else url
    if os.path.isfile(local):
        _extract_bundle(local, dest_dir, source=url)
        return dest_dir

    last_error = None
    for attempt in range(1, max_attempts + 1):
        if is_eval_bundle(dest_dir):  # another process (e.g. another node's rank) finished it meanwhile
            return dest_dir
        # a temp file of our own: processes fetching at once must not truncate each other's
        fd, part = tempfile.mkstemp(dir=os.path.dirname(dest_dir), prefix="." + os.path.basename(dest_dir) + ".",
                                    suffix=".zip.part")
        os.close(fd)
        try:
            _download(url, part, timeout)
            _extract_bundle(part, dest_dir, source=url)
            return dest_dir
        except EvalBundleError:
            raise
        except Exception as e:  # network errors, cut-off transfers, corrupt archives
            last_error = e
            if _is_client_error(e):
                break
            if attempt < max_attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
        finally:
            if os.path.exists(part):
                os.remove(part)
    raise RuntimeError(f"could not fetch the eval bundle from {url} after {attempt} attempt(s): {last_error}")


def _is_client_error(e):
    response = getattr(e, "response", None)
    return response is not None and 400 <= getattr(response, "status_code", 0) < 500


def _download(url, path, timeout):
    import requests
    with requests.get(url, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        with open(path, "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
        expected = r.headers.get("Content-Length")
    size = os.path.getsize(path)
    if expected is not None and size != int(expected):
        raise IOError(f"transfer cut off: got {size} of {expected} bytes")


def _extract_bundle(zip_path, dest_dir, source):
    """Check the archive, unpack it next to dest_dir, rename the bundle into place.
    Whatever fails, the temporary directory is removed."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dest_dir), prefix="." + os.path.basename(dest_dir) + ".tmp-")
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"member {bad} fails its CRC check")
                zf.extractall(tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise zipfile.BadZipFile(f"{source} is not a valid zip archive ({e})") from e
        root = _find_bundle_root(tmp)
        if root is None:
            raise EvalBundleError(f"{source} is a zip archive but not an eval bundle: no core.yaml, "
                                  "eval_meta_data.csv and eval_data/ at its top or in its single top folder")
        try:
            os.rename(root, dest_dir)  # atomic; also replaces an empty dest_dir
        except OSError:
            if not is_eval_bundle(dest_dir):  # another process may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find_bundle_root(directory):
    """The real zip holds one folder eval_bundle/; accept the files at the top as well."""
    if is_eval_bundle(directory):
        return directory
    entries = [e for e in os.listdir(directory) if e != "__MACOSX"]
    if len(entries) == 1 and is_eval_bundle(os.path.join(directory, entries[0])):
        return os.path.join(directory, entries[0])
    return None
