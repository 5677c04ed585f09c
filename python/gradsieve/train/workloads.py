"""Built-in training workloads of ``gradsieve-train``: data, model and evaluation, no download.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images), a small CNN.
* ``charlm``: a character-level transformer language model on the Python standard library's own
  source files (real text that ships with every Python). Sizes (``model_size``): ``tiny`` (the
  default, 0.12M parameters, 2 layers of width 64), ``small`` (2.5M), ``base`` (10.8M), ``large``
  (25.4M); on one CPU thread a step at batch 16 takes 15 ms, 0.19 s, 0.8 s and 1.8 s. Its
  embedding table gets sparse gradients: only the rows of characters in the batch move.
* ``textcls``: which of the standard-library files above (20 classes) a snippet of 64 words
  (identifiers, keywords, the words of comments and strings) comes from, by a fastText-style
  classifier: hashed unigrams and bigrams, the mean of their embeddings, a linear layer. The
  embedding table is over 99% of the parameters and its gradient is dense, so every step
  all-reduces the whole table while the compute stays a few milliseconds: the
  communication-bound case. Sizes: ``small`` (0.26M parameters), ``base`` (the default, 1.05M:
  4 MiB of fp32 gradient per step), ``large`` (4.2M), ``xl`` (16.8M).
* ``linreg``: distributed linear regression where each worker's data comes from its own true model
  drawn around a worker-specific mean, the heterogeneous setting used to study error feedback
  (always heterogeneous; the global optimum is known in closed form).
* ``cifar10``: ResNet-18 on CIFAR-10 from ``--data-dir`` (the python pickle batches of
  https://www.cs.toronto.edu/~kriz/cifar.html), which the user provides.

Every workload splits its training data across ranks, evenly by default; ``heterogeneous=True``
gives each rank a skewed mix (labels for the classifiers, ``textcls`` included; separate source
files for ``charlm``). Everything is deterministic given the seed. ``evaluate`` is cheap enough to
run every few steps (at the default sizes 0.16 s or less on one thread; charlm ``large`` 0.6 s).
``DEFAULTS`` holds each workload's training settings and the target of time-to-target.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pickle
import re
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

WORKLOADS = ("digits", "charlm", "textcls", "linreg", "cifar10")


class WorkloadError(ValueError):
    """A workload cannot run as asked (missing data, bad setting); the message says why."""


@dataclasses.dataclass
class Defaults:
    """A workload's training settings at its default model size, and the target of time-to-target:
    the held-out ``target_metric`` ("accuracy": reach at least ``target_value``; "loss": reach at
    most) that dense all-reduce training with these settings reaches at about 50-70% of ``steps``
    (digits: earlier, see the notes at DEFAULTS)."""

    steps: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    target_metric: str
    target_value: float


# Targets, from dense all-reduce runs of `gradsieve-train --compare none` (2 workers, seed 0, torch
# 2.13 CPU; evaluated every 20th of the run), first step at or past the target:
# * digits: 97% at step 200 of 2000. Its accuracy plateaus at 98.3% (354 of 360 images) from step
#   ~500 on (98.6% at the end), so the target sits below where the compressors end (97.2-98.1% in
#   the README's table), not at 50-70% of the run.
# * charlm: held-out loss 2.15 at step 195 of 300 (2.00 at the end).
# * textcls: 75% at step 70 of 150 (91, 91, 98 with seeds 1-3; 79-82% at the end).
# * linreg: gap 1.0 at step 300 of 500 (0.06 at the end).
# * cifar10: not measured (no CIFAR-10 on the development machine); 70% is an estimate for ~3 of
#   its ~5 epochs.
DEFAULTS: Dict[str, Defaults] = {
    "digits": Defaults(steps=2000, batch_size=32, lr=0.05, optimizer="sgd", momentum=0.9,
                       target_metric="accuracy", target_value=0.97),
    "charlm": Defaults(steps=300, batch_size=16, lr=3e-3, optimizer="adam", momentum=0.0,
                       target_metric="loss", target_value=2.15),
    "textcls": Defaults(steps=150, batch_size=64, lr=3e-3, optimizer="adam", momentum=0.0,
                        target_metric="accuracy", target_value=0.75),
    "linreg": Defaults(steps=500, batch_size=0, lr=0.01, optimizer="sgd", momentum=0.0,
                       target_metric="loss", target_value=1.0),
    "cifar10": Defaults(steps=2000, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9,
                        target_metric="accuracy", target_value=0.70),
}

# The model sizes each workload accepts as ``model_size`` (empty: it has one model), and the size it
# builds when given none.
MODEL_SIZES: Dict[str, Tuple[str, ...]] = {
    "digits": (),
    "charlm": ("tiny", "small", "base", "large"),
    "textcls": ("small", "base", "large", "xl"),
    "linreg": (),
    "cifar10": (),
}
DEFAULT_MODEL_SIZE: Dict[str, Optional[str]] = {"charlm": "tiny", "textcls": "base"}
# Learning rates of the sizes that train better with another one than DEFAULTS' (Adam; at 3e-3 the
# larger transformers stall near the loss of character frequencies: over their first 40-60 steps
# 1e-3 lowered the held-out loss faster for small, base and large).
MODEL_SIZE_LR: Dict[str, Dict[str, float]] = {"charlm": {"small": 1e-3, "base": 1e-3, "large": 1e-3}}


def defaults_for(name: str, model_size: Optional[str] = None) -> Defaults:
    """DEFAULTS[name] with the learning rate of ``model_size`` (None: the default size). The target
    was measured at the default size and the other sizes keep it: on textcls every size reaches 75%
    within 105 steps; for the larger charlm models it is unmeasured."""
    size = resolve_model_size(name, model_size)
    lr = MODEL_SIZE_LR.get(name, {}).get(size, DEFAULTS[name].lr)
    return dataclasses.replace(DEFAULTS[name], lr=lr)


class Workload:
    """One rank's view: its training shard, the model, a batch sampler and the evaluation."""

    name: str
    has_accuracy: bool = True
    model_size: Optional[str] = None  # the size built, for the workloads that have sizes

    @property
    def shard_size(self) -> int:
        """Training examples on this rank (for --epochs)."""
        raise NotImplementedError

    def model(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, generator: torch.Generator, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float(), target)

    def batch_accuracy(self, output: torch.Tensor, target: torch.Tensor) -> float:
        """Fraction of the batch's predictions that are right (classifiers and charlm)."""
        return (output.argmax(-1) == target).float().mean().item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> Tuple[float, Optional[float]]:
        """(loss, accuracy or None) on the held-out data, the same on every rank."""
        raise NotImplementedError


