"""Unimodal pre-training of the demo's two frozen towers, each on one modality only.

* The image encoder is a small transformers `ResNetModel` whose last feature map (`4 x 4 x 128` for a
  64-pixel image) becomes the token grid. It learns from images alone: linear heads on the grid's average
  predict the renderer's scene labels (shape, colour, size, position). It never sees text. The
  heads are thrown away; the tower is saved with `save_pretrained`.
* The language model is a 4-layer, 128-wide transformers `GPT2LMHeadModel` with a word-level tokenizer
  built with the `tokenizers` library (`blip2 demo --llm` trains a Llama or Qwen2 of the same size the
  same way, `lm_config`). It learns from text alone: documents of the grammar made of a
  scene's description and a second part that the first determines (a paraphrase after the caption
  prompt, or a question in the model's VQA template with its answer), joined by the BOS token:
  `a large red circle on the left . <s> caption : there is a large red circle on the left </s>` or
  `... . <s> question : what colour is the circle ? answer : red </s>`, with the loss on the part
  after the description only (`encode_documents` says why). In stage 2 the Q-Former's soft
  prompt takes the place of the description, exactly: the description has as many tokens as the
  Q-Former has queries (`description`), so `<s>` and the text prompt after the soft prompt sit where
  the LM always saw them. A tiny LM reads the description by position (shifted by one token, its
  answers fall to near chance), so this alignment is what lets a soft prompt learned on captions
  alone also answer questions. The text prompt after `<s>` then picks the mode: `caption :` in stage 2,
  `question : ... answer :` for zero-shot VQA.

Both are ordinary checkpoints (`from_pretrained` folders) that BLIP-2's loaders take like any other
tower or LLM.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.demo import world as W
from blip2.models import onednn

LM_SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
QFORMER_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


# ------------------------------------------------------------------------------------------- image side


def resnet_config(width: int = 128) -> dict:
    """transformers config of the demo's image tower: a 3-stage basic-block ResNet.

    64 px in: the stem (stride 4) gives 16 x 16, the later stages (stride 2 each) 8 x 8 and 4 x 4:
    16 tokens of `width` channels.
    """
    return {
        "model_type": "resnet",
        "num_channels": 3,
        "embedding_size": 32,
        "hidden_sizes": [32, 64, width],
        "depths": [1, 1, 1],
        "layer_type": "basic",
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
    }


@dataclass
class PretrainResult:
    """A pre-trained tower's folder, its loss curve and how long it took."""

    path: str
    losses: list[float]
    seconds: float
    extra: dict[str, float]


class _LabelHeads(nn.Module):
    """Linear classifiers of each scene label over the grid's average (training only).

    Averaging over the grid means the position label can only be read from the features themselves,
    so every token learns to carry where it is (a CNN can tell from the zero padding at the borders):
    the Q-Former's cross-attention has no position embedding of the grid to tell it otherwise.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(channels, n) for k, n in W.LABEL_CLASSES.items()})

    def forward(self, grid: Tensor) -> dict[str, Tensor]:
        pooled = grid.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        return {k: head(pooled) for k, head in self.heads.items()}


def pretrain_image_encoder(
    pixels: Tensor,
    labels: dict[str, Tensor],
    out_dir: str,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Train a small ResNet to predict scene labels from pixels, then save the tower alone.

    Args:
        pixels: `(N, 3, S, S)` processed training images.
        labels: label name -> `(N,)` class indices (`world.Scene.labels`).
        out_dir: where the tower is saved (`ResNetModel.save_pretrained`).
        steps: optimizer steps (batches drawn with replacement per epoch order).
        progress: called with (step, loss) after every step.
    """
    import transformers

    start = time.perf_counter()
    torch.manual_seed(seed)
    cfg = dict(resnet_config())
    cfg.pop("model_type")
    tower = transformers.ResNetModel(transformers.ResNetConfig(**cfg))
    heads = _LabelHeads(tower.config.hidden_sizes[-1])
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = _warmup_cosine(opt, steps, warmup=max(1, steps // 20))
    gen = torch.Generator().manual_seed(seed)
    n = pixels.shape[0]
    losses: list[float] = []
    order = torch.randperm(n, generator=gen)
    cursor = 0
    tower.train()
    for step in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        logits = heads(tower(pixel_values=pixels[idx]).last_hidden_state)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in logits) / len(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1])
    tower.eval()
    with torch.no_grad():
        logits = heads(tower(pixel_values=pixels[:1024]).last_hidden_state)
        acc = {
            f"train_acc_{k}": float((v.argmax(-1) == labels[k][:1024]).float().mean())
            for k, v in logits.items()
        }
    tower.save_pretrained(out_dir)
    return PretrainResult(out_dir, losses, time.perf_counter() - start, acc)


