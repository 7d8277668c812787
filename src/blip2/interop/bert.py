"""Initialize a Q-Former from a BERT checkpoint, as the paper does.

From BERT: word and position embeddings with their LayerNorm, every layer's self-attention, the text
feed-forward and, where the checkpoint has it, the MLM head (our ITG head). The query feed-forward is
a copy of the text feed-forward (LAVIS copies every `*_query` weight from its BERT twin). New: the
cross-attention blocks, the `[DEC]` row(s) of the vocabulary and, when the checkpoint has no MLM head
(a plain `BertModel`), the ITG head. BERT's token-type embedding and pooler are not used: the
Q-Former has neither.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from blip2.errors import UserError
from blip2.models.qformer import QFormer

# BERT name (after stripping a leading "bert.") -> our names; {i} is the layer index.
EMBEDDING_MAP = {
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}
LAYER_MAP = {
    "attention.self.query": ["self_attn.query"],
    "attention.self.key": ["self_attn.key"],
    "attention.self.value": ["self_attn.value"],
    "attention.output.dense": ["self_attn.out"],
    "attention.output.LayerNorm": ["self_attn.norm"],
    "intermediate.dense": ["text_ffn.fc1", "query_ffn.fc1"],
    "output.dense": ["text_ffn.fc2", "query_ffn.fc2"],
    "output.LayerNorm": ["text_ffn.norm", "query_ffn.norm"],
}
HEAD_MAP = {
    "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_head.norm.bias",
}
UNUSED = ("embeddings.token_type_embeddings.", "pooler.", "embeddings.position_ids", "cls.seq_relationship.")


def read_bert_state_dict(name_or_path: str) -> dict[str, Tensor]:
    """Weights of a BERT checkpoint: a local directory or a hub id (through huggingface_hub).

    Read with safetensors, or `torch.load(weights_only=True)` for `.bin` files: nothing is unpickled.
    """
    path = name_or_path
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                name_or_path, allow_patterns=["*.safetensors", "*.bin", "*.json", "*.txt"]
            )
        except Exception as e:  # offline, unknown repo, ...
            raise UserError(
                f"could not get BERT checkpoint {name_or_path!r} ({type(e).__name__}); "
                "pass a local directory or connect to the Hugging Face hub"
            ) from None
    files = sorted(os.listdir(path))
    safet = [f for f in files if f.endswith(".safetensors")]
    if safet:
        from safetensors.torch import load_file

        state: dict[str, Tensor] = {}
        for f in safet:
            state.update(load_file(os.path.join(path, f)))
        return state
    bins = [f for f in files if f.endswith(".bin")]
    if not bins:
        raise UserError(f"no model.safetensors or pytorch_model.bin in {path}: is it a BERT checkpoint?")
    state = {}
    for f in bins:
        state.update(torch.load(os.path.join(path, f), map_location="cpu", weights_only=True))
    return state


@torch.no_grad()
def init_qformer_from_bert(qformer: QFormer, bert: str | dict[str, Tensor]) -> list[str]:
    """Copy BERT weights into `qformer` (in place).

    Args:
        qformer: a Q-Former whose text side exists and whose width/depth/heads match the BERT.
        bert: a hub id, a local directory, or a state dict (of `BertModel`, `BertForMaskedLM` or
            `BertLMHeadModel`; a leading `bert.` is accepted).

    Returns:
        Names of our parameters that BERT did not provide (they keep their fresh initialization).
    """
    state = read_bert_state_dict(bert) if isinstance(bert, str) else bert
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    ours = dict(qformer.named_parameters())
    filled: set[str] = set()

    def put(src: str, dst: str) -> None:
        value, target = state[src], ours[dst]
        if value.shape != target.shape:
            raise UserError(
                f"BERT weight {src} has shape {tuple(value.shape)} but the Q-Former's {dst} has "
                f"{tuple(target.shape)}: the Q-Former config does not match this BERT"
            )
        target.copy_(value)
        filled.add(dst)

    if qformer.embeddings.word is None:
        raise UserError("this Q-Former has no text side to initialize from BERT (QFormerConfig.text=False)")
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    if n_layers != len(qformer.layers):
        raise UserError(
            f"the BERT has {n_layers} layers but the Q-Former {len(qformer.layers)}: match num_layers"
        )

    word = state["embeddings.word_embeddings.weight"]  # (V_bert, D); our table may hold [DEC] beyond it
    table = ours["embeddings.word.weight"]
    if word.shape[1] != table.shape[1] or word.shape[0] > table.shape[0]:
        raise UserError(
            f"BERT word embeddings {tuple(word.shape)} do not fit the Q-Former's {tuple(table.shape)}: "
            "set hidden_size and vocab_size (BERT vocab + 1 for [DEC])"
        )
    table[: word.shape[0]] = word
    filled.add("embeddings.word.weight")
    for src, dst in EMBEDDING_MAP.items():
        put(src, dst)
    for i in range(n_layers):
        for src, dsts in LAYER_MAP.items():
            for dst in dsts:
                for p in ("weight", "bias"):
                    put(f"encoder.layer.{i}.{src}.{p}", f"layers.{i}.{dst}.{p}")
    if qformer.lm_head is not None and "cls.predictions.bias" in state:
        for src, dst in HEAD_MAP.items():
            put(src, dst)
        bias = state["cls.predictions.bias"]
        qformer.lm_head.bias[: bias.shape[0]] = bias
        filled.add("lm_head.bias")

    used = {"embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.decoder.weight"}
    used |= set(EMBEDDING_MAP) | set(HEAD_MAP)
    used |= {
        f"encoder.layer.{i}.{s}.{p}" for i in range(n_layers) for s in LAYER_MAP for p in ("weight", "bias")
    }
    leftover = [
        k for k in state if k not in used and not k.startswith(UNUSED) and k != "cls.predictions.decoder.bias"
    ]
    if leftover:
        raise UserError(f"unexpected weights in the BERT checkpoint: {', '.join(sorted(leftover)[:5])}")
    return sorted(set(ours) - filled)
