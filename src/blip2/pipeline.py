"""What users call: `blip2.load(...)` returns one `Pipeline` holding the model, the image processor and
the tokenizers, with `caption` / `ask` (stage-2 models) and `match` / `similarity` (stage-1 models).

```python
import blip2

captioner = blip2.load("Salesforce/blip2-opt-2.7b", dtype="float16", device="cuda")
captioner.caption("dog.jpg")                               # "a dog sitting on the beach"
captioner.ask("dog.jpg", "what is the dog sitting on?")    # "sand"

retriever = blip2.load("Salesforce/blip2-itm-vit-g")
retriever.match(["dog.jpg", "cat.jpg"], ["a dog", "a dog"])   # tensor([0.97, 0.02]): one per pair
retriever.similarity(["dog.jpg", "cat.jpg"], ["a dog", "a cat"])  # (2, 2) cosine matrix

captioner.chat("dog.jpg", "what is it doing?", history=[("what is this?", "a dog")])
for piece in captioner.caption("dog.jpg", stream=True):   # text as it is generated (greedy/sampling)
    print(piece, end="", flush=True)
retriever.embed_images(["dog.jpg"]), retriever.embed_texts(["a dog"])  # (1, Q, E), (1, E)
```

Images are paths, PIL images, arrays or tensors, one or a list; lists are cut into batches of
`Pipeline.batch_size` and moved to the model's device and dtype inside. Text longer than the model
takes is truncated with a `TruncationWarning`; empty text is a `UserError`.

`load` takes a hub id, a transformers BLIP-2 folder, a folder written by `save_pretrained`, or a LAVIS
checkpoint file with the preset it belongs to. `save_pretrained` writes a folder transformers also
loads (`Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`) whenever it has the class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blip2.config import DTYPES, PRESETS, Blip2Config, preset
from blip2.devices import check_device
from blip2.errors import UserError
from blip2.eval.metrics import rerank_score
from blip2.hub import looks_like_hub_id, resolve
from blip2.interop import checkpoint, hf, lavis
from blip2.processing import ImageLike, ImageProcessor

IMAGE_TOKEN = "<image>"

# hub repositories whose name is not a preset name
HUB_PRESETS = {"blip2-itm-vit-g": "blip2-stage1-vit-g", "blip2-itm-vit-g-coco": "blip2-stage1-vit-g-coco"}

CAPTION_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}
ASK_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1}
# generation options under transformers' names, as the command line and the server expose them
GENERATION_OPTIONS = (
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "length_penalty",
    "repetition_penalty",
    "do_sample",
    "top_p",
    "temperature",
)


def check_generation_options(options: Mapping[str, Any]) -> None:
    """Refuse generation options outside their ranges with one sentence (`UserError`), before
    transformers fails on them with a traceback. The command line, the server and `Pipeline`
    generation all check through here.

    Ranges: num_beams >= 1; max_new_tokens >= 1 (transformers refuses 0); min_new_tokens >= 0 and at
    most max_new_tokens; repetition_penalty > 0; temperature > 0 when sampling; 0 < top_p <= 1.
    """

    def number(name: str, integer: bool = False) -> float | None:
        value = options.get(name)
        if value is None:
            return None
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise UserError(f"{name} must be {'a whole number' if integer else 'a number'}, not {value!r}")
        return value

    beams = number("num_beams", integer=True)
    if beams is not None and beams < 1:
        raise UserError(f"num_beams must be 1 or more (got {beams})")
    most, least = number("max_new_tokens", integer=True), number("min_new_tokens", integer=True)
    if most is not None and most < 1:
        raise UserError(f"max_new_tokens must be 1 or more (got {most})")
    if least is not None and least < 0:
        raise UserError(f"min_new_tokens must be 0 or more (got {least})")
    if most is not None and least is not None and least > most:
        raise UserError(f"min_new_tokens ({least}) must not be more than max_new_tokens ({most})")
    penalty = number("repetition_penalty")
    if penalty is not None and not penalty > 0:
        raise UserError(f"repetition_penalty must be more than 0 (1: no penalty; got {penalty})")
    temperature = number("temperature")
    if options.get("do_sample") and temperature is not None and not temperature > 0:
        raise UserError(f"temperature must be more than 0 when sampling (got {temperature})")
    top_p = number("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be more than 0 and at most 1 (got {top_p})")


STAGE1_USE = "a stage-1 (retrieval) checkpoint such as Salesforce/blip2-itm-vit-g"
STAGE2_USE = "a stage-2 (generative) checkpoint such as Salesforce/blip2-opt-2.7b"


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One ranked image of `Pipeline.search`."""

    index: int  # position in the images searched
    itc: float  # ITC cosine similarity with the query
    itm: float | None  # ITM match probability (None when not re-ranked)
    score: float | None = None  # what re-ranked hits are ordered by: `eval.metrics.rerank_score`


