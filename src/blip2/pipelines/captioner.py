"""A stage-2 checkpoint as users call it: `Captioner` captions, answers, chats and streams.

```python
captioner = blip2.load("Salesforce/blip2-opt-2.7b", dtype="float16", device="cuda")
captioner.caption("dog.jpg")                               # "a dog sitting on the beach"
captioner.ask("dog.jpg", "what is the dog sitting on?")    # "sand"
captioner.chat("dog.jpg", "what is it doing?", history=[("what is this?", "a dog")])
for piece in captioner.caption("dog.jpg", stream=True):   # text as it is generated (greedy/sampling)
    print(piece, end="", flush=True)
```
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from blip2 import llm_families
from blip2.errors import UserError
from blip2.generation import Decoding
from blip2.interop.surgery import first_id
from blip2.pipelines.base import Pipeline, TruncationWarning, broadcast, is_batch
from blip2.processing import ImageLike, ImageProcessor

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
    transformers fails on them with a traceback. The command line, the server and `Captioner`
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


class Captioner(Pipeline):
    """A stage-2 (generative) model with its image processor and the LLM's tokenizer.

    Generation options are transformers' `generate` options, plus `decode_mode` (one of
    `Decoding.MODES`; default "fast": greedy search through the lean loop, the same tokens).

    Attributes:
        model: `LanguageBridge` (image encoder, Q-Former, projection, frozen LLM).
        llm_tokenizer: the LLM's tokenizer.
        decoding: how the model's generation decodes, and its caches (`blip2.generation.Decoding`).
    """

    methods: ClassVar[tuple[str, ...]] = ("caption", "ask", "chat", "generate")
    checkpoint_kind: ClassVar[str] = "a stage-2 (generative) checkpoint such as Salesforce/blip2-opt-2.7b"

    def __init__(self, model: nn.Module, image_processor: ImageProcessor, llm_tokenizer: Any):
        super().__init__(model, image_processor)
        self._generate_lock = threading.Lock()  # tokenizer padding side is shared state
        self.llm_tokenizer = llm_tokenizer
        self.decoding = Decoding()
        if self.config.llm.eos_text:
            self.model.eos_token_id = first_id(llm_tokenizer, self.config.llm.eos_text)

    def _tokenizers(self) -> tuple[Any, Any]:
        return self.llm_tokenizer, None

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

    def _encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The model's inputs for the prompts, on the device: the LLM's `input_ids` and `attention_mask`
        (none for empty prompts), each cut to the LLM's `max_txt_len` tokens as LAVIS does, with a
        `TruncationWarning` when one is cut. The one place prompts become model inputs."""
        tok, limit, chat = self.llm_tokenizer, self.config.llm.max_txt_len, self.config.llm.chat_template
        prompts = list(prompts)
        longest = max(
            (len(ids) for ids in llm_families.encode_prompts(tok, prompts, chat)["input_ids"]), default=0
        )
        if longest > limit:
            warnings.warn(
                f"a prompt is {longest} tokens long; it was cut to the model's {limit}",
                TruncationWarning,
                stacklevel=4,
            )
        with self._generate_lock:
            tok.padding_side = llm_families.padding_side(self.model.is_encoder_decoder, generation=True)
            enc = llm_families.encode_prompts(
                tok, prompts, chat, padding=True, truncation=True, max_length=limit, return_tensors="pt"
            )
        if enc["input_ids"].shape[1] == 0:
            return {}
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    def check_generation_length(self, prompts: Sequence[str], generate_options: Mapping[str, Any]) -> None:
        """Refuse (`UserError`) generation options (`max_new_tokens`, or else `max_length`) that, after
        the longest of `prompts`, need more positions than the LLM reads
        (`LanguageBridge.check_generation_length`), before any image is read."""
        if not prompts or all(generate_options.get(k) is None for k in ("max_new_tokens", "max_length")):
            return
        from blip2.models import language

        encoded = llm_families.encode_prompts(
            self.llm_tokenizer, list(prompts), self.config.llm.chat_template
        )
        longest = max(len(ids) for ids in encoded["input_ids"])
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
        check_generation_options(generate_options)
        inputs = self._encode_prompts(prompts)
        ids = self._generate_ids(pixel_values.to(self.device), **inputs, **generate_options)
        return [t.strip() for t in self.llm_tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _generate_ids(self, pixel_values: Tensor, **inputs_and_options: Any) -> Tensor:
        """The model's new token ids for its inputs (`_encode_prompts`) under the generate options,
        decoded by `self.decoding` (`decode_mode` picks the way)."""
        mode = inputs_and_options.pop("decode_mode", None)
        return self.decoding.generate(self.model, pixel_values, mode=mode, **inputs_and_options)

    def stream(self, image: ImageLike, prompt: str | None = None, **generate_options: Any) -> Iterator[str]:
        """Generate for one image after `prompt`, yielding the text piece by piece as it is produced.

        Built on transformers' `TextIteratorStreamer`: greedy decoding or sampling (`do_sample=True`);
        beam search cannot stream (it only knows the best text at the end), so `num_beams` must be 1.
        Default: greedy, at most 30 new tokens. `"".join(pieces).strip()` is the generated text.
        """
        from transformers import TextIteratorStreamer

        opts = {"max_new_tokens": 30, "min_new_tokens": 1, **generate_options, "num_beams": 1}
        if generate_options.get("num_beams", 1) != 1:
            raise UserError("streaming works with greedy decoding or sampling only: drop num_beams")
        check_generation_options(opts)
        prompt = self.config.llm.prompt if prompt is None else prompt
        pixels = self.pixels(image)  # errors about the image surface here, before the thread starts
        inputs = self._encode_prompts([prompt])
        streamer = TextIteratorStreamer(self.llm_tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self._generate_ids(pixels, **inputs, streamer=streamer, **opts)
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
        if stream:
            return self.stream(images, prompt, **generate_options)
        batch = self._images(images)
        prompt = self.config.llm.prompt if prompt is None else prompt
        out = self.generate(batch, [prompt] * len(batch), **{**CAPTION_DEFAULTS, **generate_options})
        return out if is_batch(images) else out[0]

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
        batch, qs = self._images(images), [questions] if isinstance(questions, str) else list(questions)
        template = self.config.llm.vqa_template
        qs = [self._truncate_llm_text(q, "question", template) for q in self._check_texts(qs, "question")]
        batch, qs = broadcast(batch, qs, "images", "questions")
        if stream:
            if len(batch) != 1:
                raise UserError("streaming answers one question about one image at a time")
            return self.stream(batch[0], template.format(qs[0]), **{"max_new_tokens": 10, **generate_options})
        opts = {**ASK_DEFAULTS, "length_penalty": -1.0 if self.model.is_encoder_decoder else 0.0}
        out = self.generate(batch, [template.format(q) for q in qs], **{**opts, **generate_options})
        single = not is_batch(images) and isinstance(questions, str)
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
        prompt = self.conversation_prompt(question, history)
        if stream:
            return self.stream(image, prompt, **{"max_new_tokens": 10, **generate_options})
        opts = {**ASK_DEFAULTS, "length_penalty": -1.0 if self.model.is_encoder_decoder else 0.0}
        return self.generate([image], [prompt], **{**opts, **generate_options})[0]