def _shard_indices(labels: torch.Tensor, rank: int, world: int, heterogeneous: bool,
                   seed: int, classes: int) -> torch.Tensor:
    """This rank's training examples. Even: a random 1/world of them. Heterogeneous: rank r draws
    80% of its examples from "its" classes (c % world == r, or c == r % classes when there are
    more ranks than classes) and 20% from the rest, same shard size on every rank."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if not heterogeneous or world == 1:
        return perm[rank::world]
    size = n // world
    mine = torch.tensor([(c % world == rank) if classes >= world else (c == rank % classes)
                         for c in range(classes)])
    own = perm[mine[labels[perm]]]
    other = perm[~mine[labels[perm]]]
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    take_own = min(len(own), int(0.8 * size))
    pick_own = own[torch.randperm(len(own), generator=g)[:take_own]]
    pick_other = other[torch.randperm(len(other), generator=g)[:size - take_own]]
    return torch.cat([pick_own, pick_other])


# --------------------------------------------------------------------------------------- digits
class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Digits(Workload):
    name = "digits"

    def __init__(self, rank: int, world: int, seed: int, heterogeneous: bool, data_dir: Optional[str]) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - scikit-learn is a requirement
            raise WorkloadError("digits needs scikit-learn (pip install scikit-learn)") from err
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.int64)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed split
        test, train = order[:360], order[360:]
        self.x_test, self.y_test = x[test], y[test]
        shard = train[_shard_indices(y[train], rank, world, heterogeneous, seed, 10)]
        self.x, self.y = x[shard], y[shard]

    @property
    def shard_size(self):
        return len(self.y)

    def model(self) -> nn.Module:
        return DigitsCNN()

    def batch(self, generator, batch_size):
        pick = torch.randint(0, len(self.y), (batch_size,), generator=generator)
        return self.x[pick], self.y[pick]

    @torch.no_grad()
    def evaluate(self, model, device):
        out = model(self.x_test.to(device)).float()
        y = self.y_test.to(device)
        return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------- charlm
CHARLM_FILES = ("argparse.py", "ast.py", "collections/__init__.py", "dataclasses.py", "difflib.py",
                "enum.py", "functools.py", "inspect.py", "pathlib.py", "pickle.py", "shutil.py",
                "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "typing.py",
                "unittest/case.py", "zipfile.py", "random.py", "statistics.py")
VOCAB = 128  # ASCII; other bytes map to "?"


def stdlib_sources() -> List[Tuple[str, bytes]]:
    """(path under the standard library, contents) of the CHARLM_FILES present in this Python."""
    root = os.path.dirname(os.__file__)
    sources = []
    for rel in CHARLM_FILES:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                sources.append((rel, f.read()))
    return sources


def stdlib_text(limit_bytes: int = 1 << 21) -> List[torch.Tensor]:
    """Byte tensors of some standard-library sources (those present in this Python)."""
    root = os.path.dirname(os.__file__)
    texts = []
    total = 0
    for _, data in stdlib_sources():
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        raw = torch.where(raw < VOCAB, raw, torch.full_like(raw, ord("?")))
        texts.append(raw)
        total += len(raw)
        if total >= limit_bytes:
            break
    if sum(len(t) for t in texts) < 100_000:
        raise WorkloadError(f"charlm: found too little standard-library source text under {root}")
    return texts


class CharTransformer(nn.Module):
    """A pre-norm causal transformer over bytes. ``nn.TransformerEncoder`` starts every layer as a
    copy of the first; ``distinct_layers=True`` draws each layer's initial weights afresh instead
    (the larger sizes; ``tiny`` keeps the copies, and with them its numbers)."""

    def __init__(self, context: int, width: int = 64, layers: int = 2, heads: int = 4,
                 distinct_layers: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))

        def new_layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                              norm_first=True)

        layer = new_layer()
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        if distinct_layers:
            self.blocks.layers = nn.ModuleList([layer] + [new_layer() for _ in range(layers - 1)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class CharLMSize(NamedTuple):
    width: int
    layers: int
    heads: int
    eval_windows: int  # held-out windows of 64 characters per evaluation


# Parameters, forward+backward at batch 16 and one evaluation, on one CPU thread (torch 2.13, the
# 2-core dev VM): tiny 0.12M 15 ms 0.16 s, small 2.5M 0.19 s 0.27 s, base 10.8M 0.8 s 0.5 s,
# large 25.4M 1.8 s 0.6 s.
CHARLM_SIZES: Dict[str, CharLMSize] = {
    "tiny": CharLMSize(width=64, layers=2, heads=4, eval_windows=256),
    "small": CharLMSize(width=256, layers=3, heads=4, eval_windows=64),
    "base": CharLMSize(width=384, layers=6, heads=6, eval_windows=32),
    "large": CharLMSize(width=512, layers=8, heads=8, eval_windows=16),
}


class CharLM(Workload):
    name = "charlm"
    context = 64

    def __init__(self, rank, world, seed, heterogeneous, data_dir, model_size: str = "tiny"):
        self.model_size = model_size
        self.size = CHARLM_SIZES[model_size]
        texts = stdlib_text()
        # The last 10% of every file is held out.
        cut = [int(len(t) * 0.9) for t in texts]
        train = [t[:c] for t, c in zip(texts, cut)]
        self.valid = torch.cat([t[c:] for t, c in zip(texts, cut)])
        if heterogeneous and world > 1:
            # Each rank reads its own files: different vocabularies of identifiers and styles.
            mine = [t for i, t in enumerate(train) if i % world == rank] or [train[rank % len(train)]]
            self.train = torch.cat(mine)
        else:
            self.train = torch.cat(train)
            # Even split: each rank its own contiguous 1/world of the text.
            size = len(self.train) // world
            self.train = self.train[rank * size:(rank + 1) * size]
        g = torch.Generator().manual_seed(4321)
        # The larger models evaluate on the first windows of the same draw (fewer: it runs often).
        self.valid_starts = torch.randint(0, len(self.valid) - self.context - 1, (256,),
                                          generator=g)[:self.size.eval_windows]

    @property
    def shard_size(self):
        return len(self.train) // self.context

    def model(self):
        if self.model_size == "tiny":
            return CharTransformer(self.context)  # unchanged since the first release: same numbers
        return CharTransformer(self.context, self.size.width, self.size.layers, self.size.heads,
                               distinct_layers=True)

    def batch(self, generator, batch_size):
        starts = torch.randint(0, len(self.train) - self.context - 1, (batch_size,), generator=generator)
        span = starts[:, None] + torch.arange(self.context + 1)
        chunk = self.train[span]
        return chunk[:, :-1], chunk[:, 1:]

    def loss(self, output, target):
        return F.cross_entropy(output.float().reshape(-1, VOCAB), target.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, device):
        span = self.valid_starts[:, None] + torch.arange(self.context + 1)
        chunk = self.valid[span].to(device)
        out = model(chunk[:, :-1]).float()
        target = chunk[:, 1:]
        loss = F.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1)).item()
        return loss, (out.argmax(-1) == target).float().mean().item()


# -------------------------------------------------------------------------------------- textcls
# A token: an identifier or keyword, or a word of a comment or string.
TOKEN_PATTERN = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


@functools.lru_cache(maxsize=1)
def stdlib_token_hashes() -> Tuple[Tuple[str, ...], Tuple[torch.Tensor, ...]]:
    """The names of the CHARLM_FILES present in this Python and, per file, the CRC-32 of each of its
    tokens (``TOKEN_PATTERN``) in order, ``Tensor[tokens]`` int64. CRC-32 and not ``hash()``, which
    Python salts per process: every rank must hash alike."""
    names, hashes = [], []
    crc: Dict[bytes, int] = {}
    for rel, data in stdlib_sources():
        tokens = TOKEN_PATTERN.findall(data)
        names.append(rel)
        hashes.append(torch.tensor([crc.setdefault(t, zlib.crc32(t)) for t in tokens],
                                   dtype=torch.int64))
    return tuple(names), tuple(hashes)


class HashedBagClassifier(nn.Module):
    """fastText-style text classifier (Joulin et al. 2017, arXiv 1607.01759): the mean of the
    embeddings of a snippet's hashed features, then a linear layer.

    The embedding table is nearly all of the parameters, and its gradient is dense
    (``sparse=False``): DDP all-reduces the whole table every step although a batch touches only a
    few thousand of its rows, the classic communication-bound case.

    Args:
        buckets: rows of the embedding table (the hash space of the features).
        dim: embedding width.
        classes: number of labels.
    """

    def __init__(self, buckets: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        nn.init.uniform_(self.embed.weight, -1.0 / dim, 1.0 / dim)  # fastText's initialisation
        self.head = nn.Linear(dim, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, F]`` int64 feature ids in ``[0, buckets)`` -> ``Tensor[B, classes]`` logits."""
        return self.head(self.embed(features))


