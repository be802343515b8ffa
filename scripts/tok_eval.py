"""
Compare compression (bytes per token) of our tokenizer against GPT-2's and GPT-4's
tiktoken encodings on several kinds of text: prose, Python, C++, math, other
languages, and documents from the train and val shards.

    python -m scripts.tok_eval
"""

import argparse
import inspect
import textwrap

import tiktoken

from nanochat.common import print0
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import get_tokenizer
from nanochat.report import get_report

parser = argparse.ArgumentParser(description="Tokenizer compression table (higher bytes/token is better)")
parser.add_argument("--data_dir", default=None, help="parquet shards for the train/val rows (default: $NANOCHAT_DATA_DIR or downloads)")
args = parser.parse_args()

prose = """The tokenizer is the first and the last stage of a language model. It turns text into
a sequence of integers and back, and the model never sees anything else. A good
tokenizer spends its vocabulary on the strings that occur most often, so that a
sentence like this one costs as few tokens as possible, which in turn means the
model can read more text in the same context window and learn faster per step."""

cpp = r"""#include <vector>
#include <algorithm>

template <typename T>
class RingBuffer {
public:
    explicit RingBuffer(std::size_t capacity) : data_(capacity), head_(0), size_(0) {}

    void push(const T& value) {
        data_[(head_ + size_) % data_.size()] = value;
        if (size_ < data_.size()) { ++size_; } else { head_ = (head_ + 1) % data_.size(); }
    }

    [[nodiscard]] std::size_t size() const noexcept { return size_; }

private:
    std::vector<T> data_;
    std::size_t head_, size_;
};

int main() {
    RingBuffer<int> rb(4);
    for (int i = 0; i < 10; ++i) rb.push(i * i);
    return static_cast<int>(rb.size());
}
"""

math = r"""Let $f(x) = \sum_{n=0}^{\infty} \frac{x^n}{n!}$. Then $f'(x) = f(x)$ and $f(0) = 1$,
so $f(x) = e^x$. For the matrix $A = \begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}$,
$\det A = 1 \cdot 4 - 2 \cdot 3 = -2$ and $\operatorname{tr} A = 5$."""

multilingual = """Der schnelle braune Fuchs springt über den faulen Hund. 素早い茶色の狐がのろまな犬を飛び越える。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. Быстрая коричневая лиса перепрыгивает через ленивую собаку."""

python_src = textwrap.dedent(inspect.getsource(textwrap))  # real Python, present everywhere

texts = [("prose", prose), ("python", python_src), ("c++", cpp), ("math", math), ("multilingual", multilingual)]
for split in ("train", "val"):
    try:
        docs = next(parquets_iter_batched(split, args.data_dir))
        texts.append((f"{split}-shard", "\n".join(docs[:16])))
    except (FileNotFoundError, StopIteration) as e:
        print0(f"(no {split} shard sample: {e})")

encoders = {"ours": lambda t, tok=get_tokenizer(): tok.encode(t)}
for name, tk in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
    try:
        enc = tiktoken.get_encoding(tk)
        encoders[name] = enc.encode_ordinary
    except Exception as e:  # tiktoken fetches these files from the internet on first use
        print0(f"{name} ({tk}) could not be loaded, so it is left out of the table: {type(e).__name__}: {str(e)[:120]}")

ours_vocab = get_tokenizer().get_vocab_size()
print0(f"\nbytes per token (higher is better); our vocab: {ours_vocab:,}")
header = f"{'text':<14}{'bytes':>9}" + "".join(f"{n + ' tok':>12}{n + ' b/t':>10}" for n in encoders)
print0(header)
print0("-" * len(header))
results = {}
for label, text in texts:
    nbytes = len(text.encode("utf-8"))
    row = f"{label:<14}{nbytes:>9,}"
    for name, encode in encoders.items():
        ntok = len(encode(text))
        results[(label, name)] = nbytes / ntok
        row += f"{ntok:>12,}{nbytes / ntok:>10.2f}"
    print0(row)

get_report().log(section="Tokenizer evaluation", data=[{f"{l} {n} bytes/token": round(v, 3) for (l, n), v in results.items()}])
