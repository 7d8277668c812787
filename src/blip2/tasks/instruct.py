"""Instruction tuning (InstructBLIP, Dai et al. 2023): the LM loss of an `InstructBridge`, whose Q-Former
reads the instruction beside the queries.

The released code never shipped this. What it does, as the paper describes: start from a BLIP-2
stage-2 model (its Q-Former, projection and frozen LLM) and train the Q-Former and projection on a
mixture of datasets, each example asked for by an instruction template (`blip2.data.instructions`);
the image tower and the LLM stay frozen. The LLM reads `[soft prompt][instruction][answer]` and learns
the answer only; the Q-Former reads the instruction too.

The stage-2 checkpoints dropped the Q-Former's text side (word and position embeddings, the text
feed-forward), which reading an instruction needs: `model.qformer_text_from` names a stage-1 model to
take it from (InstructBLIP took it from BLIP-2's stage-1 checkpoint); without it, the text
feed-forward starts as a copy of the query feed-forward and the embeddings start fresh.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from blip2.config import Blip2Config
from blip2.data.instructions import TEMPLATES
from blip2.errors import UserError
from blip2.losses import Gather
from blip2.models.instruct import InstructBridge
from blip2.tasks.base import load_saved
from blip2.tasks.stage2 import INPUTS, Stage2Task, llm_for_stage2

if TYPE_CHECKING:
    from blip2.data.batching import TextSpec
    from blip2.train.config import DataSection, TrainConfig


class InstructTask(Stage2Task):
    """The language-modeling loss of an `InstructBridge` on `(instruction, answer)` pairs."""

    model: InstructBridge
    prefix_split = False

    def inputs(self, batch: dict[str, Tensor], gather: Gather, generator: torch.Generator) -> dict[str, Any]:
        keys = (*INPUTS, "qformer_input_ids", "qformer_attention_mask")
        return {**{k: batch[k] for k in keys if k in batch}, "return_logits": False}

    @classmethod
    def new_model(cls, config: Blip2Config, cfg: TrainConfig) -> InstructBridge:
        if config.kind != "instruct":
            raise UserError(
                f"task {cfg.task!r} trains an InstructBLIP model; {config.name or 'this model'} is a "
                f"{config.kind} one: use an instructblip preset or start from a saved model (model.init_from)"
            )
        llm_config, llm = llm_for_stage2(None, config.llm)
        return InstructBridge(dataclasses.replace(config, llm=llm_config), llm=llm)

    @classmethod
    def from_saved(cls, model: Any, cfg: TrainConfig) -> InstructBridge:
        kind = model.config.kind
        if kind == "instruct":
            return model
        if kind == "retrieval":
            raise UserError(
                f"task {cfg.task!r} starts from a stage-2 (generative) model, and {cfg.model.init_from} is a "
                "stage-1 one: train stage 2 first (task: stage2), or start from a released BLIP-2 model"
            )
        text_from = (
            load_saved(cfg.model.qformer_text_from, "model.qformer_text_from")
            if cfg.model.qformer_text_from
            else None
        )
        if text_from is not None and not text_from.config.qformer.text:
            raise UserError(
                f"model.qformer_text_from: {cfg.model.qformer_text_from} has no Q-Former text side; "
                "name a stage-1 model (one with ITC/ITM heads)"
            )
        try:
            return InstructBridge.from_bridge(model, text_from=text_from)
        except RuntimeError as e:  # load_state_dict: tensors of other shapes
            raise UserError(
                f"model.qformer_text_from: {cfg.model.qformer_text_from}'s Q-Former is not the size of "
                f"{cfg.model.init_from}'s ({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})"
            ) from None

    @classmethod
    def text_spec(cls, cfg: TrainConfig, section: DataSection, config: Blip2Config) -> TextSpec:
        from blip2.tokenizers import qformer_tokenizer

        spec = super().text_spec(cfg, section, config)
        instructions = qformer_tokenizer(cfg.model.tokenizer or config.tokenizer, truncation_side="left")
        return dataclasses.replace(spec, prompt="", templates=TEMPLATES, qformer_tokenizer=instructions)