# Embedding rows per size (width 32), and per size: parameters (fp32 gradient per step), forward +
# backward and Adam step at batch 64 on one CPU thread (torch 2.13, the 2-core dev VM):
# small 0.26M (1 MiB) 1.1 + 1.2 ms, base 1.05M (4 MiB) 1.5 + 6.6 ms, large 4.2M (16 MiB) 2.1 + 28 ms,
# xl 16.8M (64 MiB) 29 + 118 ms. The embedding is over 99.7% of the parameters in every size.
TEXTCLS_SIZES: Dict[str, int] = {"small": 1 << 13, "base": 1 << 15, "large": 1 << 17, "xl": 1 << 19}


class TextCls(Workload):
    """Which standard-library file a snippet of ``snippet`` consecutive tokens comes from. A snippet's
    features are its tokens (unigrams) and pairs of neighbouring tokens (bigrams), hashed into
    ``buckets`` rows; ``2 * snippet - 1`` features per snippet. Training snippets lie in the first
    90% of each file's tokens, held-out ones in the last 10%; every file contributes as many of
    each (overlapping windows at evenly spaced starts), so the classes are balanced."""

    name = "textcls"
    snippet = 64  # tokens per snippet
    dim = 32
    train_per_file = 1024
    eval_per_file = 64

    def __init__(self, rank, world, seed, heterogeneous, data_dir, model_size: str = "base"):
        self.model_size = model_size
        self.buckets = TEXTCLS_SIZES[model_size]
        self.class_names, hashes = stdlib_token_hashes()
        span = self.snippet
        where = os.path.dirname(os.__file__)
        if len(hashes) < 2:
            raise WorkloadError(f"textcls: found {len(hashes)} of the standard-library files it "
                                f"reads under {where}, needs at least 2")
        short = [n for n, h in zip(self.class_names, hashes) if len(h) < 10 * span]
        if short:
            raise WorkloadError(f"textcls: standard-library files under {where} with fewer than "
                                f"{10 * span} tokens: {', '.join(short)}")
        unigrams, bigrams, train, test = [], [], [], []
        offset = 0
        for h in hashes:
            n = len(h)
            unigrams.append(h % self.buckets)
            # Feature of the pair (token i, token i + 1) at i; the file's last slot is never read.
            bigrams.append(torch.cat([(h[:-1] * 1_000_003 + h[1:]) % self.buckets, h.new_zeros(1)]))
            cut = int(0.9 * n)
            train.append(offset + self._even_starts(0, cut - span, self.train_per_file))
            test.append(offset + self._even_starts(cut, n - span, self.eval_per_file))
            offset += n
        self.unigrams, self.bigrams = torch.cat(unigrams), torch.cat(bigrams)
        classes = len(hashes)
        train_labels = torch.arange(classes).repeat_interleave(self.train_per_file)
        shard = _shard_indices(train_labels, rank, world, heterogeneous, seed, classes)
        self.starts, self.y = torch.cat(train)[shard], train_labels[shard]
        self.test_starts = torch.cat(test)
        self.x_test = self.features(self.test_starts)
        self.y_test = torch.arange(classes).repeat_interleave(self.eval_per_file)

    @staticmethod
    def _even_starts(first: int, last: int, count: int) -> torch.Tensor:
        return torch.linspace(first, last, count, dtype=torch.float64).round().long()

    def features(self, starts: torch.Tensor) -> torch.Tensor:
        """``Tensor[B]`` token positions -> ``Tensor[B, 2 * snippet - 1]`` feature ids of the
        snippets starting there: unigrams, then bigrams, all inside the snippet."""
        tokens = starts[:, None] + torch.arange(self.snippet)
        return torch.cat([self.unigrams[tokens], self.bigrams[tokens[:, :-1]]], dim=1)

    @property
    def shard_size(self):
        return len(self.y)

    def model(self):
        return HashedBagClassifier(self.buckets, self.dim, len(self.class_names))

    def batch(self, generator, batch_size):
        pick = torch.randint(0, len(self.y), (batch_size,), generator=generator)
        return self.features(self.starts[pick]), self.y[pick]

    @torch.no_grad()
    def evaluate(self, model, device):
        out = model(self.x_test.to(device)).float()
        y = self.y_test.to(device)
        return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------- linreg