class TruncationWarning(UserWarning):
    """Text longer than the model takes was cut; the message says which text and where."""


class Pipeline:
    """A loaded BLIP-2 model with its image processor and tokenizers.

    Attributes:
        model: `RetrievalModel` (retrieval: `match`, `similarity`) or `LanguageBridge` (`caption`, `ask`).
        image_processor: images to pixel tensors (transformers' BLIP processor, bit for bit).
        qformer_tokenizer: the Q-Former's BERT tokenizer (stage 1), else None.
        llm_tokenizer: the LLM's tokenizer (stage 2), else None.
    """

    batch_size: int = 16  # images per forward pass when a list is given

    def __init__(
        self,
        model: nn.Module,
        image_processor: ImageProcessor,
        qformer_tokenizer: Any = None,
        llm_tokenizer: Any = None,
    ):
        self.model = model.eval()
        self._generate_lock = threading.Lock()  # tokenizer padding side is shared state
        self.image_processor = image_processor
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        if self.config.stage == 2:
            if llm_tokenizer is None:
                raise ValueError("a stage-2 pipeline needs the LLM's tokenizer")
            eos_text = self.config.llm.eos_text
            if eos_text:
                self.model.eos_token_id = _first_id(llm_tokenizer, eos_text)
        elif qformer_tokenizer is None:
            raise ValueError("a stage-1 pipeline needs the Q-Former's tokenizer")

    # ------------------------------------------------------------------------------------- basics

    @property
    def config(self) -> Blip2Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    def to(self, device: str | torch.device) -> Pipeline:
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        kind = "stage 2 (caption, ask)" if self.config.stage == 2 else "stage 1 (match, similarity)"
        return f"Pipeline({self.config.name or 'blip2'}: {kind}, device={self.device})"

    def pixels(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images (paths, PIL images, arrays, ...) to `(B, 3, S, S)` pixel values on the model's device."""
        return self.image_processor(images).to(self.device)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The methods this checkpoint offers."""
        if self.config.stage == 2:
            return ("caption", "ask", "chat", "generate")
        return ("match", "similarity", "search", "embed_images", "embed_texts")

    def check_task(self, task: str) -> None:
        """Raise a `UserError` naming the checkpoint to use when this one does not offer `task`."""
        if task not in self.tasks:
            self._require(1 if self.config.stage == 2 else 2, task)

    def _require(self, stage: int, what: str) -> None:
        if self.config.stage != stage:
            use = STAGE2_USE if stage == 2 else STAGE1_USE
            raise UserError(
                f"{what} needs {use}; this is a stage-{self.config.stage} checkpoint, which offers "
                f"{', '.join(self.tasks)}"
            )

    def _images(self, images: ImageLike | Sequence[ImageLike]) -> list[Any]:
        """One image or a list as a list; a `(B, C, H, W)` tensor is B images."""
        batch = list(images) if _is_batch(images) else [images]
        if not batch:
            raise UserError("no images given")
        return batch

    def _chunks(self, n: int) -> list[slice]:
        step = max(1, int(self.batch_size))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _check_texts(self, texts: Sequence[str], what: str) -> list[str]:
        out = []
        for t in texts:
            if not isinstance(t, str):
                raise UserError(f"{what} must be text, not {type(t).__name__}")
            if not t.strip():
                raise UserError(f"a {what} is empty: give some words")
            out.append(t)
        return out

    def _truncate_llm_text(self, text: str, what: str, template: str = "{}") -> str:
        """Cut `text` so that `template.format(text)` fits the LLM's `max_txt_len` tokens (special
        tokens included), with a `TruncationWarning` when it is cut."""
        limit, tok = self.config.llm.max_txt_len, self.llm_tokenizer
        if len(tok(template.format(text))["input_ids"]) <= limit:
            return text
        room = max(1, limit - len(tok(template.format(""))["input_ids"]))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        warnings.warn(
            f"the {what} is {len(ids)} tokens long; it was cut to fit the model's {limit}-token prompt",
            TruncationWarning,
            stacklevel=3,
        )
        return tok.decode(ids[:room], skip_special_tokens=True)

    def _encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
        """LLM input ids and mask of the prompts on the device (None, None for empty prompts), each cut
        to the LLM's `max_txt_len` tokens as LAVIS does, with a `TruncationWarning` when one is cut."""
        tok, limit = self.llm_tokenizer, self.config.llm.max_txt_len
        longest = max((len(ids) for ids in tok(list(prompts))["input_ids"]), default=0)
        if longest > limit:
            warnings.warn(
                f"a prompt is {longest} tokens long; it was cut to the model's {limit}",
                TruncationWarning,
                stacklevel=4,
            )
        with self._generate_lock:
            tok.padding_side = "left" if not self.model.is_encoder_decoder else "right"
            enc = tok(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        if enc["input_ids"].shape[1] == 0:
            return None, None
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ------------------------------------------------------------------------------------- stage 2

    def check_generation_length(self, prompts: Sequence[str], generate_options: Mapping[str, Any]) -> None:
        """Refuse (`UserError`) generation options (`max_new_tokens`, or else `max_length`) that, after
        the longest of `prompts`, need more positions than the LLM reads
        (`LanguageBridge.check_generation_length`), before any image is read."""
        self._require(2, "generate")
        if not prompts or all(generate_options.get(k) is None for k in ("max_new_tokens", "max_length")):
            return
        from blip2.models import language

        longest = max(len(ids) for ids in self.llm_tokenizer(list(prompts))["input_ids"])
        if longest == 0:  # no prompt: generation starts from the LM's start token, if it has one
            longest = int(language.start_token_id(self.model.llm) is not None)
        self.model.check_generation_length(
            min(longest, self.config.llm.max_txt_len),
            generate_options.get("max_new_tokens"),
            generate_options.get("max_length"),
        )

    @torch.no_grad()
    def generate(
        self, images: ImageLike | Sequence[ImageLike], prompts: Sequence[str], **generate_options: Any
    ) -> list[str]:
        """Text generated for each image after its prompt (new text only, stripped); instructed
        generation with any prompt. Lists are run `batch_size` images at a time. A prompt longer than
        the LLM's `max_txt_len` tokens is cut to them (as LAVIS), with a `TruncationWarning`."""
        self._require(2, "generate")
        batch, prompts = self._images(images), list(prompts)
        if len(batch) != len(prompts):
            raise UserError(f"got {len(batch)} images and {len(prompts)} prompts: pass one prompt per image")
        out: list[str] = []
        for s in self._chunks(len(batch)):
            out += self.generate_from_pixels(self.pixels(batch[s]), prompts[s], **generate_options)
        return out

    @torch.no_grad()
    def generate_from_pixels(
        self, pixel_values: Tensor, prompts: Sequence[str], **generate_options: Any
    ) -> list[str]:
        """`generate` on already processed `(B, 3, S, S)` pixels (`image_processor` output), one batch."""
        self._require(2, "generate")
        check_generation_options(generate_options)
        input_ids, mask = self._encode_prompts(prompts)
        ids = self.model.generate(pixel_values.to(self.device), input_ids, mask, **generate_options)
        return [t.strip() for t in self.llm_tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def stream(self, image: ImageLike, prompt: str | None = None, **generate_options: Any) -> Iterator[str]:
        """Generate for one image after `prompt`, yielding the text piece by piece as it is produced.

        Built on transformers' `TextIteratorStreamer`: greedy decoding or sampling (`do_sample=True`);
        beam search cannot stream (it only knows the best text at the end), so `num_beams` must be 1.
        Default: greedy, at most 30 new tokens. `"".join(pieces).strip()` is the generated text.
        """
        self._require(2, "stream")
        from transformers import TextIteratorStreamer

        opts = {"max_new_tokens": 30, "min_new_tokens": 1, **generate_options, "num_beams": 1}
        if generate_options.get("num_beams", 1) != 1:
            raise UserError("streaming works with greedy decoding or sampling only: drop num_beams")
        check_generation_options(opts)
        prompt = self.config.llm.prompt if prompt is None else prompt
        pixels = self.pixels(image)  # errors about the image surface here, before the thread starts
        input_ids, mask = self._encode_prompts([prompt])
        streamer = TextIteratorStreamer(self.llm_tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(pixels, input_ids, mask, streamer=streamer, **opts)
            except BaseException as e:  # re-raised in the caller's thread
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        first = True
        for piece in streamer:
            if first:
                piece, first = piece.lstrip(), not piece.strip()
            if piece:
                yield piece
        thread.join()
        if failure:
            raise failure[0]

    def caption(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompt: str | None = None,
        *,
        stream: bool = False,
        **generate_options: Any,
    ) -> str | list[str] | Iterator[str]:
        """Caption one image (a string back) or several (a list).

        Args:
            images: a path, PIL image, array or tensor, or a list of them.
            prompt: text the caption continues (default: the checkpoint's, e.g. "a photo of" for COCO).
            stream: yield the caption of one image piece by piece (greedy or sampling; see `stream`).
            generate_options: transformers `generate` options; default beam search with 5 beams and at
                most 30 new tokens (LAVIS's captioning settings).
        """
        self._require(2, "caption")
        if stream:
            return self.stream(images, prompt, **generate_options)
        batch = self._images(images)
        prompt = self.config.llm.prompt if prompt is None else prompt
        out = self.generate(batch, [prompt] * len(batch), **{**CAPTION_DEFAULTS, **generate_options})
        return out if _is_batch(images) else out[0]

    def ask(
        self,
        images: ImageLike | Sequence[ImageLike],
        questions: str | Sequence[str],
        *,
        stream: bool = False,
        **generate_options: Any,
    ) -> str | list[str] | Iterator[str]:
        """Answer questions about images: one question per image, or one image or question for all.

        Questions are put in the checkpoint's template ("Question: {} Answer:" for OPT, "Question: {}
        Short answer:" for FlanT5). Default generation: 5 beams, at most 10 new tokens. An empty
        question is a `UserError`; one too long for the template to fit the LLM's `max_txt_len` tokens
        is cut, with a `TruncationWarning`. `stream=True` yields the answer to one question piece by piece.
        """
        self._require(2, "ask")
        batch, qs = self._images(images), [questions] if isinstance(questions, str) else list(questions)
        template = self.config.llm.vqa_template
        qs = [self._truncate_llm_text(q, "question", template) for q in self._check_texts(qs, "question")]
        batch, qs = _broadcast(batch, qs, "images", "questions")
        if stream:
            if len(batch) != 1:
                raise UserError("streaming answers one question about one image at a time")
            return self.stream(batch[0], template.format(qs[0]), **{"max_new_tokens": 10, **generate_options})
        opts = {**ASK_DEFAULTS, "length_penalty": -1.0 if self.model.is_encoder_decoder else 0.0}
        out = self.generate(batch, [template.format(q) for q in qs], **{**opts, **generate_options})
        single = not _is_batch(images) and isinstance(questions, str)
        return out[0] if single else out

    def chat_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt of a conversation: earlier turns as "Question: q Answer: a." then the new question
        in the checkpoint's template (the paper's instructed zero-shot image-to-text generation)."""
        template = self.config.llm.vqa_template
        turns = [f"{template.format(q.strip())} {a.strip().rstrip('.')}." for q, a in history]
        return " ".join([*turns, template.format(question.strip())])

    def conversation_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """`chat_prompt` fitted to the LLM's `max_txt_len` tokens: an empty question is a `UserError`, a
        long one is cut, and the oldest turns are left out while the prompt is too long (each with a
        `TruncationWarning`)."""
        self._require(2, "chat")
        (question,) = self._check_texts([question], "question")
        question = self._truncate_llm_text(question.strip(), "question", self.config.llm.vqa_template)
        turns = [(str(q), str(a)) for q, a in history]
        limit = self.config.llm.max_txt_len
        dropped = 0
        while turns and len(self.llm_tokenizer(self.chat_prompt(question, turns))["input_ids"]) > limit:
            turns, dropped = turns[1:], dropped + 1
        if dropped:
            warnings.warn(
                f"the conversation is longer than the model's {limit} tokens; its first {dropped} turn(s) "
                "were left out",
                TruncationWarning,
                stacklevel=3,
            )
        return self.chat_prompt(question, turns)

    def chat(
        self,
        image: ImageLike,
        question: str,
        history: Sequence[tuple[str, str]] = (),
        *,
        stream: bool = False,
        **generate_options: Any,
    ) -> str | Iterator[str]:
        """Answer `question` about one image, given the earlier `(question, answer)` turns.

        The whole conversation goes into the prompt (`chat_prompt`); when it is longer than the LLM's
        `max_txt_len` tokens the oldest turns are dropped, with a `TruncationWarning`. Generation as
        `ask` (5 beams, at most 10 new tokens); `stream=True` yields the answer piece by piece.
        """
        self._require(2, "chat")
        prompt = self.conversation_prompt(question, history)
        if stream:
            return self.stream(image, prompt, **{"max_new_tokens": 10, **generate_options})
        opts = {**ASK_DEFAULTS, "length_penalty": -1.0 if self.model.is_encoder_decoder else 0.0}
        return self.generate([image], [prompt], **{**opts, **generate_options})[0]

    # ------------------------------------------------------------------------------------- stage 1

    def _text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        texts = self._check_texts(texts, "text")
        limit = self.config.max_txt_len
        for t in texts:
            n = len(self.qformer_tokenizer(t)["input_ids"])
            if n > limit:
                warnings.warn(
                    f"the text {t[:40]!r}... is {n} tokens long; it was cut to the model's {limit}",
                    TruncationWarning,
                    stacklevel=3,
                )
        enc = self.qformer_tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_txt_len,
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def match(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]) -> Tensor:
        """ITM probability that each (image, text) pair matches, `(N,)`; one image or text may be
        paired with all of the others."""
        self._require(1, "match")
        batch, txt = self._images(images), [texts] if isinstance(texts, str) else list(texts)
        batch, txt = _broadcast(batch, txt, "images", "texts")
        probs = []
        for s in self._chunks(len(batch)):
            probs.append(self.match_pixels(self.pixels(batch[s]), txt[s]))
        return torch.cat(probs)

    @torch.no_grad()
    def match_pixels(self, pixel_values: Tensor, texts: Sequence[str]) -> Tensor:
        """`match` on already processed `(N, 3, S, S)` pixels and N texts, one batch: `(N,)`."""
        self._require(1, "match")
        image_embeds = self.model.encode_image(pixel_values.to(self.device))
        ids, mask = self._text(texts)
        logits = self.model.itm_logits(ids, mask, image_embeds=image_embeds)  # (N, 2)
        return logits.float().softmax(dim=-1)[:, 1].cpu()

    @torch.no_grad()
    def pair_scores(
        self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        """`match` and the ITC cosine of each (image, text) pair (the pairs' entries of `similarity`),
        from one pass of the image encoder: `(N,)` ITM probabilities, `(N,)` cosines."""
        self._require(1, "match")
        batch, txt = self._images(images), [texts] if isinstance(texts, str) else list(texts)
        batch, txt = _broadcast(batch, txt, "images", "texts")
        itm, itc = [], []
        for s in self._chunks(len(batch)):
            emb = self.model.embed_image(self.pixels(batch[s]).to(self.device))
            ids, mask = self._text(txt[s])
            logits = self.model.itm_logits(ids, mask, image_embeds=emb.image_embeds)  # (n, 2)
            itm.append(logits.float().softmax(dim=-1)[:, 1].cpu())
            sims = self.model.itc_scores(emb.image_feats, self.model.embed_text(ids, mask))  # (n, n)
            itc.append(sims.diagonal().float().cpu())
        return torch.cat(itm), torch.cat(itc)

    @torch.no_grad()
    def similarity(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]) -> Tensor:
        """ITC cosine similarity of every image with every text, `(N_images, N_texts)`: the best of the
        image's query embeddings for each text, without temperature (as transformers reports it)."""
        self._require(1, "similarity")
        image_feats = self.embed_images(images)
        text_feats = self.embed_texts(texts)
        return self.model.itc_scores(image_feats.to(self.device), text_feats.to(self.device)).float().cpu()

    @torch.no_grad()
    def search(
        self,
        images: ImageLike | Sequence[ImageLike] | Tensor,
        query: str,
        top_k: int = 10,
        rerank: int = 32,
        pixels: Callable[[list[int]], Tensor] | None = None,
    ) -> list[SearchHit]:
        """Rank images for a text query: ITC similarity over all, then ITM on the best `rerank`, which
        are ordered by ITM positive logit + ITC cosine (`rerank_score`, as retrieval evaluation ranks).

        Args:
            images: images, or their `embed_images` output `(N, Q, E)` (an index built once; ranked
                by ITC alone, as ITM needs the images, unless `pixels` is given).
            query: the text.
            top_k: hits returned.
            rerank: candidates (the best by ITC) re-scored with ITM; 0 ranks by ITC alone.
            pixels: with an index for `images`, a function giving the processed `(n, 3, S, S)` pixels
                of the images at the indices given (`batch_size` at a time, e.g. read again from disk,
                as `blip2 search` does), so that the candidates are re-ranked by ITM too.

        Returns:
            `SearchHit`s, best first: ITM-reranked candidates, then the rest by ITC.
        """
        self._require(1, "search")
        self._check_texts([query], "query")  # before any image is embedded
        if top_k < 1 or rerank < 0:
            raise UserError(f"top_k must be 1 or more and rerank 0 or more (got {top_k} and {rerank})")
        if isinstance(images, Tensor) and images.dim() == 3:
            feats, load = images, pixels
        else:
            batch = self._images(images)
            feats = self.embed_images(batch)

            def load(indices: list[int]) -> Tensor:
                return self.pixels([batch[i] for i in indices])

        itc = self.model.itc_scores(feats.to(self.device), self.embed_texts([query]).to(self.device))
        itc = itc[:, 0].float().cpu()  # (N,)
        order = itc.argsort(descending=True).tolist()
        n_re = min(rerank, len(order)) if load is not None else 0
        head = order[:n_re]
        hits = []
        for s in self._chunks(len(head)):
            idx = head[s]
            hits += self.rerank_pixels(load(idx), query, idx, itc[idx])
        hits.sort(key=lambda h: -(h.score or 0.0))
        hits += [SearchHit(i, float(itc[i]), None) for i in order[n_re:]]
        return hits[:top_k]

    @torch.no_grad()
    def rerank_pixels(
        self, pixel_values: Tensor, query: str, indices: Sequence[int], itc: Tensor | Sequence[float]
    ) -> list[SearchHit]:
        """Re-rank candidates of a search: ITM of each of the `(N, 3, S, S)` pixels with the query, and
        their `rerank_score` from the ITM positive logit and their ITC cosines `itc` (N,); one batch.

        Returns:
            N `SearchHit`s (`indices` as their index), in the order given.
        """
        self._require(1, "search")
        image_embeds = self.model.encode_image(pixel_values.to(self.device))
        ids, mask = self._text([query] * len(indices))
        logits = self.model.itm_logits(ids, mask, image_embeds=image_embeds).float().cpu()  # (N, 2)
        itc = torch.as_tensor(itc, dtype=torch.float32)
        scores = rerank_score(logits[:, 1], itc).tolist()
        probs = logits.softmax(dim=-1)[:, 1].tolist()
        return [
            SearchHit(int(i), float(c), p, s)
            for i, c, p, s in zip(indices, itc.tolist(), probs, scores, strict=True)
        ]

    @torch.no_grad()
    def embed_images(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Normalized ITC embeddings of images, one per query: `(N, Q, E)` (CPU, float32).

        `similarity` is the best query's dot product with a text embedding (`embed_texts`).
        """
        self._require(1, "embed_images")
        batch = self._images(images)
        return torch.cat([self.embed_pixels(self.pixels(batch[s])) for s in self._chunks(len(batch))])

    @torch.no_grad()
    def embed_pixels(self, pixel_values: Tensor) -> Tensor:
        """`embed_images` on already processed `(N, 3, S, S)` pixels, one batch."""
        self._require(1, "embed_images")
        return self.model.embed_image(pixel_values.to(self.device)).image_feats.float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """Normalized ITC embeddings of texts (the [CLS] output), `(N, E)` (CPU, float32). Texts longer
        than the checkpoint's `max_txt_len` tokens are cut, with a `TruncationWarning`."""
        self._require(1, "embed_texts")
        txt = [texts] if isinstance(texts, str) else list(texts)
        step = max(1, int(self.batch_size)) * 4
        feats = []
        for i in range(0, len(txt), step):
            ids, mask = self._text(txt[i : i + step])
            feats.append(self.model.embed_text(ids, mask).float().cpu())
        if not feats:
            raise UserError("no texts given")
        return torch.cat(feats)

    # ------------------------------------------------------------------------------------- saving

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write the model, its configs, the image processor and the tokenizer to a folder.

        Where transformers has the class, the folder loads there unchanged
        (`Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval.from_pretrained(path)`). A
        stage-2 model without an `<image>` token gets one first (added to the tokenizer, the LLM's
        embedding table grown if needed), as transformers' layout requires.
        """
        path = Path(path)
        if self.config.stage == 2:
            _ensure_image_token(self.model, self.llm_tokenizer)
        checkpoint.save_folder(self.model, path)
        hf_processor = _to_transformers_image_processor(self.image_processor)
        hf_processor.save_pretrained(str(path))
        if self.config.stage == 2:
            from transformers import Blip2Processor

            Blip2Processor(
                image_processor=hf_processor,
                tokenizer=self.llm_tokenizer,
                num_query_tokens=self.config.qformer.num_query_tokens,
            ).save_pretrained(str(path))
        else:
            self.qformer_tokenizer.save_pretrained(str(path))


# ------------------------------------------------------------------------------------------- loading


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    preset: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    vision_weights: str | os.PathLike[str] | None = None,
    llm: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Pipeline:
    """Load a BLIP-2 model with its image processor and tokenizers.

    Args:
        name_or_path: one of
            - a hub id (`Salesforce/blip2-opt-2.7b`, `-opt-6.7b`, `-flan-t5-xl`, `-flan-t5-xxl`, the
              `-coco` variants, `blip2-itm-vit-g`): downloaded or taken from the hub cache;
            - a transformers BLIP-2 folder (`config.json` + weights), or a folder from `save_pretrained`;
            - a LAVIS checkpoint file (`blip2_pretrained_opt2.7b.pth`, ...); give `preset` unless the
              file has its released name.
        device: where to put the model (default CPU).
        dtype: "float32" (default), "bfloat16" or "float16" for the frozen image encoder and LLM; the
            Q-Former, queries, `ln_vision` and projection stay in float32.
        preset: the preset a LAVIS checkpoint belongs to (`blip2 presets` lists them).
        revision, cache_dir, local_files_only: hub options (`huggingface_hub.snapshot_download`).
        vision_weights: LAVIS file of the image encoder (`eva_vit_g.pth`, `clip_vit_L.pth`) for LAVIS
            checkpoints without one; default: that file name beside the checkpoint.
        llm: the LLM (transformers folder or hub id) of a LAVIS stage-2 checkpoint; default: the
            preset's (`facebook/opt-2.7b`, `google/flan-t5-xl`, ...).
        tokenizer: the tokenizer folder or hub id when the checkpoint has none beside it.

    Raises:
        UserError: a missing path, an unreachable hub id, a checkpoint that does not fit (naming the
            keys), an unknown dtype or preset.
    """
    if device is not None:
        device = check_device(device)  # a device this machine lacks: one sentence, before any loading
    dtype_name = _dtype_name(dtype)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    name = os.fspath(name_or_path)
    path = resolve(name, **hub)
    if path.is_file():
        pipe = _load_lavis(path, preset, dtype_name, vision_weights, llm, tokenizer, hub)
    elif checkpoint.is_our_folder(path):
        config = checkpoint.with_dtype(checkpoint.read_config(path), dtype_name)
        model = checkpoint.load_folder(path, config)
        pipe = _pipeline(model, path, tokenizer, hub)
    elif (path / "config.json").is_file():
        hf_config = json.loads((path / "config.json").read_text())
        config = hf.config_from_transformers(hf_config, name=path.name)
        config = _with_preset_conventions(config, _hub_preset(name) if looks_like_hub_id(name) else preset)
        model = checkpoint.load_folder(path, checkpoint.with_dtype(config, dtype_name))
        pipe = _pipeline(model, path, tokenizer, hub)
    else:
        raise UserError(f"{path} is neither a BLIP-2 folder (no config.json) nor a checkpoint file")
    return pipe.to(device) if device is not None else pipe


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def _hub_preset(repo_id: str) -> str | None:
    repo = repo_id.split("/")[-1]
    repo = HUB_PRESETS.get(repo, repo)
    return repo if repo in PRESETS else None


def _with_preset_conventions(config: Blip2Config, preset_name: str | None) -> Blip2Config:
    """Conventions a transformers config does not carry (prompt, EOS text, LLM name), from the preset."""
    if preset_name is None:
        return config
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; `blip2 presets` lists them")
    p = preset(preset_name)
    config = dataclasses.replace(config, name=p.name, tokenizer=p.tokenizer, max_txt_len=p.max_txt_len)
    if config.llm is not None and p.llm is not None:
        llm = dataclasses.replace(
            config.llm,
            name=p.llm.name,
            prompt=p.llm.prompt,
            vqa_prompt=p.llm.vqa_prompt,
            eos_text=p.llm.eos_text,
            max_txt_len=p.llm.max_txt_len,
        )
        config = dataclasses.replace(config, llm=llm)
    return config


def _has_tokenizer(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")
    return path.is_dir() and any((path / n).is_file() for n in names)


def _tokenizer_source(
    folder: Path | None, fallback: str | os.PathLike[str] | None, hub: dict[str, Any]
) -> str | None:
    if folder is not None and _has_tokenizer(folder):
        return str(folder)
    if fallback is None or fallback == "":
        return None
    return str(resolve(fallback, **hub)) if not Path(fallback).exists() else os.fspath(fallback)


def _pipeline(
    model: nn.Module,
    folder: Path | None,
    tokenizer: str | os.PathLike[str] | None,
    hub: dict[str, Any],
    llm_folder: Path | None = None,
) -> Pipeline:
    from blip2 import tokenizers

    config: Blip2Config = model.config
    image_processor = _image_processor(folder, config)
    if config.stage == 1:
        source = str(tokenizer) if tokenizer else (str(folder) if folder and _has_tokenizer(folder) else None)
        return Pipeline(model, image_processor, qformer_tokenizer=tokenizers.qformer_tokenizer(source))
    source = _tokenizer_source(folder if tokenizer is None else None, tokenizer or llm_folder, hub)
    if source is None:
        source = _tokenizer_source(None, config.llm.name, hub)
    if source is None:
        raise UserError(
            "no tokenizer found for the LLM: pass --tokenizer (tokenizer= in blip2.load) a folder or hub id"
        )
    return Pipeline(model, image_processor, llm_tokenizer=tokenizers.llm_tokenizer(source))


def _load_lavis(
    path: Path,
    preset_name: str | None,
    dtype: str | None,
    vision_weights: str | os.PathLike[str] | None,
    llm: str | os.PathLike[str] | None,
    tokenizer: str | os.PathLike[str] | None,
    hub: dict[str, Any],
) -> Pipeline:
    preset_name = preset_name or lavis.FILES.get(path.name)
    if preset_name is None:
        raise UserError(
            f"{path.name} is a checkpoint file: say which model it is with --preset NAME on the command "
            "line or preset=NAME in blip2.load (for example blip2-opt-2.7b; `blip2 presets` lists them)"
        )
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r}; `blip2 presets` lists them")
    config = checkpoint.with_dtype(preset(preset_name), dtype)
    if vision_weights is None:
        beside = path.parent / lavis.VISION_FILES.get(config.vision.model_type, "")
        vision_path = beside if beside.is_file() else None
    else:
        vision_path = resolve(vision_weights)
    llm_path = None
    if config.stage == 2:
        llm_source = llm or config.llm.name
        if not llm_source:
            raise UserError(
                f"preset {preset_name!r} names no LLM: pass --llm (llm= in blip2.load) a folder or hub id"
            )
        llm_path = resolve(llm_source, **hub)
    model = checkpoint.load_lavis(path, config, vision_path, llm_path)
    pipe = _pipeline(model, None, tokenizer, hub, llm_folder=llm_path)
    if config.stage == 2:  # convert to the transformers conventions, as the released checkpoints were
        _ensure_image_token(pipe.model, pipe.llm_tokenizer)
    return pipe


# ------------------------------------------------------------------------------------- conventions


def _first_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"the tokenizer turns {text!r} into no tokens; it cannot end generation")
    return int(ids[0])


def _ensure_image_token(model: nn.Module, tokenizer: Any) -> None:
    """Give a stage-2 model transformers' `<image>` placeholder: the token in the tokenizer, its id in
    the config (`image_token_id`), and room for it in the LLM's embedding table.

    The table only grows when the id does not fit (padded to a multiple of 64 as the released
    checkpoints are; new rows are the mean of the old ones). The EOS text (OPT's "\\n") becomes the
    LLM config's EOS, as in the released transformers checkpoints.
    """
    from tokenizers import AddedToken

    config: Blip2Config = model.config
    if config.llm.image_token_id is not None:
        return
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llm = model.llm
    rows = llm.get_input_embeddings().weight.shape[0]
    hf_config = dict(config.llm.hf_config)
    if image_id >= rows:
        _grow_vocab(llm, image_id + 1)
        hf_config["vocab_size"] = llm.get_input_embeddings().weight.shape[0]
    if config.llm.eos_text:
        eos = _first_id(tokenizer, config.llm.eos_text)
        hf_config["eos_token_id"] = llm.config.eos_token_id = llm.generation_config.eos_token_id = eos
    llm_cfg = dataclasses.replace(config.llm, image_token_id=image_id, hf_config=hf_config)
    model.config = dataclasses.replace(config, llm=llm_cfg)


@torch.no_grad()
def _grow_vocab(llm: nn.Module, size: int, multiple: int = 64) -> None:
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


# ------------------------------------------------------------------------------------ image processor


def _image_processor(folder: Path | None, config: Blip2Config) -> ImageProcessor:
    """Our image processor from a folder's `preprocessor_config.json` (hub layout) or
    `processor_config.json` (transformers 5 layout), else from the config."""
    settings: dict[str, Any] | None = None
    if folder is not None:
        if (folder / "preprocessor_config.json").is_file():
            settings = json.loads((folder / "preprocessor_config.json").read_text())
        elif (folder / "processor_config.json").is_file():
            settings = json.loads((folder / "processor_config.json").read_text()).get("image_processor")
    if not settings:
        v = config.vision
        return ImageProcessor(v.image_size, v.image_mean, v.image_std)
    size = settings.get("size", {})
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if isinstance(size, dict) and size.get("width", side) != side:
        raise UserError(f"the image processor resizes to {size}; only square sizes are supported")
    if settings.get("resample", 3) != 3 or settings.get("do_center_crop"):
        raise UserError("the image processor does not resize bicubically without cropping, as BLIP-2's does")
    v = config.vision
    return ImageProcessor(
        int(side or v.image_size),
        settings.get("image_mean", v.image_mean),
        settings.get("image_std", v.image_std),
    )


def _to_transformers_image_processor(processor: ImageProcessor) -> Any:
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": processor.size, "width": processor.size},
        resample=3,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(x) for x in processor.mean],
        image_std=[float(x) for x in processor.std],
        do_convert_rgb=True,
    )


# --------------------------------------------------------------------------------------------- utils


def _is_batch(images: Any) -> bool:
    """A list or tuple of images, or a `(B, C, H, W)` tensor."""
    return isinstance(images, (list, tuple)) or (isinstance(images, torch.Tensor) and images.dim() == 4)


def _broadcast(a: list[Any], b: list[Any], name_a: str, name_b: str) -> tuple[list[Any], list[Any]]:
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    raise UserError(f"got {len(a)} {name_a} and {len(b)} {name_b}: pass as many of each, or one of either")
