import pytest
"""Chat batches (packing, padding, resume) and chat evaluation on hand-made cases."""

import torch
import torch.nn as nn

from nanochat.chat_data import PackedConversations, PaddedConversations, pad_batch
from nanochat.chat_eval import chatcore, pass_at_k, pass_at_ks, run_categorical
from tasks.common import Task, render_mc


class Convs(Task):
    def __init__(self, convs, **kw):
        super().__init__(**kw)
        self.convs = convs

    def num_examples(self):
        return len(self.convs)

    def get_example(self, i):
        return self.convs[i]


def conv(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


CONVS = Convs([conv(f"question number {i}?", f"answer {i} " * (1 + i % 3)) for i in range(10)])


def test_packed_rows_train_only_on_assistant_tokens(tokenizer):
    loader = PackedConversations(CONVS, tokenizer, B=2, T=32, device="cpu", epochs=1)
    trained = []
    for x, y in loader:
        assert x.shape == y.shape == (2, 32)
        trained += [t for t in y.view(-1).tolist() if t >= 0]
    text = tokenizer.decode(trained)
    assert "answer 3" in text and "question" not in text


def test_packed_resume_continues_with_the_same_batches(tokenizer):
    a = PackedConversations(CONVS, tokenizer, B=1, T=8, device="cpu", epochs=None)
    for _ in range(3):
        next(a)
    b = PackedConversations(CONVS, tokenizer, B=1, T=8, device="cpu", epochs=None, state=a.state_dict())
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_ranks_split_examples(tokenizer):
    seen = [PaddedConversations(CONVS, tokenizer, B=1, max_len=64, device="cpu", rank=r, world_size=2)
            for r in (0, 1)]
    rows = [[tokenizer.decode(x[0].tolist()) for x, _ in loader] for loader in seen]
    assert len(rows[0]) == len(rows[1]) == 5
    assert "question number 0?" in rows[0][0] and "question number 1?" in rows[1][0]


def test_pad_batch_masks_padding(tokenizer):
    x, y = pad_batch([conv("hi", "a long answer here"), conv("hi", "ok")], tokenizer, 64, "cpu")
    assert x.shape == y.shape and x.shape[0] == 2
    short = tokenizer.render_conversation(conv("hi", "ok"))[0]
    assert (y[1, len(short) - 1:] == -1).all()  # nothing past the short row's end is trained
    assert tokenizer.decode([t for t in y[1].tolist() if t >= 0]).startswith("ok")


class LetterModel(nn.Module):
    """Logits that always prefer one letter's token at every position."""

    def __init__(self, token_id, vocab):
        super().__init__()
        self.wte = nn.Embedding(1, 1)
        self.token_id, self.vocab = token_id, vocab

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        logits[..., self.token_id] = 5.0
        return logits


class MC(Task):
    eval_type = "categorical"

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def num_examples(self):
        return len(self.answers)

    def get_example(self, i):
        letters = ["A", "B", "C", "D"]
        prompt = render_mc(f"question {i}" + " padding" * i, letters, ["w", "x", "y", "z"])
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": self.answers[i]}], "letters": letters}

    def evaluate(self, conversation, response):
        return int(response == conversation["messages"][-1]["content"])


def test_categorical_scoring_known_answer(tokenizer):
    (b_id,) = tokenizer.encode("B")
    model = LetterModel(b_id, tokenizer.get_vocab_size())
    task = MC(["B", "A", "B", "C", "B"])  # prompts of different lengths: padding must not matter
    assert run_categorical(task, tokenizer, model, batch_size=2, progress=False) == 3 / 5
    assert run_categorical(task, tokenizer, model, batch_size=2, max_problems=2, progress=False) == 1 / 2


def test_chatcore_centers_on_chance():
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.0}) == 0.0
    assert chatcore({"MMLU": 1.0, "HumanEval": 1.0}) == 1.0
    assert abs(chatcore({"MMLU": 0.5, "GSM8K": 0.5}) - (1 / 3 + 0.5) / 2) < 1e-12


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_policy_gradient_step_moves_sampled_tokens_the_advantage_way(advantage):
    """One SGD step on RL's loss raises log p of a row's sampled tokens when its advantage is
    positive and lowers it when negative (a sign error would do the opposite); the prompt
    and tool-forced positions (y = -1) get no gradient of their own."""
    from nanochat.chat_data import pad_rows, policy_gradient_loss
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    ids, mask = [1, 5, 9, 13, 17, 21, 25], [0, 0, 0, 1, 1, 0, 1]  # 3 sampled tokens, one forced
    x, y = pad_rows([(ids, mask)], 0, "cpu")
    assert (y != -1).sum() == 3

    def logp():
        with torch.no_grad():
            return -model(x, y, loss_reduction="none").sum().item()
    before = logp()
    loss = policy_gradient_loss(model, x, y, torch.tensor([[advantage]]), num_trained=3)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = logp()
    assert (after - before) * advantage > 0, (before, after)
    assert loss.item() * advantage > 0  # = advantage * mean nll of the sampled tokens


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),
    (5, 2, 1, 0.4),  # c/n
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 1, 4, 1.0),  # n - c < k: every draw holds the right one
    (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow():
    from fractions import Fraction
    from math import comb
    exact = 1 - Fraction(comb(1990, 500), comb(2000, 500))  # C(2000, 500) is far beyond a float
    assert pass_at_k(2000, 10, 500) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    assert pass_at_ks(1) == [1] and pass_at_ks(20) == [1, 10, 20] and pass_at_ks(100) == [1, 10, 100]