# ------------------------------------------------------------------------------------------- text side


def _word_level_tokenizer(texts: Sequence[str], specials: Sequence[str], unk: str, template: str, **names):
    """A lowercase word-level `PreTrainedTokenizerFast` over the words of `texts` (specials first)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(specials)))
    first, *_ = template.split()
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        pair=template + " $B",
        special_tokens=[(t, tok.token_to_id(t)) for t in specials if t in template],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def lm_tokenizer(texts: Sequence[str]):
    """The LM's word-level tokenizer: `<s>` starts every text (as OPT's tokenizer does)."""
    s = LM_SPECIAL
    return _word_level_tokenizer(
        texts,
        [s["pad"], s["unk"], s["bos"], s["eos"]],
        s["unk"],
        f"{s['bos']} $A",
        bos_token=s["bos"],
        eos_token=s["eos"],
        pad_token=s["pad"],
        unk_token=s["unk"],
    )


def qformer_tokenizer(texts: Sequence[str]):
    """The Q-Former's word-level tokenizer, BERT-style: `[CLS] ... [SEP]`, `[PAD]` = 0, `[DEC]` as BOS."""
    return _word_level_tokenizer(
        texts,
        QFORMER_SPECIAL,
        "[UNK]",
        "[CLS] $A [SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )


DESCRIPTION_END = "."  # ends a description: 8 tokens, one per query of the demo's Q-Former


def description(scene: W.Scene) -> str:
    """The first part of the LM's documents, the part the soft prompt stands in for: the canonical
    caption and a full stop (`a large red circle on the left .`, 8 tokens)."""
    return f"{W.canonical_caption(scene)} {DESCRIPTION_END}"


def lm_corpus(
    n_docs: int,
    vqa_template: str,
    caption_prompt: str,
    seed: int,
    p_caption: float = 0.5,
    question_weights: dict[str, float] | None = None,
) -> list[tuple[str, str]]:
    """Text-only documents `(first, rest)`: a scene's `description`, then a paraphrase after the
    caption prompt (probability `p_caption`), or a question in the VQA template with its answer. The
    first part determines the rest, so a soft prompt standing in its place steers what follows.
    Scenes are drawn from the whole grammar (a language model knows the language), not from the image
    training set."""
    rng = random.Random(seed)
    scenes = W.World().scenes
    kinds = list(W.QUESTIONS)
    question_weights = question_weights or {}
    docs = []
    for _ in range(n_docs):
        scene = rng.choice(scenes)
        if rng.random() < p_caption:
            rest = f"{caption_prompt} {rng.choice(W.captions(scene))}"
        else:
            kind = rng.choices(kinds, weights=[question_weights.get(k, 1.0) for k in kinds])[0]
            q, a = W.question(scene, kind, rng)
            rest = W.vqa_text(vqa_template, q, a)
        docs.append((description(scene), rest))
    return docs


def grammar_texts(vqa_template: str, caption_prompt: str) -> list[str]:
    """Every caption and question-answer text of the grammar (to build vocabularies)."""
    rng = random.Random(0)
    texts = [caption_prompt]
    for scene in W.World().scenes:
        texts.append(description(scene))
        texts.extend(W.captions(scene))
        for kind in W.QUESTIONS:
            for _ in range(6):
                texts.append(W.vqa_text(vqa_template, *W.question(scene, kind, rng)))
    return texts


def encode_documents(tokenizer, docs: Sequence[tuple[str, str]]) -> tuple[Tensor, Tensor, Tensor]:
    """`first <s> rest </s>` ids, right padded: `(N, L)` ids, mask and labels.

    The labels (-100 = no loss) cover `<s> rest </s>` only: the LM learns to continue a description,
    not to predict one. The soft prompt takes the description's place, so predicting it buys nothing,
    and it costs: after `on the` the description goes on with `left` or `right` equally often, and
    with tied input/output embeddings that loss pulls such interchangeable words together until the
    tiny LM cannot tell them apart (trained on every token, it answered "left" for every object on
    the right, in questions and captions alike).
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    firsts = tokenizer([f for f, _ in docs], add_special_tokens=False)["input_ids"]
    rests = tokenizer([r for _, r in docs], add_special_tokens=False)["input_ids"]
    seqs = [a + [bos] + b + [eos] for a, b in zip(firsts, rests, strict=True)]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, first) in enumerate(zip(seqs, firsts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(first) : len(s)] = ids[i, len(first) : len(s)]
    return ids, mask, labels


def gpt2_config(tokenizer, layers: int = 4, width: int = 128, heads: int = 4) -> dict:
    return {
        "model_type": "gpt2",
        "vocab_size": len(tokenizer),
        "n_embd": width,
        "n_layer": layers,
        "n_head": heads,
        "n_positions": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "activation_function": "gelu",  # one fused op (GPT-2's default "gelu_new" is several)
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


LM_FAMILIES = ("gpt2", "llama", "qwen2")  # the demo's LM, and the other families `blip2 demo --llm` trains


def lm_config(family: str, tokenizer, layers: int = 4, width: int = 128, heads: int = 4) -> dict:
    """transformers config of a small LM of `family` (`LM_FAMILIES`) over `tokenizer`'s vocabulary.

    Llama and Qwen2 are built as big as the demo's GPT-2 (about 0.8 M parameters): the same depth,
    width and heads, tied input/output embeddings, no dropout, and a SwiGLU feed-forward of 344 (three
    matrices of `width x 344` hold as many weights as GPT-2's two of `width x 4 width`). They differ from
    GPT-2 in what makes them a family: rotary positions instead of a learned table, RMSNorm, SwiGLU
    (and Qwen2's biases on the query, key and value projections).
    """
    if family == "gpt2":
        return gpt2_config(tokenizer, layers, width, heads)
    if family not in LM_FAMILIES:
        raise ValueError(f"no small LM of family {family!r}: one of {', '.join(LM_FAMILIES)}")
    return {
        "model_type": family,
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": 344,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def pretrain_lm(
    tokenizer,
    docs: Sequence[tuple[str, str]],
    out_dir: str,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    config: dict | None = None,
) -> PretrainResult:
    """Train a small LM on the text documents, then save it and its tokenizer to `out_dir`.

    Args:
        config: the LM's transformers config (`model_type` and fields, see `lm_config`); default the
            demo's GPT-2 (`gpt2_config`). Built with `AutoModelForCausalLM`.
    """
    import transformers

    start = time.perf_counter()
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**(config or gpt2_config(tokenizer)))
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    ids, mask, labels = encode_documents(tokenizer, docs)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = _warmup_cosine(opt, steps, warmup=max(1, steps // 20))
    gen = torch.Generator().manual_seed(seed)
    n = ids.shape[0]
    losses: list[float] = []
    lm.train()
    with onednn.linears():  # the LM's float32 products through oneDNN (`blip2.models.onednn`)
        for step in range(steps):
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            # right padded: columns past the batch's longest document are padding only, and leaving them
            # out changes no loss (causal attention, no label there)
            length = int(mask[idx].sum(dim=1).max())
            out = lm(
                input_ids=ids[idx, :length], attention_mask=mask[idx, :length], labels=labels[idx, :length]
            )
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            losses.append(out.loss.item())
            if progress:
                progress(step, losses[-1])
    lm.eval()
    lm.generation_config.bos_token_id = tokenizer.bos_token_id
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return PretrainResult(out_dir, losses, time.perf_counter() - start, {})


@torch.no_grad()
def lm_answers(lm, tokenizer, firsts: Sequence[str], prompts: Sequence[str], num_beams: int = 1) -> list[str]:
    """What the language model alone answers after `first <s> prompt` (the true description in place of
    the soft prompt): the ceiling of what a soft prompt can get out of it. Generated as the pipeline
    does (beams, at most 10 new tokens), in groups of equal length (no padding)."""
    bos = tokenizer.bos_token_id
    seqs = [
        tokenizer(f, add_special_tokens=False).input_ids
        + [bos]
        + tokenizer(p, add_special_tokens=False).input_ids
        for f, p in zip(firsts, prompts, strict=True)
    ]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    out = [""] * len(seqs)
    lm.eval()
    for length, idx in groups.items():
        ids = torch.tensor([seqs[i] for i in idx])
        new = lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            num_beams=num_beams,
            max_new_tokens=10,
            min_new_tokens=1,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[:, length:]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
            out[i] = text.strip()
    return out


def _warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