class LinReg(Workload):
    """f(theta) = mean over workers of ||A_i theta - b_i||^2 / (2 m); worker i's b_i comes from its
    own true model theta_i = mu_i + noise, mu_i a worker-specific mean. The reported loss is the
    global objective's gap to its minimum, f(theta) - f(theta*), on all workers' data."""

    name = "linreg"
    has_accuracy = False
    dim = 100
    samples = 500

    def __init__(self, rank, world, seed, heterogeneous, data_dir):
        self.rank, self.world = rank, world
        self.data = [self._worker_data(seed, r) for r in range(world)]
        a = torch.cat([d[0] for d in self.data]).double()
        b = torch.cat([d[1] for d in self.data]).double()
        self.theta_star = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        self.optimum = self._objective(self.theta_star)

    def _worker_data(self, seed: int, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + r)
        mean = torch.randn(self.dim, generator=g) * 2.0
        theta = mean + 0.5 * torch.randn(self.dim, generator=g)
        a = torch.randn(self.samples, self.dim, generator=g)
        b = a @ theta + 0.1 * torch.randn(self.samples, generator=g)
        return a, b

    def _objective(self, theta: torch.Tensor) -> float:
        return sum(float(((a.double() @ theta - b.double()) ** 2).mean() / 2) for a, b in self.data) / self.world

    @property
    def shard_size(self):
        return self.samples

    def model(self):
        return nn.Linear(self.dim, 1, bias=False)

    def batch(self, generator, batch_size):
        a, b = self.data[self.rank]
        if batch_size <= 0 or batch_size >= len(b):
            return a, b  # full-batch gradients
        pick = torch.randint(0, len(b), (batch_size,), generator=generator)
        return a[pick], b[pick]

    def loss(self, output, target):
        return F.mse_loss(output.float().squeeze(1), target) / 2

    @torch.no_grad()
    def evaluate(self, model, device):
        theta = model.weight.detach().double().cpu().reshape(-1)
        return self._objective(theta) - self.optimum, None


