"""From records to model inputs: image decoding and transforms (or cached features), text, collation.

A `Preprocessor` turns one `Record` into a sample (`load`) and a list of samples into a batch of
tensors (`collate`). A sample that cannot be used (an image that does not decode, a missing caption or
answer) raises `BadSample` with a reason; the datasets skip it
and count it under that reason, and the training loop reports the counts.

Text, per objective:

* `qformer`: the cleaned caption, Q-Former BERT ids padded to `max_len` (LAVIS: 32; stage 1);
* `causal` (decoder-only LLM, e.g. OPT): `prompt + caption + eos_text`, with the prompt's tokens (BOS
  included) excluded from the loss; VQA uses the question template as prompt and the first answer;
* `seq2seq` (encoder-decoder LLM, e.g. FlanT5): encoder text = prompt (or the question), decoder
  target = caption (or answer). For pre-training without a prompt (`prefix_split`), each caption is cut
  at a random word in its first half: the head goes to the encoder, the rest is the target (the paper's
  prefix-LM loss; LAVIS issue #139).

With instruction templates (`TextSpec.templates`; InstructBLIP's instruction tuning) every record
becomes an instruction and its answer (`blip2.data.instructions`: a template per caption or VQA record,
one's own instructions as they are): the LLM text is `causal` or `seq2seq` with the instruction as the
prompt, and the instruction is tokenized a second time for the Q-Former (`qformer_input_ids`, `qformer_attention_mask`; long instructions lose their start, as
InstructBLIP truncates on the left).

Augmentation (random resized crop 0.5-1 + flip) draws from a per-sample generator seeded by
`(seed, epoch, sample)`, so a run is reproducible whatever the number of workers and across resumes.
Cached features are never augmented.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from blip2 import llm_families
from blip2.data.annotations import Record
from blip2.data.features import FeatureStore, image_digest
from blip2.data.instructions import instruction_pair
from blip2.errors import UserError
from blip2.processing import ImageError, ImageProcessor, clean_caption, clean_question

MODES = ("qformer", "causal", "seq2seq")


SKIP_REASONS = ("image", "text", "shard")  # every counter a skipped sample is reported under


class BadSample(Exception):
    """A sample to skip; `reason` is the counter it is reported under (one of `SKIP_REASONS`)."""

    def __init__(self, reason: str, message: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(message or reason)
        self.reason = reason


def sample_seed(*parts: object) -> int:
    """A stable 63-bit seed from parts (same value in every process and Python run)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class TextSpec:
    """How texts become token ids.

    Attributes:
        mode: "qformer", "causal" or "seq2seq" (see the module docstring).
        tokenizer: the Q-Former's BERT tokenizer ("qformer") or the LLM's.
        max_len: token budget of the caption / answer (LAVIS: 32).
        prompt: caption prompt for stage 2 ("a photo of" for COCO captioning; "" for pre-training).
        eos_text: appended to each target (OPT: "\\n"); None for the tokenizer's own EOS handling.
        vqa_template: question format for VQA records.
        prefix_split: seq2seq pre-training: split captions into encoder prefix and target.
        templates: instruction templates per record kind (`blip2.data.instructions.TEMPLATES`): every
            record becomes `(instruction, answer)`, the instruction the prompt; None: records as they are.
        qformer_tokenizer: the Q-Former's BERT tokenizer, for the instruction the Q-Former reads.
        instruction_max_len: token budget of that instruction (InstructBLIP: 128).
        chat_template: prompts wrapped in the LLM tokenizer's chat template (`LLMConfig.chat_template`;
            BOS, EOS and padding follow `blip2.llm_families` either way).
    """

    mode: str
    tokenizer: Any
    max_len: int = 32
    prompt: str = ""
    eos_text: str | None = None
    vqa_template: str = "Question: {} Answer:"
    prefix_split: bool = False
    templates: dict[str, tuple[str, ...]] | None = None
    qformer_tokenizer: Any = None
    instruction_max_len: int = 128
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown text mode {self.mode!r}; use one of {MODES}")


