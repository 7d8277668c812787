"""BLIP-2's language bridge: the query outputs as soft visual prompts for a frozen LLM.

Li et al. (2023), section 3.3. The query encoder's outputs (`[B, Q, D]`) go through
`language_projection` (a linear layer into the LLM's embedding width) and are placed before the text:

* decoder-only LM (OPT in the paper; GPT-2, Llama, Qwen, ...): `[queries][prompt + text]`, queries
  always attended;
* encoder-decoder LM (T5 / FlanT5): the encoder reads `[queries][prefix text]`, the decoder predicts
  the rest of the text.

The LLM is the transformers model itself (`self.llm`): frozen (no parameter gradients, no updates) but
differentiable. `forward` gives the LLM's logits and the targets they are scored against; the loss is
the stage-2 task's (`blip2.tasks.stage2`). `generate` uses the LM's own `generate` with
`inputs_embeds`, so greedy, beam search, sampling and the penalties behave exactly as in transformers.
It is two steps, `generation_inputs` and `generate_from_embeds`, that the opt-in speed paths
(`blip2.generation.Decoding`, held by the caller, not the model) reuse around their own image side and
greedy loop. The model takes token ids and never tokenizes.

Precision: the frozen towers run in their configured dtype; the Q-Former and projection keep fp32
weights and, with `autocast_dtype = torch.bfloat16`, compute in bf16 under autocast (fp32 master
weights, no fp32 island).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from blip2.config import Blip2Config, LLMConfig
from blip2.errors import UserError
from blip2.models import language, onednn
from blip2.models.encoders import ImageEncoder
from blip2.models.query_encoder import QueryEncoder


@dataclass
class LMOutput:
    """The frozen LLM's logits on the bridge's inputs, and the targets they are scored against.

    Decoder-only LM: `logits` `(B, K, V)` are the last K positions of `[queries][right-padded text]`
    (all `Q + L` of them unless `forward(loss_only=True)`), `labels` `(B, K)` the tokens at those
    positions (-100: a query, the prompt or padding); position t predicts label t + 1. `order` `(B, L)`
    is how the text was right padded (`text.gather(1, order)`).
    Encoder-decoder LM: `logits` `(B, T, V)` of the decoder and `labels` `(B, T)`; token t predicts
    label t (the decoder's inputs are the labels shifted right).
    """

    logits: Tensor
    labels: Tensor
    order: Tensor | None = None


class LanguageBridge(QueryEncoder):
    """Frozen image encoder -> Q-Former (queries only) -> `language_projection` -> frozen LLM.

    Args:
        config: a stage-2 `Blip2Config` (`config.llm` set; the Q-Former usually has `text=False`).
        vision_tower: a transformers vision model to use instead of random weights, or a whole
            `ImageEncoder` (tower + `ln_vision`), used as is.
        llm: a transformers LM (e.g. `AutoModelForCausalLM.from_pretrained(...)`) to use instead of one
            built from `config.llm.hf_config`; it is frozen and cast to `config.llm.dtype`, and
            `self.config.llm.hf_config` becomes its architecture (the other `LLMConfig` fields are kept).

    Attributes:
        eos_token_id: the id that ends generated text, passed to `generate` (default: the LM's own). The
            caller sets it from `config.llm.eos_text` with its tokenizer (OPT: "\\n" = 50118).
        autocast_dtype: compute dtype of the Q-Former and projection under `torch.autocast` (e.g.
            `torch.bfloat16`); None (default) computes in the weights' dtype (fp32).
        reads_instruction: whether the Q-Former reads the instruction (InstructBLIP's
            `InstructBridge`); a config says the same in `qformer.instruction`, and each type takes
            only its own kind.
    """

    reads_instruction: ClassVar[bool] = False

    def __init__(
        self,
        config: Blip2Config,
        vision_tower: nn.Module | ImageEncoder | None = None,
        llm: nn.Module | None = None,
    ):
        if config.llm is None:
            raise ValueError(
                "a stage-2 model needs an LLM: set Blip2Config.llm (for example preset('tiny-opt'))"
            )
        if config.qformer.instruction != self.reads_instruction:
            wanted = "InstructBridge" if config.qformer.instruction else "LanguageBridge"
            raise ValueError(f"{type(self).__name__} cannot build a {config.kind!r} model: use {wanted}")
        super().__init__(config, vision_tower)
        self.llm = llm if llm is not None else language.build_llm(config.llm)
        language.check_usable(self.llm)  # one sentence for an LM the soft prompt cannot drive
        language.freeze(self.llm, config.llm.dtype)
        if language.is_encoder_decoder(self.llm) != config.llm.is_encoder_decoder:
            raise ValueError(
                f"config.llm describes a {config.llm.model_type!r} LM but the given LLM is a "
                f"{self.llm.config.model_type!r} one: pass an LLMConfig that matches the model"
            )
        if llm is not None:  # the given LM's real architecture (vocab, ...), so that a saved model loads
            hf_config = language.llm_config_from_model(llm).hf_config
            config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, hf_config=hf_config))
        self.config = config
        self.language_projection = nn.Linear(config.qformer.hidden_size, language.embedding_width(self.llm))
        eos = getattr(getattr(self.llm, "generation_config", None), "eos_token_id", None)
        self.eos_token_id: int | list[int] | None = eos if eos is not None else self.llm.config.eos_token_id
        params = language.forward_params(self.llm)
        self._pass_position_ids = not self.is_encoder_decoder and "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def from_stage1(
        cls,
        stage1: QueryEncoder,
        llm: LLMConfig | nn.Module,
        *,
        text: bool = False,
        llm_config: LLMConfig | None = None,
    ) -> LanguageBridge:
        """Start stage 2 from a trained `RetrievalModel` and a language model.

        Copies the image encoder (tower and `ln_vision`), the query tokens and the Q-Former's weights;
        with `text=False` (as in the released stage-2 checkpoints) the Q-Former's text side and ITG head
        are dropped. `language_projection` starts fresh.

        Args:
            stage1: the stage-1 model (left unchanged).
            llm: an `LLMConfig` (random weights, for tests) or a transformers LM (pretrained weights).
            text: keep the Q-Former's text side.
            llm_config: with a transformers `llm`, its `LLMConfig` (prompt, eos text, dtype, ...);
                default: described from the model itself.
        """
        if isinstance(llm, LLMConfig):
            llm_cfg, llm_model = llm, None
        else:
            llm_cfg, llm_model = llm_config or language.llm_config_from_model(llm), llm
        qcfg = stage1.config.qformer
        if not text:
            qcfg = dataclasses.replace(qcfg, text=False, itg_head=False)
        config = dataclasses.replace(stage1.config, qformer=qcfg, llm=llm_cfg, name="")
        model = cls(config, vision_tower=copy.deepcopy(stage1.visual), llm=llm_model)
        source = stage1.qformer.state_dict()
        target = model.qformer.state_dict()
        missing = sorted(set(target) - set(source))
        if missing:
            raise ValueError(f"the stage-1 Q-Former lacks weights the stage-2 one needs: {missing}")
        model.qformer.load_state_dict({k: source[k] for k in target})
        with torch.no_grad():
            model.query_tokens.copy_(stage1.query_tokens)
        return model.to(stage1.query_tokens.device)

    # ---------------------------------------------------------------------------------- properties

    @property
    def is_encoder_decoder(self) -> bool:
        return language.is_encoder_decoder(self.llm)

    @property
    def pad_token_id(self) -> int | None:
        gen = getattr(self.llm, "generation_config", None)
        pad = getattr(gen, "pad_token_id", None)
        return pad if pad is not None else self.llm.config.pad_token_id

    def vqa_prompt(self, question: str) -> str:
        """The question formatted with the model's template ("Question: {} Answer:" for decoder-only
        models, "Question: {} Short answer:" for FlanT5; `LLMConfig.vqa_prompt` overrides)."""
        return self.config.llm.vqa_template.format(question)

    # ---------------------------------------------------------------------------------- inputs

    @onednn.with_linears
    def prefix(
        self,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The soft visual prompt: `language_projection` of the query outputs `(B, Q, d_llm)`, in the
        LLM's dtype (inputs as `query_output`; the projection also under autocast to `autocast_dtype`).
        This Q-Former reads no instruction (`qformer_input_ids`: an `InstructBridge`'s does)."""
        if qformer_input_ids is not None:
            raise ValueError(
                "this model's Q-Former reads no instruction (qformer_input_ids); InstructBLIP's does"
            )
        return self.project(self.query_output(pixel_values, image_features))

    def project(self, query_output: Tensor) -> Tensor:
        """`language_projection` of query outputs `(B, Q, D) -> (B, Q, d_llm)`, in the LLM's dtype."""
        with self.autocast():
            projected = self.language_projection(query_output)
        return projected.to(language.llm_dtype(self.llm))

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """The LLM's input embeddings of token ids, `(B, L) -> (B, L, d_llm)`."""
        return self.llm.get_input_embeddings()(input_ids)

    def _encoder_inputs(
        self, prefix: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """`[queries][text, right padded]` embeddings `(B, Q + L, E)` and mask `(B, Q + L)`."""
        b, q = prefix.shape[:2]
        ones = torch.ones(b, q, dtype=torch.long, device=prefix.device)
        if input_ids is None:
            return prefix, ones
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = language.move_padding(input_ids, attention_mask, "right")
        embeds = torch.cat([prefix, self.embed_tokens(input_ids)], dim=1)
        return embeds, torch.cat([ones, attention_mask.to(ones.dtype)], dim=1)

    # ---------------------------------------------------------------------------------- forward

    @onednn.with_linears
    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        image_features: Tensor | None = None,
        labels: Tensor | None = None,
        prompt_lengths: Tensor | int | None = None,
        decoder_attention_mask: Tensor | None = None,
        loss_only: bool = False,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> LMOutput:
        """The LLM's logits on `[soft prompt][text]` and the targets of a language-modeling loss.

        Decoder-only LM: `input_ids` are the whole texts (BOS, prompt, caption, EOS; e.g. OPT's
        `</s>a photo of a dog\\n`), padded on either side (the LM sees them right padded, as LAVIS
        pads). The targets are the text tokens; queries, padding and the first `prompt_lengths`
        tokens of each row are -100.

        Encoder-decoder LM: `input_ids` are the encoder text after the queries (the prefix; may be None
        for queries only) and `labels` the decoder's target ids (-100 or `decoder_attention_mask == 0`
        ignored); decoder inputs are the labels shifted right, as transformers does.

        Args:
            pixel_values: `(B, 3, H, W)` images, or
            image_features: `(B, N, Dv)` cached frozen features (before `ln_vision`).
            input_ids: `(B, L)` LLM token ids.
            attention_mask: `(B, L)` padding mask (1 = token); default all ones.
            labels: decoder-only: `(B, L)` targets aligned with `input_ids` (default `input_ids`; padding
                and prompt are masked either way); encoder-decoder: `(B, T)` decoder targets.
            prompt_lengths: decoder-only: leading real tokens per row (BOS included) excluded from the
                targets; an int or `(B,)`.
            decoder_attention_mask: encoder-decoder: `(B, T)` padding mask of `labels`.
            loss_only: a decoder-only LM applies its output layer only from the first position that
                predicts a counted target on (not to the queries and prompt): what a loss needs, in
                less time and memory.
            qformer_input_ids, qformer_attention_mask: `(B, I)` the instruction the Q-Former reads
                (an `InstructBridge`) in its own vocabulary, and its padding mask.
        """
        instruction = (qformer_input_ids, qformer_attention_mask)
        prefix = self.prefix(pixel_values, image_features, *instruction)  # (B, Q, E)
        if self.is_encoder_decoder:
            return self._forward_encoder_decoder(
                prefix, input_ids, attention_mask, labels, decoder_attention_mask
            )
        if input_ids is None:
            raise ValueError("a decoder-only LM needs input_ids (the text to learn)")
        b, q = prefix.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_labels = language.causal_lm_labels(
            input_ids if labels is None else labels, attention_mask, prompt_lengths
        )
        # right padding: the first text token must follow the last query, not a pad
        order = language.padding_order(attention_mask, "right")
        input_ids, attention_mask, text_labels = (
            t.gather(1, order) for t in (input_ids, attention_mask, text_labels)
        )
        ones = attention_mask.new_ones(b, q)
        mask = torch.cat([ones, attention_mask], dim=1)  # (B, Q + L)
        full_labels = torch.cat([torch.full_like(ones, -100, dtype=text_labels.dtype), text_labels], dim=1)
        embeds = torch.cat([prefix, self.embed_tokens(input_ids)], dim=1)  # (B, Q + L, E)
        extra: dict[str, Any] = {}
        if self._pass_position_ids:
            extra["position_ids"] = language.position_ids(mask)
        first = 0  # positions before `first` predict only ignored labels
        if loss_only and self._takes_logits_to_keep:
            counted = (full_labels[:, 1:] != -100).any(0)  # (Q + L - 1,) position t predicts t + 1
            first = int(counted.int().argmax())  # one wait for the device; 0 when nothing counts
            extra["logits_to_keep"] = full_labels.shape[1] - first
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra)
        return LMOutput(logits=out.logits, labels=full_labels[:, first:], order=order)

    def logits_as_given(self, out: LMOutput) -> Tensor:
        """A decoder-only `forward`'s logits `(B, Q + L, V)` with the text in the caller's padding
        (the output of a `forward` without `loss_only`); an encoder-decoder's as they are."""
        if out.order is None:
            return out.logits
        q = out.logits.shape[1] - out.order.shape[1]
        back = out.order.argsort(1)[..., None].expand(-1, -1, out.logits.shape[-1])  # the caller's padding
        return torch.cat([out.logits[:, :q], out.logits[:, q:].gather(1, back)], dim=1)

    def _forward_encoder_decoder(
        self,
        prefix: Tensor,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        labels: Tensor | None,
        decoder_attention_mask: Tensor | None,
    ) -> LMOutput:
        if labels is None:
            raise ValueError("an encoder-decoder LM needs labels: the decoder's target ids")
        embeds, mask = self._encoder_inputs(prefix, input_ids, attention_mask)
        if decoder_attention_mask is not None:
            labels = labels.masked_fill(decoder_attention_mask == 0, -100)
        decoder_input_ids = self.llm.prepare_decoder_input_ids_from_labels(labels=labels)  # (B, T)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            use_cache=False,
        )
        return LMOutput(logits=out.logits, labels=labels)

    # ---------------------------------------------------------------------------------- generation

    def check_generation_length(
        self,
        prompt_tokens: int,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        soft_prompt: int | None = None,
    ) -> None:
        """Refuse (`UserError`, one sentence) a generation longer than the LLM reads: the soft prompt
        (`soft_prompt` positions; default one per query, a video clip has one per query and frame),
        `prompt_tokens` of text and `max_new_tokens` against the LLM's
        position limit (`language.position_limit`; an encoder-decoder LM reads the first two in its
        encoder and writes the new tokens, after its start token, in its decoder). Without
        `max_new_tokens`, the new tokens are what transformers' `max_length` leaves: it counts the
        queries and the prompt of a decoder-only LM, and the start token of an encoder-decoder's decoder.
        """
        limit = language.position_limit(self.llm)
        if limit is None or (max_new_tokens is None and max_length is None):
            return
        q = self.config.qformer.num_query_tokens if soft_prompt is None else soft_prompt
        inputs = q + prompt_tokens
        by_length = max_new_tokens is None
        if by_length:
            max_new_tokens = int(max_length) - (1 if self.is_encoder_decoder else inputs)
        asked = f"max_length={max_length}" if by_length else f"max_new_tokens={max_new_tokens}"
        need = inputs if self.is_encoder_decoder else inputs + max_new_tokens
        if need > limit:
            what = f"the {q} image queries and the {prompt_tokens}-token prompt"
            room = limit - (0 if self.is_encoder_decoder else inputs)
            if self.is_encoder_decoder or room < 1:
                raise UserError(
                    f"the language model reads at most {limit} positions, but {what} take {inputs}: "
                    "shorten the prompt"
                )
            fix = f"a max_length of at most {limit}" if by_length else f"at most {room} new tokens"
            raise UserError(
                f"the language model reads at most {limit} positions, but {what} with {asked} "
                f"need {need}: ask for {fix} or shorten the prompt"
            )
        if self.is_encoder_decoder and 1 + max_new_tokens > limit:
            fix = f"a max_length of at most {limit}" if by_length else f"at most {limit - 1} new tokens"
            raise UserError(
                f"the language model's decoder reads at most {limit} positions: ask for {fix}, not {asked}"
            )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        image_features: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
        **generate_kwargs: Any,
    ) -> Tensor:
        """Generate text for images, optionally continuing a prompt; returns the new token ids only.

        The prompt (decoder-only: after the queries; encoder-decoder: in the encoder after the queries)
        defaults to the LM's BOS, as LAVIS's empty prompt and transformers' BLIP-2 give (an encoder-decoder
        LM without one, e.g. FlanT5: its EOS; see `language.start_token_id`). Batched prompts
        may be padded on either side (the padding is moved where each LM kind needs it). All other
        arguments go to the LM's `generate` under transformers' names: `num_beams`, `do_sample`,
        `temperature`, `top_p`, `max_new_tokens` (default 30), `min_new_tokens`, `length_penalty`,
        `repetition_penalty`, `num_return_sequences`, ... `eos_token_id` defaults to `self.eos_token_id`.
        The same tokens, faster: `blip2.generation.Decoding.generate`.

        Args:
            pixel_values: `(B, 3, H, W)` images, or
            image_features: `(B, N, Dv)` cached frozen features.
            input_ids: `(B, L)` prompt ids, or `(1, L)` for one prompt shared by all images.
            attention_mask: `(B, L)` prompt padding mask.
            qformer_input_ids, qformer_attention_mask: the instruction the Q-Former reads, as `forward`.

        Raises:
            UserError: the queries, the prompt and `max_new_tokens` (or `max_length`) need more
                positions than the LLM reads (`check_generation_length`).

        Returns:
            `(B * num_return_sequences, T)` new token ids; rows that end early are padded with the
            pad id after their EOS. With `return_dict_in_generate=True`, transformers' output object
            (scores and all) with these `sequences`.
        """
        instruction = (qformer_input_ids, qformer_attention_mask)
        prefix = self.prefix(pixel_values, image_features, *instruction)  # (B, Q, E), once per image
        embeds, mask, options = self.generation_inputs(prefix, input_ids, attention_mask, **generate_kwargs)
        return self.generate_from_embeds(embeds, mask, **options)

    def generation_inputs(
        self,
        prefix: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **generate_kwargs: Any,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """What the LM's `generate` gets for a soft prompt and a text prompt (arguments as `generate`).

        Args:
            prefix: `(B, Q, E)` soft prompt (`self.prefix`).

        Returns:
            `(embeds, mask, options)`: `[soft prompt][prompt]` embeddings `(B, Q + L, E)` (decoder-only:
            the prompt left padded, `[soft prompt][pads][prompt]` as transformers' BLIP-2 processor lays
            it out; encoder-decoder: right padded), their mask `(B, Q + L)`, and the
            generate options with the defaults filled in (EOS and pad ids, `max_new_tokens`).

        Raises:
            UserError: too long for the LLM (`check_generation_length`).
        """
        b, q = prefix.shape[:2]
        if input_ids is None:
            bos = language.start_token_id(self.llm)
            input_ids = torch.full(
                (b, 0 if bos is None else 1),
                0 if bos is None else bos,
                dtype=torch.long,
                device=prefix.device,
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape[0] == 1 and b > 1:
            input_ids, attention_mask = input_ids.expand(b, -1), attention_mask.expand(b, -1)
        if input_ids.shape[0] != b:
            raise ValueError(
                f"got {b} images but {input_ids.shape[0]} prompts: pass one prompt or one per image"
            )

        options = dict(generate_kwargs)
        options.setdefault("eos_token_id", self.eos_token_id)
        if self.pad_token_id is not None:
            options.setdefault("pad_token_id", self.pad_token_id)
        if "max_new_tokens" not in options and "max_length" not in options:
            options["max_new_tokens"] = 30

        # before the LM fails on a position past its table
        self.check_generation_length(
            input_ids.shape[1], options.get("max_new_tokens"), options.get("max_length"), soft_prompt=q
        )
        if self.is_encoder_decoder:
            embeds, mask = self._encoder_inputs(prefix, input_ids, attention_mask)
        else:
            input_ids, attention_mask = language.move_padding(input_ids, attention_mask, "left")
            embeds = torch.cat([prefix, self.embed_tokens(input_ids)], dim=1)  # (B, Q + L, E)
            mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1)
        return embeds, mask, options

    @torch.no_grad()
    def generate_from_embeds(self, embeds: Tensor, mask: Tensor, **options: Any) -> Tensor:
        """The LM's own `generate` on `generation_inputs`' output: the new token ids `(B', T)`, padded
        after each row's EOS (or transformers' output object with these `sequences`, as `generate`)."""
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **options)
        sequences = out if isinstance(out, Tensor) else out.sequences
        if self.is_encoder_decoder:
            sequences = sequences[:, 1:]  # drop the decoder start token
        sequences = language.pad_after_eos(sequences, options["eos_token_id"], options.get("pad_token_id"))
        if isinstance(out, Tensor):
            return sequences
        out.sequences = sequences
        return out
