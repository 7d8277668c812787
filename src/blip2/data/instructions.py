"""Instruction tuning data: records as `(instruction, answer)` pairs, and mixtures of datasets.

InstructBLIP (Dai et al., 2023) tunes on many datasets at once. Two of its choices live here:

* each kind of record is asked for by several instruction templates, one picked per example, so the
  model follows the wording and not one fixed prompt (`TEMPLATES`; our own wording of the paper's
  idea);
* datasets are sampled in proportion to the square root of their sizes (`mixture_order`): a small
  dataset is not drowned by a large one, nor repeated until it is learned by heart.

Both are functions of `(seed, epoch, index)`, so an example's template and the order of a mixed
epoch are the same on any number of ranks and after a resume.
"""

from __future__ import annotations

import math

import torch

from blip2.data.annotations import Record
from blip2.errors import UserError

# the record kind -> instruction templates ("{}" is the question of a VQA record)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": (
        "Write a short caption for this image.",
        "Describe the image in a few words.",
        "What does this picture show? Answer in one short sentence.",
        "Give a one-sentence description of the photo.",
        "Summarize what you see in the image briefly.",
    ),
    "vqa": (
        "{}",
        "Question: {} Short answer:",
        "Answer the question about the image in a word or two: {}",
        "{} Reply with a short answer.",
        "Look at the image and answer briefly: {}",
    ),
}


def instruction_pair(
    record: Record, seed: int, templates: dict[str, tuple[str, ...]] = TEMPLATES
) -> tuple[str, str]:
    """`(instruction, answer)` of a record, the template picked by `seed` (the sample's own seed, a
    hash of `(seed, epoch, index)`): a VQA record's question in one of the VQA templates and its first
    answer; a caption record's caption after one of the caption templates; a record with its own
    instruction (the `instructions` layout) as it is."""
    if record.instruction is not None and record.text is not None:
        return record.instruction, record.text
    if record.question is not None and record.answers:
        options = templates["vqa"]
        return options[seed % len(options)].format(record.question), record.answers[0]
    if record.text is not None:
        options = templates["caption"]
        return options[seed % len(options)], record.text
    raise UserError(f"example {record.key} has neither a caption nor a question with an answer")


def sqrt_weights(sizes: list[int]) -> list[float]:
    """Sampling probabilities proportional to the square root of each dataset's size."""
    if not sizes or any(n <= 0 for n in sizes):
        raise UserError(f"every dataset of a mixture needs examples; sizes {sizes}")
    roots = [math.sqrt(n) for n in sizes]
    return [r / sum(roots) for r in roots]


def mixture_order(sizes: list[int], seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """One epoch of a mixture: `sum(sizes)` indices into the datasets laid end to end.

    Each position draws a dataset with `sqrt_weights(sizes)`; each dataset hands out its examples in
    its own permutation of the epoch, from the start again when it runs out (a small dataset repeats,
    a large one is partly seen). Without `shuffle` the datasets are walked in file order (the draws
    stay random: they are the mixture).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    total = sum(sizes)
    which = torch.multinomial(torch.tensor(sqrt_weights(sizes)), total, replacement=True, generator=g)
    out = torch.empty(total, dtype=torch.long)
    start = 0
    for d, n in enumerate(sizes):
        at = (which == d).nonzero().squeeze(1)  # (k,) positions that draw dataset d
        own = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        repeats = -(-len(at) // n) if len(at) else 0
        out[at] = start + own.repeat(repeats)[: len(at)]
        start += n
    return out
