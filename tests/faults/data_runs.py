"""A training run for the data fault tests, as one process or under torchrun:

`python data_runs.py CONFIG KEYS_OUT [--stop-after N] [--resume PATH] [section.key=value ...]` trains
with `blip2.train.loop.train` and writes, per rank, `[[step, [sample keys]], ...]` (the samples that
rank trained on in each step) to `KEYS_OUT.rank<R>.json`.
"""

from __future__ import annotations

import json
import os
import sys

from blip2.train.config import load_config
from blip2.train.loop import train


def main(argv: list[str]) -> None:
    config, out, *rest = argv
    stop, resume, overrides = 0, None, []
    args = iter(rest)
    for a in args:
        if a == "--stop-after":
            stop = int(next(args))
        elif a == "--resume":
            resume = next(args)
        else:
            overrides.append(a)
    steps: list = []
    train(
        load_config(config, overrides),
        resume=resume,
        hooks=[lambda s: steps.append([s.step, s.keys])],
        stop_after=stop,
    )
    with open(f"{out}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(steps, f)


if __name__ == "__main__":
    main(sys.argv[1:])
