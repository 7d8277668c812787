"""Run captioning, VQA and retrieval evaluation on the tiny benchmark files in one process group.

`python eval_dist_checks.py ROOT OUT`: under torchrun every rank takes its shard; in one plain
process it is the single-process reference. ROOT holds the models and files `test_eval_distributed`
writes (see eval_fixtures).
"""

from __future__ import annotations

import os
import sys

import torch

import blip2
from blip2.distributed import setup, teardown
from blip2.eval import datasets, runner


def main(root: str, out: str) -> None:
    torch.set_num_threads(1)
    info = setup("cpu")
    quiet = dict(info=info, log=lambda _: None, batch_size=2)
    gen, itm = blip2.load(os.path.join(root, "opt")), blip2.load(os.path.join(root, "itm"))
    coco = os.path.join(root, "coco")
    samples = datasets.caption_samples(os.path.join(root, "coco_karpathy_test.json"), coco)
    settings = {"max_new_tokens": 12, "min_new_tokens": 3}
    runner.evaluate_captions(
        gen, samples, os.path.join(out, "caption"), settings=settings, java=False, **quiet
    )
    q, a = (
        os.path.join(root, f)
        for f in ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json")
    )
    questions, metric = datasets.vqa_samples(q, a, os.path.join(coco, "val2014"))
    runner.evaluate_vqa(gen, questions, os.path.join(out, "vqa"), metric=metric, **quiet)
    data = datasets.retrieval_set(os.path.join(root, "coco_karpathy_test.json"), coco)
    runner.evaluate_retrieval(itm, data, os.path.join(out, "retrieval"), k=3, itm_batch_size=4, **quiet)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
