"""Checkpoint surgery: what a stage-2 model needs to follow transformers' conventions.

transformers' BLIP-2 marks where the query outputs go with an `<image>` token in the LLM's input; LAVIS
checkpoints (and models trained here) have none. `ensure_image_token` adds it: the token in the
tokenizer, its id in the config, room for it in the LLM's embedding table (`grow_vocab`). transformers'
InstructBLIP video model marks the frames' query outputs with a `<video>` token instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from blip2.config import Blip2Config
from blip2.errors import UserError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # the placeholder of a video model (`Blip2Config.video_frames`)


def first_id(tokenizer: Any, text: str) -> int:
    """The id of the first token of `text` (e.g. OPT's "\\n", which ends a caption)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"the tokenizer turns {text!r} into no tokens; it cannot end generation")
    return int(ids[0])


def ensure_image_token(model: nn.Module, tokenizer: Any) -> None:
    """Give a stage-2 model transformers' `<image>` placeholder: the token in the tokenizer, its id in
    the config (`image_token_id`), and room for it in the LLM's embedding table.

    The table only grows when the id does not fit (padded to a multiple of 64 as the released
    checkpoints are; new rows are the mean of the old ones). The EOS text (OPT's "\\n") becomes the
    LLM config's EOS, as in the released transformers checkpoints. A model that has the token already
    is left as it is. A video model gets `<video>` (transformers' video layout) in the same place.
    """
    from tokenizers import AddedToken

    config: Blip2Config = model.config
    if config.llm.image_token_id is not None:
        return
    token = VIDEO_TOKEN if config.video_frames else IMAGE_TOKEN
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, normalized=False, special=True)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(token)
    llm = model.llm
    rows = llm.get_input_embeddings().weight.shape[0]
    hf_config = dict(config.llm.hf_config)
    if image_id >= rows:
        grow_vocab(llm, image_id + 1)
        hf_config["vocab_size"] = llm.get_input_embeddings().weight.shape[0]
    if config.llm.eos_text:
        eos = first_id(tokenizer, config.llm.eos_text)
        hf_config["eos_token_id"] = llm.config.eos_token_id = llm.generation_config.eos_token_id = eos
    llm_cfg = dataclasses.replace(config.llm, image_token_id=image_id, hf_config=hf_config)
    model.config = dataclasses.replace(config, llm=llm_cfg)


@torch.no_grad()
def grow_vocab(llm: nn.Module, size: int, multiple: int = 64) -> None:
    """Grow the LLM's input (and untied output) embedding tables to at least `size` rows, rounded up to
    `multiple`; the new rows are the mean of the old ones, the old rows are kept exactly."""
    size = -(-size // multiple) * multiple
    tables = [llm.get_input_embeddings()]
    head = llm.get_output_embeddings()
    if head is not None and head.weight is not tables[0].weight:
        tables.append(head)
    old = [t.weight.detach().clone() for t in tables]
    llm.resize_token_embeddings(size, mean_resizing=False)
    tables = [llm.get_input_embeddings()] + ([llm.get_output_embeddings()] if len(old) > 1 else [])
    for table, weight in zip(tables, old, strict=True):
        table.weight[: weight.shape[0]] = weight
        table.weight[weight.shape[0] :] = weight.mean(dim=0)


LAVIS_PAD_TOKEN = "[PAD]"


def add_lavis_pad_token(model: nn.Module, tokenizer: Any) -> None:
    """What LAVIS's InstructBLIP Vicuna (`blip2_vicuna_instruct`) does to its LLM and tokenizer, for a
    model loaded from its `.pth` file: a `[PAD]` pad token, `</s>` as the BOS and unknown token too,
    and a row for `[PAD]` in the LLM's embedding tables (Vicuna's 32000 -> 32001, the vocabulary of
    the released InstructBLIP Vicuna models). LAVIS's new row is random; here it is the mean of the
    others (`grow_vocab`): the row of a padding token that is never attended to nor generated.
    Other models (InstructBLIP FlanT5, BLIP-2) are left as they are.
    """
    config: Blip2Config = model.config
    if config.kind != "instruct" or config.llm.is_encoder_decoder:
        return
    eos = tokenizer.eos_token
    tokenizer.add_special_tokens({"pad_token": LAVIS_PAD_TOKEN, "bos_token": eos, "unk_token": eos})
    pad = tokenizer.convert_tokens_to_ids(LAVIS_PAD_TOKEN)
    llm = model.llm
    hf_config = dict(config.llm.hf_config)
    if pad >= llm.get_input_embeddings().weight.shape[0]:
        grow_vocab(llm, pad + 1, multiple=1)
        hf_config["vocab_size"] = llm.get_input_embeddings().weight.shape[0]
    hf_config["pad_token_id"] = llm.config.pad_token_id = llm.generation_config.pad_token_id = pad
    model.config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, hf_config=hf_config))