# -------------------------------------------------------------------------------------- cifar10
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), 11.2M parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


CIFAR_NAMES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def cifar10_root(data_dir: Optional[str]) -> str:
    """The folder holding CIFAR-10's python batches, or a WorkloadError saying what is missing."""
    where = "https://www.cs.toronto.edu/~kriz/cifar.html"
    if not data_dir:
        raise WorkloadError(f"cifar10 needs --data-dir: a folder holding cifar-10-batches-py/ "
                            f"(data_batch_1..5, test_batch, the python version from {where})")
    root = os.path.join(data_dir, "cifar-10-batches-py")
    root = root if os.path.isdir(root) else data_dir
    missing = [n for n in CIFAR_NAMES if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise WorkloadError(f"cifar10: no CIFAR-10 under {data_dir!r} (missing {', '.join(missing)}); "
                            f"expected the python version, cifar-10-batches-py/, from {where}")
    return root


def load_cifar10(data_dir: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    root = cifar10_root(data_dir)

    def read(name):
        with open(os.path.join(root, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x = torch.tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32)
        return x, torch.tensor(batch[b"labels"], dtype=torch.int64)

    parts = [read(n) for n in CIFAR_NAMES[:5]]
    x_test, y_test = read("test_batch")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), x_test, y_test


class Cifar10(Workload):
    name = "cifar10"

    def __init__(self, rank, world, seed, heterogeneous, data_dir):
        x, y, self.x_test, self.y_test = load_cifar10(data_dir)
        shard = _shard_indices(y, rank, world, heterogeneous, seed, 10)
        self.x, self.y = x[shard], y[shard]

    @property
    def shard_size(self):
        return len(self.y)

    def model(self):
        return ResNet18()

    @staticmethod
    def _normalize(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - CIFAR_MEAN.to(x.device)) / CIFAR_STD.to(x.device)

    def batch(self, generator, batch_size):
        pick = torch.randint(0, len(self.y), (batch_size,), generator=generator)
        x = self.x[pick]
        # Augmentation: random crop with 4-pixel padding and horizontal flip.
        padded = F.pad(x, (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
        x = padded[:, :, dy:dy + 32, dx:dx + 32]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return self._normalize(x), self.y[pick]

    @torch.no_grad()
    def evaluate(self, model, device):
        was_training = model.training
        model.eval()
        losses, correct = 0.0, 0
        for start in range(0, len(self.y_test), 500):
            x = self._normalize(self.x_test[start:start + 500].to(device))
            y = self.y_test[start:start + 500].to(device)
            out = model(x).float()
            losses += F.cross_entropy(out, y, reduction="sum").item()
            correct += int((out.argmax(1) == y).sum())
        model.train(was_training)
        return losses / len(self.y_test), correct / len(self.y_test)


BUILDERS: Dict[str, Callable[..., Workload]] = {
    "digits": Digits, "charlm": CharLM, "textcls": TextCls, "linreg": LinReg, "cifar10": Cifar10,
}


def resolve_model_size(name: str, model_size: Optional[str]) -> Optional[str]:
    """The model size ``name`` builds for ``model_size`` (None: its default; None too for a
    workload without sizes), or a WorkloadError naming the sizes it accepts."""
    if name not in BUILDERS:
        raise WorkloadError(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}")
    sizes = MODEL_SIZES[name]
    if model_size is None:
        return DEFAULT_MODEL_SIZE.get(name)
    if not sizes:
        raise WorkloadError(f"{name} has one model and takes no model size, got {model_size!r}")
    if model_size not in sizes:
        raise WorkloadError(f"{name}: unknown model size {model_size!r}; sizes: {', '.join(sizes)} "
                            f"(default {DEFAULT_MODEL_SIZE[name]})")
    return model_size


def make_workload(name: str, rank: int, world: int, seed: int, heterogeneous: bool = False,
                  data_dir: Optional[str] = None, model_size: Optional[str] = None) -> Workload:
    """This rank's workload ``name`` at ``model_size`` (None: the workload's default size).

    Example::

        workload = make_workload("textcls", rank=0, world=2, seed=0, model_size="large")
        torch.manual_seed(0)  # every rank builds the same initial model
        model = workload.model()
        x, y = workload.batch(torch.Generator().manual_seed(0), 64)
    """
    size = resolve_model_size(name, model_size)
    sized = {} if size is None else {"model_size": size}
    return BUILDERS[name](rank, world, seed, heterogeneous, data_dir, **sized)


def check_available(name: str, data_dir: Optional[str], model_size: Optional[str] = None) -> None:
    """Fails early, in the launching process, when a workload's data is missing or its model size
    unknown."""
    resolve_model_size(name, model_size)
    if name == "cifar10":
        cifar10_root(data_dir)
    elif name == "digits":
        try:
            import sklearn  # noqa: F401
        except ImportError as err:
            raise WorkloadError("digits needs scikit-learn (pip install scikit-learn)") from err
    elif name == "charlm":
        stdlib_text()
    elif name == "textcls":
        TextCls(0, 1, 0, False, None, DEFAULT_MODEL_SIZE[name])


def epochs_to_steps(epochs: float, shard_size: int, batch_size: int) -> int:
    """Steps for ``epochs`` passes over a shard; ``batch_size`` 0 means full batch."""
    per_epoch = 1 if batch_size <= 0 else max(1, math.ceil(shard_size / batch_size))
    return max(1, int(round(epochs * per_epoch)))
