"""
Batches of conversations for the chat stages.

- Midtraining packs: conversations are rendered (Tokenizer.render_conversation) and laid
  end to end into rows of T+1 tokens, as pretraining does with documents; targets that
  the mask says not to train on (user turns, tool outputs, BOS) become -1, the ignore
  index of the loss. A conversation may run across two rows, as in nanochat.
- SFT pads: one conversation per row, padded to the longest in the batch with -1
  targets, so every example is seen whole and on its own.

Both walk a task by a cursor (the next example index), so a checkpoint can store where
they were and a resumed run continues with the same examples. With several processes,
rank r takes examples r, r + world, r + 2*world, ...
"""

import torch


def _masked_targets(ids, mask):
    return [t if m else -1 for t, m in zip(ids, mask)]


class PackedConversations:
    """Iterator of (inputs, targets), each (B, T) long tensors on device, over a task
    packed into rows. `epochs` passes over the task (None: forever); `state_dict()`
    holds the cursor and the tokens already rendered but not yet used."""

    def __init__(self, task, tokenizer, B, T, device, rank=0, world_size=1, epochs=1, state=None):
        if len(task) == 0:
            raise ValueError(f"{type(task).__name__} has no examples to train on")
        self.task, self.tokenizer, self.B, self.T, self.device = task, tokenizer, B, T, device
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        state = state or {}
        self.cursor = state.get("cursor", rank)  # absolute example index over epochs
        self.ids, self.targets = state.get("ids", []), state.get("targets", [])

    def state_dict(self):
        return {"cursor": self.cursor, "ids": list(self.ids), "targets": list(self.targets)}

    def __iter__(self):
        return self

    def __next__(self):
        need = self.B * self.T + 1
        while len(self.ids) < need:
            if self.epochs is not None and self.cursor >= len(self.task) * self.epochs:
                raise StopIteration
            ids, mask = self.tokenizer.render_conversation(self.task[self.cursor % len(self.task)],
                                                           max_tokens=self.T + 1)
            self.ids += ids
            self.targets += _masked_targets(ids, mask)
            self.cursor += self.world_size
        ids = torch.tensor(self.ids[:need], dtype=torch.long)
        targets = torch.tensor(self.targets[:need], dtype=torch.long)
        # the last token of this batch is the first input of the next, as in pretraining
        self.ids, self.targets = self.ids[need - 1:], self.targets[need - 1:]
        x = ids[:-1].view(self.B, self.T)
        y = targets[1:].view(self.B, self.T)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def pad_rows(rows, pad_id, device):
    """(inputs, targets) from (token ids, mask) rows, one per row, right-padded. Targets
    are -1 where the mask is 0 and past each row's end; padding inputs are pad_id (any id
    works: their targets are -1 and they sit after the real tokens, so causal attention
    keeps them from touching the loss). Used by SFT and by RL's policy-gradient batches."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(_masked_targets(ids, mask)[1:])
    return x.to(device), y.to(device)


def pad_batch(conversations, tokenizer, max_len, device):
    """(inputs, targets) for a list of conversations, one per row, right-padded with BOS."""
    rows = [tokenizer.render_conversation(c, max_tokens=max_len + 1) for c in conversations]
    return pad_rows(rows, tokenizer.get_bos_token_id(), device)


class PaddedConversations:
    """Iterator of padded (inputs, targets) batches of B conversations each, over a task
    in order (rank-strided), for `epochs` passes (None: forever); resumable by its cursor."""

    def __init__(self, task, tokenizer, B, max_len, device, rank=0, world_size=1, epochs=1, state=None):
        if len(task) == 0:
            raise ValueError(f"{type(task).__name__} has no examples to train on")
        self.task, self.tokenizer, self.B, self.max_len, self.device = task, tokenizer, B, max_len, device
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.cursor = (state or {}).get("cursor", rank)

    def state_dict(self):
        return {"cursor": self.cursor}

    def __iter__(self):
        return self

    def __next__(self):
        end = float("inf") if self.epochs is None else len(self.task) * self.epochs
        if self.cursor >= end:
            raise StopIteration
        convs = []
        while len(convs) < self.B and self.cursor < end:
            convs.append(self.task[self.cursor % len(self.task)])
            self.cursor += self.world_size
        return pad_batch(convs, self.tokenizer, self.max_len, self.device)


def policy_gradient_loss(model, x, y, advantages, num_trained):
    """RL's loss for a batch of sampled rows: -(advantage * log p(sampled token)) summed over
    the trained positions (y != -1) and divided by num_trained (all trained tokens of the
    step, so batches add up to a mean). advantages: (B, 1), one per row. Minimising it
    raises the probability of rows that did better than their group and lowers the rest."""
    nll = model(x, y, loss_reduction="none").view(x.shape)  # -log p, 0 where y == -1
    return (nll.float() * advantages).sum() / num_trained
