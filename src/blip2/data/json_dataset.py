"""Map-style training data from annotation files, split into global batches over ranks.

`GlobalBatchSampler` draws one permutation per epoch (seeded), cuts it into global batches of
`world_size x batch_size` and gives rank `r` rows `[r*B, (r+1)*B)` of each. So N ranks of B see exactly
the batch one process of N x B sees, in the same order. The position in the data is a global cursor
`(epoch, offset in the permutation)`, the same on every rank and meaningful on any world size: a run
resumed on M ranks instead of N continues at the same sample. The last incomplete global batch of an
epoch is dropped (as LAVIS's `drop_last=True`).

A bad sample (see `batching.BadSample`) is replaced by the next usable record of the dataset, so
batches stay full and equal over ranks (the all-gather of the stage-1 losses needs equal shapes); the
skip is counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from blip2.data.annotations import Record
from blip2.data.batching import BadSample, Preprocessor, merge_skips, sample_seed
from blip2.data.instructions import mixture_order, sqrt_weights
from blip2.errors import UserError


class JsonDataset(Dataset):
    """Records + a preprocessor; indexed by `(epoch, index)` (the epoch seeds the augmentation)."""

    def __init__(self, records: list[Record], pre: Preprocessor, seed: int = 0, max_substitutes: int = 64):
        self.records = records
        self.pre = pre
        self.seed = seed
        self.max_substitutes = max_substitutes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, index = item
        skipped: Counter[str] = Counter()
        first = ""
        for k in range(self.max_substitutes):
            j = (index + k) % len(self.records)
            try:
                sample = self.pre.load(self.records[j], sample_seed(self.seed, epoch, j))
            except BadSample as e:
                skipped[e.reason] += 1
                first = first or str(e)
                continue
            sample["skipped"] = dict(skipped)
            return sample
        raise UserError(
            f"{self.max_substitutes} records in a row after #{index} could not be used "
            f"({dict(skipped)}, the first: {first}); check the images (data.images) and annotations"
        )

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = merge_skips(samples)
        batch = self.pre.collate(samples)
        batch["skipped"] = skipped
        return batch


class GlobalBatchSampler(Sampler):
    """Yields this rank's `(epoch, index)` lists, global batch after global batch, forever.

    The position in the data is a cursor `(epoch, offset)`: the next global batch is rows `offset ..
    offset + world_size x batch_size` of the epoch's permutation. The permutation depends on the seed
    and the epoch only, so a cursor means the same samples on any number of ranks: a run resumed on
    another world size continues where it stopped (no sample of the epoch twice, none missed; the
    epoch's incomplete last global batch is dropped).

    Args:
        size: number of records.
        batch_size: per-rank batch.
        rank, world_size: this process in the job.
        seed: permutation seed (the same on every rank).
        shuffle: permute each epoch (else the file order).
        start: the cursor to start at (resume).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: tuple[int, int] = (0, 0),
    ):
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = size // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {size} examples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower train.batch_size"
            )
        self.start = self.fit(start)

    def fit(self, cursor: tuple[int, int]) -> tuple[int, int]:
        """The cursor of the next full global batch: the start of the next epoch when fewer than a
        global batch of the epoch is left."""
        epoch, offset = (int(x) for x in cursor)
        return (epoch, offset) if offset + self.global_batch <= self.size else (epoch + 1, 0)

    def advance(self, cursor: tuple[int, int]) -> tuple[int, int]:
        """The cursor after the global batch at `cursor`."""
        return self.fit((cursor[0], cursor[1] + self.global_batch))

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(
            self.size, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch))
        )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cursor, epoch, perm = self.start, -1, None
        while True:
            if cursor[0] != epoch:
                epoch, perm = cursor[0], self.order(cursor[0])
            first = cursor[1] + self.rank * self.batch_size
            yield [(epoch, int(i)) for i in perm[first : first + self.batch_size]]
            cursor = self.advance(cursor)

    def __len__(self) -> int:  # one epoch; iteration itself does not stop
        return self.steps_per_epoch


class MixtureSampler(GlobalBatchSampler):
    """`GlobalBatchSampler` over datasets laid end to end, each epoch in `mixture_order`: the cursor
    `(epoch, offset)` means the same examples on any number of ranks, as for one dataset.

    Args:
        sizes: the number of examples of each dataset, in the order they are laid end to end.
        batch_size, rank, world_size, seed, shuffle, start: as `GlobalBatchSampler`.
    """

    def __init__(
        self,
        sizes: list[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: tuple[int, int] = (0, 0),
    ):
        sqrt_weights(sizes)  # every dataset has examples
        self.sizes = list(sizes)
        super().__init__(sum(sizes), batch_size, rank, world_size, seed, shuffle, start)

    def order(self, epoch: int) -> torch.Tensor:
        return mixture_order(self.sizes, self.seed, epoch, self.shuffle)
