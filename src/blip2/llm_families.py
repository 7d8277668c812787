"""What each LLM family expects of its text, decided here and nowhere else.

A frozen LLM reads text the way it was pre-trained: with or without a BOS token first, ended by its
EOS, batched with padding on the side its positions allow. These conventions differ by family and by
checkpoint, so they are read from the LLM's own tokenizer, never assumed from the model type:

| family                  | the tokenizer adds    | EOS (ends targets, stops generation)      | pad if none |
|-------------------------|-----------------------|-------------------------------------------|-------------|
| OPT                     | `</s>` first (BOS)    | `"\\n"` in BLIP-2's checkpoints, else `</s>`| has `<pad>` |
| GPT-2                   | nothing               | `<|endoftext|>`                           | the EOS     |
| Llama, Vicuna, Mistral  | `<s>` first           | `</s>`                                    | the EOS     |
| Qwen2, Qwen3            | nothing               | `<|endoftext|>`; instruct: `<|im_end|>`   | has one     |
| Gemma, Gemma2           | `<bos>` first         | `<eos>`                                   | has `<pad>` |
| Phi-3                   | per checkpoint        | `<|endoftext|>`; instruct: `<|end|>`      | has one     |
| T5, FlanT5 (enc.-dec.)  | `</s>` last (EOS)     | `</s>`                                    | has `<pad>` |

* **BOS**: training texts and prompts are tokenized with the tokenizer's own special tokens, so a
  family whose tokenizer adds a BOS sees `[queries][BOS][text]`, as LAVIS feeds OPT; the prompt's
  length counts it (`prompt_length`). Generation without a prompt starts from the LM config's BOS,
  as transformers' BLIP-2 does (`blip2.models.language.start_token_id`).
* **EOS**: a decoder-only training target ends with `LLMConfig.eos_text` when set (OPT's `"\\n"`),
  else with the tokenizer's EOS, unless the tokenizer appends one itself (`target_suffix`). An
  encoder-decoder tokenizer appends its own.
* **Padding side** (`padding_side`): right for training (the model right-pads decoder-only texts
  anyway) and for an encoder-decoder's encoder; left for decoder-only generation, so new tokens follow
  each row's last real token.
* **Pad token** (`ensure_pad_token`): a tokenizer without one (Llama, Mistral, GPT-2) pads with its
  EOS, else its unknown token, as transformers' BLIP-2 examples and LAVIS's OPT/Vicuna models do; pads
  are masked out of attention and loss, so the id only fills space.
* **Chat template** (`LLMConfig.chat_template`, opt-in): an instruct LLM (Qwen2.5-Instruct, Llama-3.x
  Instruct, Gemma-it, Phi-3-instruct) reads every prompt wrapped as one user turn in its tokenizer's
  chat template, with the assistant's turn opened (`prompt_text`); the template writes its own special
  tokens, so templated text is tokenized without adding more (`add_special_tokens`).

Nothing here imports torch: the functions take a transformers tokenizer and strings.
"""

from __future__ import annotations

from typing import Any

from blip2.errors import UserError


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS before a text (OPT `</s>`, Llama `<s>`, Gemma `<bos>`; not
    GPT-2 or Qwen)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def adds_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its EOS after a text (T5/FlanT5 `</s>`)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id


def target_suffix(tokenizer: Any, eos_text: str | None) -> str:
    """The text that ends a decoder-only LM's training target: `eos_text` when given (OPT's `"\\n"`),
    nothing when the tokenizer appends its EOS itself, else the tokenizer's EOS token."""
    if eos_text is not None:
        return eos_text
    if adds_eos(tokenizer):
        return ""
    return tokenizer.eos_token or ""


def padding_side(is_encoder_decoder: bool, generation: bool) -> str:
    """Where a batch of this LM's texts is padded: "left" for decoder-only generation, else "right"."""
    return "left" if generation and not is_encoder_decoder else "right"


def ensure_pad_token(tokenizer: Any) -> Any:
    """The tokenizer, given a pad token when it has none (its EOS, else its unknown token).

    Raises:
        UserError: it has neither.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    for token in (tokenizer.eos_token, tokenizer.unk_token):
        if token is not None:
            tokenizer.pad_token = token
            return tokenizer
    raise UserError(
        f"the LLM's tokenizer ({type(tokenizer).__name__}) has no pad, EOS or unknown token to pad "
        "batches with: give it a pad token (tokenizer.pad_token = ...) and save it with the model"
    )


def prompt_text(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    """The prompt as the LLM reads it: as given, or (`chat_template`) wrapped as one user turn in the
    tokenizer's chat template with the assistant's turn opened, e.g. Qwen2.5-Instruct's
    `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n` (after its default system turn).

    Raises:
        UserError: `chat_template` is set and the tokenizer has no chat template.
    """
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "llm.chat_template is set but the LLM's tokenizer has no chat template: use an instruct "
            "model's tokenizer (Qwen2.5-Instruct, Llama-3.2-Instruct, ...) or set llm.chat_template to false"
        )
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def add_special_tokens(chat_template: bool) -> bool:
    """Whether tokenizing a prompt adds the tokenizer's special tokens (BOS, ...): not for templated
    text, which holds its own."""
    return not chat_template


def encode_prompts(tokenizer: Any, prompts: list[str], chat_template: bool, **kwargs: Any) -> Any:
    """The tokenizer's output (`input_ids`, `attention_mask`, ...) for prompts as the LLM reads them
    (`prompt_text`), special tokens added unless templated; `kwargs` go to the tokenizer (padding, ...)."""
    texts = [prompt_text(tokenizer, p, chat_template) for p in prompts]
    return tokenizer(texts, add_special_tokens=add_special_tokens(chat_template), **kwargs)


def training_text(prompt: str, target: str, suffix: str, chat_template: bool) -> str:
    """A decoder-only training text: the prompt (as `prompt_text` made it), the target, the suffix
    (`target_suffix`). A plain prompt and the target are joined by a space, as LAVIS joins
    "a photo of" and the caption; a templated prompt ends with the assistant's turn, which the target
    follows directly."""
    if prompt and not chat_template:
        prompt += " "
    return prompt + target + suffix


def prompt_length(tokenizer: Any, prompt: str, chat_template: bool) -> int:
    """The tokens of a prompt as it starts a training text (its BOS included), which the loss skips;
    0 for an empty, untemplated prompt (the target follows the queries directly)."""
    if not prompt and not chat_template:
        return 0
    return len(tokenizer(prompt, add_special_tokens=add_special_tokens(chat_template))["input_ids"])
