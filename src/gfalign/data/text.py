"""A character-level text the package generates: ``chars``, for the transformer.

The text is sentences of a small fixed grammar, drawn from a seeded generator, so it needs no
file and is the same on every machine::

    every bird likes the small river. every ball knows every tree.

    sentence = determiner [adjective] noun verb determiner [adjective] noun "."

Each example is ``context`` consecutive characters, as their indices in ``ALPHABET`` (stored
as floats, like every dataset's inputs), and its label is the character that follows. Inside a
word the next character follows from the letters before it; at a word's start it is a draw
from the grammar, so no model reaches 0% error: the floor is the text's own uncertainty.
Training and test windows come from two texts drawn independently.

    >>> data = chars(100, 20)
    >>> data.train.x.shape, data.train.y.shape
    (torch.Size([100, 32]), torch.Size([100]))
    >>> decode(data.train.x[0])
    'every bird likes the small river'
    >>> ALPHABET[int(data.train.y[0])]
    '.'
"""

from __future__ import annotations

import numpy as np
import torch

from gfalign.data.dataset import Dataset, Split
from gfalign.data.errors import DataError

__all__ = ["ALPHABET", "CONTEXT", "chars", "decode", "text"]

ALPHABET = " .abcdefghijklmnopqrstuvwxyz"
"""The 28 characters of the text; a character's class is its index here."""

CONTEXT = 32
"""Characters before the one to predict, by default."""

_WORDS = {
    "determiner": ("the", "a", "every", "one"),
    "adjective": ("small", "red", "old", "quiet", "happy", "green", "big", "cold"),
    "noun": ("dog", "cat", "bird", "fox", "child", "tree", "ball", "house", "river", "stone"),
    "verb": ("sees", "finds", "likes", "follows", "hears", "carries", "watches", "knows"),
}


def text(characters: int, seed: int = 0) -> str:
    """``characters`` characters of the grammar's sentences, the same for the same seed."""
    generator = np.random.default_rng(seed)

    def word(kind: str) -> str:
        words = _WORDS[kind]
        return words[generator.integers(len(words))]

    def phrase() -> list[str]:
        adjective = [word("adjective")] if generator.random() < 0.5 else []
        return [word("determiner"), *adjective, word("noun")]

    sentences, length = [], 0
    while length < characters:
        sentence = " ".join([*phrase(), word("verb"), *phrase()]) + "."
        sentences.append(sentence)
        length += len(sentence) + 1
    return " ".join(sentences)[:characters]


def _windows(source: str, count: int, context: int) -> Split:
    codes = torch.tensor([ALPHABET.index(c) for c in source], dtype=torch.int64)
    starts = torch.arange(count)
    x = codes[starts[:, None] + torch.arange(context)]  # (count, context)
    return Split(x.to(torch.float32), codes[starts + context])


def chars(
    n_train: int = 50_000,
    n_test: int = 10_000,
    *,
    context: int = CONTEXT,
    seed: int = 0,
    validation: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """The generated character-level text as a dataset of next-character predictions.

    Args:
        n_train, n_test: windows in each split (validation ones come out of n_train); window
            ``k`` starts at character ``k`` of its split's text.
        context: characters per window.
        seed: the training text's seed; the test text's is ``seed + 1``.
        validation: hold out the last ``validation`` training windows.
        device, dtype: as for ``gfalign.data.load`` (inputs are character indices, exact in
            any floating type).

    Returns:
        A Dataset named ``"chars"``: x (N, context) character indices, y (N,) the next one's.
    """
    if not 0 <= validation < n_train:
        raise DataError(f"validation must be 0 to {n_train - 1} examples, not {validation}")
    if context < 1:
        raise DataError(f"context must be at least 1 character, not {context}")
    train = _windows(text(n_train + context + 1, seed), n_train, context)
    test = _windows(text(n_test + context + 1, seed + 1), n_test, context)
    kept = n_train - validation
    held_out = Split(train.x[kept:], train.y[kept:]) if validation else None
    dataset = Dataset("chars", train.subset(kept), test, held_out)
    return dataset.to(device=device, dtype=dtype)


def decode(codes: torch.Tensor) -> str:
    """The characters of a window of indices.

    Example:
        >>> decode(torch.tensor([2.0, 0.0, 4.0]))
        'a c'
    """
    return "".join(ALPHABET[int(c)] for c in codes.tolist())
