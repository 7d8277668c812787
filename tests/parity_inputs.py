"""Inputs and outputs of generation parity tests: the same prompts as transformers' BLIP-2 reads them
(image tokens included) and as ours does (the text only), and the new tokens each side generates.

Used by `test_generation_parity.py` and `test_llm_families.py`.
"""

from __future__ import annotations

import torch

WORD_IDS = [[10, 11, 12], [13, 14, 15, 16, 17]]  # two prompts of different lengths (word tokens)


def generation_inputs(hf, prompted: bool, queries: int, pads_first: bool = True) -> tuple[dict, dict]:
    """transformers' `input_ids` / `attention_mask` (image tokens included) and ours (the text only;
    nothing without a prompt) for `WORD_IDS`, padded as each LM kind needs (decoder-only: left, after
    the BOS; encoder-decoder: right, before the EOS).

    `pads_first=False`: decoder-only prompts as transformers' `Blip2Processor` lays them out with left
    padding, `[<image> x Q][pads][BOS][prompt]` (the same positions; only an LM with a sliding window
    shorter than the input, Mistral or Gemma2, tells the two apart, as it counts the pads in its window)."""
    text = hf.config.text_config
    image = [hf.config.image_token_index] * queries
    if not prompted:  # transformers builds [<image> x Q][BOS]; a config without BOS gets the T5
        start = getattr(text, "bos_token_id", None)  # tokenizer's empty prompt, [</s>], as LAVIS feeds it
        if start is None:
            return {"input_ids": torch.tensor([image + [text.eos_token_id]] * 2)}, {}
        return {}, {}  # transformers' own no-prompt path
    enc_dec = text.is_encoder_decoder
    rows = [r + [text.eos_token_id] if enc_dec else [text.bos_token_id, *r] for r in WORD_IDS]
    n = max(map(len, rows))
    theirs, ours = [], []
    for r in rows:
        pads = [text.pad_token_id] * (n - len(r))
        if enc_dec:  # right padded: [<image> x Q][prompt][</s>][pads]
            theirs.append((image + r + pads, [1] * (queries + len(r)) + [0] * len(pads)))
            ours.append((r + pads, [1] * len(r) + [0] * len(pads)))
        elif pads_first:  # left padded: [pads][<image> x Q][BOS][prompt]
            theirs.append((pads + image + r, [0] * len(pads) + [1] * (queries + len(r))))
        else:  # as the processor pads: [<image> x Q][pads][BOS][prompt]
            theirs.append((image + pads + r, [1] * queries + [0] * len(pads) + [1] * len(r)))
        if not enc_dec:
            ours.append((pads + r, [0] * len(pads) + [1] * len(r)))

    def batch(pairs: list) -> dict:
        return {
            "input_ids": torch.tensor([p[0] for p in pairs]),
            "attention_mask": torch.tensor([p[1] for p in pairs]),
        }

    return batch(theirs), batch(ours)


def new_tokens(hf, out: torch.Tensor, given: dict, queries: int) -> list[list[int]]:
    """The oracle's new tokens (decoder-only output repeats the input; T5's starts with its start token)."""
    if hf.config.text_config.is_encoder_decoder:
        return out[:, 1:].tolist()
    return out[:, given["input_ids"].shape[1] if given else queries + 1 :].tolist()


def eos_ending_rows_apart(rows: list[list[int]]) -> int:
    """A token of row 0 (not its first) that ends the two rows at different steps, when there is one."""

    def end(row: list[int], t: int) -> int:
        return row.index(t) if t in row else len(row)

    for t in rows[0][1:]:
        if t not in (rows[0][0], rows[1][0]) and end(rows[0], t) != end(rows[1], t):
            return t
    return rows[0][-1]


def ended(rows: list[list[int]], eos: int) -> list[list[int]]:
    """Each row up to its first EOS."""
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def livelier(hf, seed: int) -> None:
    """Larger random LM weights, queries and projection: a tiny random LM's default weights repeat one
    token whatever the input, and a comparison of such outputs means nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in hf.language_model.parameters():
            if t.dim() == 2:
                t.copy_(torch.randn(t.shape, generator=g) * 3.0 / t.shape[1] ** 0.5)
        hf.query_tokens.normal_(std=1.0, generator=g)
        hf.language_projection.weight.normal_(std=0.5, generator=g)