class Preprocessor:
    """Record -> sample -> batch.

    Args:
        text: how texts are tokenized.
        images: the image processor (size, mean, std); unused with `features`.
        features: a feature cache to read instead of decoding images.
        augment: apply the train transform (random resized crop + flip); else the eval resize.
        use_image_ids: put `image_ids` in batches (ITC positives shared by captions of one image).
    """

    def __init__(
        self,
        text: TextSpec,
        images: ImageProcessor | None = None,
        features: FeatureStore | None = None,
        augment: bool = True,
        use_image_ids: bool = False,
    ):
        if images is None and features is None:
            raise ValueError("a Preprocessor needs an ImageProcessor or a FeatureStore")
        self.text = text
        self.images = images
        self.features = features
        self.augment = augment and features is None
        self.use_image_ids = use_image_ids

    # ---------------------------------------------------------------------------------- one sample

    def load(self, rec: Record, seed: int) -> dict[str, Any]:
        """Decode one record; raises `BadSample` for one to skip."""
        gen = torch.Generator().manual_seed(seed)
        sample: dict[str, Any] = {"image_id": rec.image_id, "key": rec.key}
        sample.update(self._instruction(rec, seed) if self.text.templates else self._texts(rec, gen))
        if self.features is not None:
            sample["image_features"] = self._cached(rec)
        else:
            if rec.image is None:
                raise BadSample("image", f"{rec.key} has no image")
            try:
                if self.augment:
                    sample["pixel_values"] = self.images.train_transform(rec.image, generator=gen)
                else:
                    sample["pixel_values"] = self.images.preprocess(rec.image)
            except ImageError as e:
                raise BadSample("image", str(e)) from None
        return sample

    def _cached(self, rec: Record) -> torch.Tensor:
        """The record's features from the cache, found by the digest of its image bytes: an image that
        did not decode when the cache was made is skipped as when decoding; one the cache lacks stops
        training (the cache was made from other data)."""
        if rec.image is None:
            raise BadSample("image", f"{rec.key} has no image")
        try:
            digest = image_digest(rec.image)
        except OSError:
            raise BadSample("image", f"{rec.key}: cannot read {rec.image}") from None
        if digest in self.features.unusable:
            raise BadSample("image", f"{rec.key} is not a usable image")
        try:
            return self.features.get(digest)
        except KeyError:
            raise UserError(
                f"the feature cache {self.features.path} has no features for image {rec.key}, so it was "
                "made from other data (or another data.path); re-run `blip2 cache-features` with this "
                "training config"
            ) from None

    def _instruction(self, rec: Record, seed: int) -> dict[str, str]:
        try:
            instruction, answer = instruction_pair(rec, seed, self.text.templates)
        except UserError as e:
            raise BadSample("text", str(e)) from None
        answer = clean_caption(answer) if rec.question is None and rec.instruction is None else answer.strip()
        if not answer or not instruction.strip():
            raise BadSample("text", f"{rec.key}: an empty instruction or answer")
        return {"prompt": instruction.strip(), "target": answer, "instruction": instruction.strip()}

    def _texts(self, rec: Record, gen: torch.Generator) -> dict[str, str]:
        t = self.text
        if rec.question is not None:  # VQA
            if not rec.answers or not str(rec.answers[0]).strip():
                raise BadSample("text", f"{rec.key}: question without an answer")
            if t.mode == "qformer":
                return {"text": clean_caption(f"{rec.question} {rec.answers[0]}")}
            return {"prompt": t.vqa_template.format(clean_question(rec.question)), "target": rec.answers[0]}
        if rec.text is None or not str(rec.text).strip():
            raise BadSample("text", f"{rec.key}: no caption")
        caption = clean_caption(str(rec.text))
        if t.mode == "qformer":
            return {"text": caption}
        if t.mode == "seq2seq" and t.prefix_split and not t.prompt:
            words = caption.split(" ")
            if len(words) < 2:
                return {"prompt": "", "target": caption}
            k = int(torch.randint(1, max(1, len(words) // 2) + 1, (), generator=gen))
            return {"prompt": " ".join(words[:k]), "target": " ".join(words[k:])}
        return {"prompt": t.prompt, "target": caption}

    # ---------------------------------------------------------------------------------- a batch

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack images and tokenize texts: the model's tensors, plus `size` and the samples' `keys`."""
        batch: dict[str, Any] = {"size": len(samples), "keys": [s["key"] for s in samples]}
        for k in ("pixel_values", "image_features"):
            if k in samples[0]:
                batch[k] = torch.stack([s[k] for s in samples])
        t, tok = self.text, self.text.tokenizer
        if t.mode == "qformer":
            enc = tok(
                [s["text"] for s in samples],
                padding="max_length",
                truncation=True,
                max_length=t.max_len,
                return_tensors="pt",
            )
            batch["input_ids"], batch["attention_mask"] = enc["input_ids"], enc["attention_mask"]
            if self.use_image_ids:
                batch["image_ids"] = torch.tensor([s["image_id"] for s in samples], dtype=torch.long)
        elif t.mode == "causal":
            batch.update(self._causal(samples))
        else:
            batch.update(self._seq2seq(samples))
        if t.qformer_tokenizer is not None:
            qtok = t.qformer_tokenizer
            qtok.padding_side, qtok.truncation_side = "right", "left"
            enc = qtok(
                [s["instruction"] for s in samples],
                padding="longest",
                truncation=True,
                max_length=t.instruction_max_len,
                return_tensors="pt",
            )
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = (
                enc["input_ids"],
                enc["attention_mask"],
            )
        return batch

    def _causal(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        t, tok, chat = self.text, self.text.tokenizer, self.text.chat_template
        suffix = llm_families.target_suffix(tok, t.eos_text)
        prompts = [llm_families.prompt_text(tok, s["prompt"], chat) for s in samples]
        texts = [
            llm_families.training_text(p, s["target"], suffix, chat)
            for p, s in zip(prompts, samples, strict=True)
        ]
        prompt_lens = [llm_families.prompt_length(tok, p, chat) for p in prompts]
        tok.padding_side = llm_families.padding_side(is_encoder_decoder=False, generation=False)
        enc = tok(
            texts,
            padding="longest",
            truncation=True,
            max_length=max(prompt_lens) + t.max_len,
            add_special_tokens=llm_families.add_special_tokens(chat),
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "prompt_lengths": torch.tensor(prompt_lens, dtype=torch.long),
        }

    def _seq2seq(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        t, tok, chat = self.text, self.text.tokenizer, self.text.chat_template
        tok.padding_side = llm_families.padding_side(is_encoder_decoder=True, generation=False)
        kw = dict(padding="longest", truncation=True, max_length=t.max_len, return_tensors="pt")
        enc = llm_families.encode_prompts(tok, [s["prompt"] for s in samples], chat, **kw)
        dec = tok([s["target"] for s in samples], **kw)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100),
            "decoder_attention_mask": dec["attention_mask"],
        }


def merge_skips(samples: list[dict[str, Any]]) -> dict[str, int]:
    """Sum the per-sample `skipped` counters (reason -> count) of a batch."""
    total: Counter[str] = Counter()
    for s in samples:
        total.update(s.pop("skipped", {}))
    return dict(total)
