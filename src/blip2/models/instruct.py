"""InstructBLIP's bridge: the Q-Former reads the instruction beside the queries.

Dai et al. (2023), section 2.2. BLIP-2's queries see only the image; InstructBLIP also gives the
Q-Former the instruction (its own BERT tokens), so the visual tokens carry what the question asks about:

    [queries; instruction] -> Q-Former self-attention, bidirectional (padded instruction keys hidden)
    queries only           -> cross-attention to the image, query feed-forward
    instruction tokens     -> word + position embeddings, text feed-forward
    hidden[:, :Q]          -> language_projection -> soft prompt of the frozen LLM, as in BLIP-2

Everything after the soft prompt (the LM loss of `forward`, `generate`) is `LanguageBridge`'s; the
instruction goes in as `qformer_input_ids` / `qformer_attention_mask` (transformers' names), and the LLM
reads its own copy of the prompt through `input_ids` as before.

Video (transformers' `InstructBlipVideoForConditionalGeneration`): `pixel_values` of shape
`(B, T, 3, H, W)` are T frames per clip. Each frame goes through the image side alone, reading the
clip's instruction, and the frames' projected query outputs are laid end to end as the soft prompt
`(B, T * Q, E)`; the LLM side is unchanged.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from blip2.models.bridge import LanguageBridge
from blip2.models.query_encoder import QueryEncoder

# the Q-Former's text side: what reading an instruction needs and BLIP-2's stage-2 checkpoints dropped
TEXT_SIDE = ("qformer.embeddings.word.", "qformer.embeddings.position.", ".text_ffn.")


class InstructBridge(LanguageBridge):
    """Frozen image encoder -> Q-Former over `[queries; instruction]` -> `language_projection` -> frozen LLM.

    Args:
        config: an "instruct" `Blip2Config` (`config.llm` set, `config.qformer.instruction` true).
        vision_tower, llm: as `LanguageBridge`.
    """

    reads_instruction = True

    @classmethod
    def from_bridge(cls, bridge: LanguageBridge, text_from: QueryEncoder | None = None) -> InstructBridge:
        """InstructBLIP from a BLIP-2 stage-2 model, where instruction tuning starts (Dai et al., 2023).

        The bridge's image encoder and LLM are taken as they are (the same modules), its Q-Former,
        queries and projection copied. The Q-Former's text side comes from `text_from`, a stage-1
        model (its word and position embeddings and each layer's text feed-forward; InstructBLIP took
        them from BLIP-2's stage-1 checkpoint); without one, the text feed-forward starts as a copy of
        the query feed-forward (as BLIP-2's stage 1 started its query one from BERT's) and the
        embeddings start fresh.

        Args:
            bridge: the stage-2 model (its modules are shared, so leave it unused afterwards).
            text_from: a model whose Q-Former has the text side, of the same Q-Former size.
        """
        qformer = dataclasses.replace(bridge.config.qformer, text=True, itg_head=False, instruction=True)
        config = dataclasses.replace(bridge.config, qformer=qformer, name="")
        device = bridge.query_tokens.device
        model = cls(config, vision_tower=bridge.visual, llm=bridge.llm).to(device)
        state = bridge.state_dict()
        if text_from is not None:
            text = {
                k: v for k, v in text_from.state_dict().items() if k.startswith("qformer.") and _text_side(k)
            }
        else:
            text = {k.replace(".query_ffn.", ".text_ffn."): v for k, v in state.items() if ".query_ffn." in k}
        missing, unexpected = model.load_state_dict({**state, **text}, strict=False)
        fresh = [k for k in missing if text_from is None and k.startswith("qformer.embeddings.")]
        if unexpected or sorted(missing) != sorted(fresh):
            raise ValueError(
                f"cannot build InstructBLIP from this bridge: missing {sorted(set(missing) - set(fresh))}, "
                f"unexpected {sorted(unexpected)}"
            )
        return model

    def query_output(
        self,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Query outputs `(B, Q, D)` of the Q-Former reading the image and the instruction; for video,
        `(B, T, Q, D)`, each frame read alone with its clip's instruction.

        Args:
            pixel_values, image_features: the images, as `encode_image`; video: `(B, T, 3, H, W)`
                frames, or their features `(B, T, N, Dv)`.
            qformer_input_ids: `(B, I)` instruction ids in the Q-Former's vocabulary (BERT's); None:
                the queries alone, as BLIP-2.
            qformer_attention_mask: `(B, I)` their padding mask (1 = token); default all ones.
        """
        frames = video_frames(pixel_values, image_features)
        if frames:  # (B, T, ...) -> (B * T, ...): every frame an image with its clip's instruction
            pixel_values = pixel_values.flatten(0, 1) if pixel_values is not None else None
            image_features = image_features.flatten(0, 1) if image_features is not None else None
            if qformer_input_ids is not None:
                qformer_input_ids = qformer_input_ids.repeat_interleave(frames, dim=0)
            if qformer_attention_mask is not None:
                qformer_attention_mask = qformer_attention_mask.repeat_interleave(frames, dim=0)
        image_embeds = self.encode_image(pixel_values, image_features)  # (B [* T], N, Dv), no autocast
        with self.autocast():
            hidden = self.qformer(
                queries=self.queries(image_embeds.shape[0]),
                input_ids=qformer_input_ids,
                attention_mask=qformer_attention_mask,
                image_embeds=image_embeds,
                mode="bidirectional",
            ).hidden  # (B [* T], Q + I, D)
        queries = hidden[:, : self.config.qformer.num_query_tokens]
        return queries.unflatten(0, (-1, frames)) if frames else queries  # video: (B, T, Q, D)

    def prefix(
        self,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The soft visual prompt `(B, Q, d_llm)`: the projected query outputs of `query_output`; for
        video `(B, T * Q, d_llm)`, the frames' in order."""
        query_output = self.query_output(
            pixel_values, image_features, qformer_input_ids, qformer_attention_mask
        )
        return self.project(query_output).flatten(1, -2)  # video: (B, T, Q, E) -> (B, T * Q, E)


def video_frames(pixel_values: Tensor | None, image_features: Tensor | None) -> int:
    """Frames per clip of video input (`(B, T, 3, H, W)` pixels or `(B, T, N, Dv)` features), 0 for
    images."""
    if image_features is not None:
        return image_features.shape[1] if image_features.dim() == 4 else 0
    return pixel_values.shape[1] if pixel_values is not None and pixel_values.dim() == 5 else 0


def _text_side(key: str) -> bool:
    return any(part in key for part in TEXT_SIDE)
