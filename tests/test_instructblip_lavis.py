"""LAVIS's InstructBLIP files (`instruct_blip_{vicuna7b,vicuna13b,flanxl,flanxxl}_trimmed.pth`) through
`blip2 convert`, checked against an oracle that is not our saver.

Oracle: a tiny random transformers `InstructBlipForConditionalGeneration` (a Llama "Vicuna" or a T5 LM).
Its tensors are written as a LAVIS file key by key with LAVIS's names, from the reference (lavis.md 6.2:
`Qformer.bert.*` with its text side, `query_tokens`, `ln_vision`, `llm_proj` / `t5_proj`), the image
encoder as an `eva_vit_g.pth` and the LLM as its own transformers folder, as LAVIS keeps them. The
converted folder must hold every tensor of the oracle (Vicuna: plus LAVIS's `[PAD]` row) and generate
what the oracle generates.
"""

from __future__ import annotations

import pytest
import tiny_hf
import torch
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
)

import blip2
from blip2.cli import main
from blip2.interop import checkpoint, lavis
from blip2.interop.keymap import convert
from blip2.pipelines import InstructCaptioner
from blip2.presets import preset

SHAPE = "a"
QUERIES = tiny_hf.SHAPES[SHAPE]["queries"]
PRESET = {"vicuna": "tiny-instruct-opt", "t5": "tiny-instruct-t5"}  # their Q-Former and image encoder


def vicuna_config(vocab: int) -> LlamaConfig:
    """A tiny Llama as Vicuna v1.1 is one (untied LM head), `</s>` (2) its BOS and EOS as LAVIS sets."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=False,
    )


def oracle(kind: str, seed: int = 7) -> tuple[InstructBlipForConditionalGeneration, object, torch.nn.Module]:
    """The transformers model, the LLM tokenizer (as the LLM's own folder has it), and the pretrained LLM
    as that folder holds it. Vicuna: the oracle's LM is the pretrained one with LAVIS's `[PAD]` row and
    an `<image>` row (both the mean of the pretrained rows)."""
    tok = tiny_hf.word_tokenizer("opt" if kind == "vicuna" else "t5")
    if kind == "t5":
        model, _ = tiny_hf.instruct_model("t5", SHAPE, seed)
        return model, tok, liven(model.language_model, seed)
    words = len(tok)
    pretrained = liven(transformers_causal_lm(vicuna_config(words)), seed)  # its own folder: no [PAD]
    vision, qformer = tiny_hf.vision_qformer(SHAPE, vocab=30523, text=True)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**{k: getattr(vision, k) for k in tiny_hf.VISION_FIELDS}),
        qformer_config=InstructBlipQFormerConfig(**{k: getattr(qformer, k) for k in tiny_hf.QFORMER_FIELDS}),
        text_config=vicuna_config(words + 2),  # [PAD], <image>
        num_query_tokens=QUERIES,
        image_token_index=words + 1,
    )
    model = tiny_hf.randomize(InstructBlipForConditionalGeneration(config), seed).eval()
    with torch.no_grad():
        state = pretrained.state_dict()
        for name, t in model.language_model.state_dict().items():
            if t.shape == state[name].shape:
                t.copy_(state[name])
            else:  # the embedding tables: the pretrained rows, then the mean row twice
                t.copy_(torch.cat([state[name], state[name].mean(0, keepdim=True).expand(2, -1)]))
    return model, tok, pretrained


def transformers_causal_lm(config: LlamaConfig) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return tiny_hf.randomize(LlamaForCausalLM(config), 1).eval()


def liven(lm: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Larger LM matrices: with the small random ones every input gives the same tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lm.parameters():
            if t.dim() == 2:
                t.copy_(torch.randn(t.shape, generator=g) * 3.0 / t.shape[1] ** 0.5)
    return lm


def lavis_files(hf: InstructBlipForConditionalGeneration) -> tuple[dict, dict]:
    """The LAVIS InstructBLIP file (trainable tensors, LAVIS names) and `eva_vit_g.pth`, key by key from
    the oracle's tensors (lavis.md 6.2 for LAVIS's names, 6.3 for the correspondence)."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    qcfg = hf.config.qformer_config
    proj = "llm_proj" if hf.config.use_decoder_only_language_model else "t5_proj"
    state = {
        "query_tokens": sd["query_tokens"],
        "ln_vision.weight": sd["vision_model.post_layernorm.weight"],
        "ln_vision.bias": sd["vision_model.post_layernorm.bias"],
        "Qformer.bert.embeddings.LayerNorm.weight": sd["qformer.embeddings.layernorm.weight"],
        "Qformer.bert.embeddings.LayerNorm.bias": sd["qformer.embeddings.layernorm.bias"],
        "Qformer.bert.embeddings.word_embeddings.weight": sd["qformer.embeddings.word_embeddings.weight"],
        "Qformer.bert.embeddings.position_embeddings.weight": sd[
            "qformer.embeddings.position_embeddings.weight"
        ],
        "Qformer.bert.embeddings.position_ids": torch.arange(qcfg.max_position_embeddings)[None],
        f"{proj}.weight": sd["language_projection.weight"],
        f"{proj}.bias": sd["language_projection.bias"],
    }
    for i in range(qcfg.num_hidden_layers):
        lavis_layer, hf_layer = f"Qformer.bert.encoder.layer.{i}", f"qformer.encoder.layer.{i}"
        names = {f"attention.self.{p}": f"attention.attention.{p}" for p in ("query", "key", "value")}
        names |= {n: n for n in ("attention.output.dense", "attention.output.LayerNorm")}
        names |= {n: n for n in ("intermediate_query.dense", "output_query.dense", "output_query.LayerNorm")}
        names |= {n: n for n in ("intermediate.dense", "output.dense", "output.LayerNorm")}  # the text side
        if i % qcfg.cross_attention_frequency == 0:
            names |= {
                f"crossattention.self.{p}": f"crossattention.attention.{p}" for p in ("query", "key", "value")
            }
            names |= {n: n for n in ("crossattention.output.dense", "crossattention.output.LayerNorm")}
        for theirs, hf_name in names.items():
            for t in ("weight", "bias"):
                state[f"{lavis_layer}.{theirs}.{t}"] = sd[f"{hf_layer}.{hf_name}.{t}"]
    eva = {
        "cls_token": sd["vision_model.embeddings.class_embedding"],
        "pos_embed": sd["vision_model.embeddings.position_embedding"],
        "patch_embed.proj.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": sd["vision_model.embeddings.patch_embedding.bias"],
    }
    for i in range(hf.config.vision_config.num_hidden_layers):
        block, layer = f"blocks.{i}", f"vision_model.encoder.layers.{i}"
        for theirs, hf_name in [("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                                ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:  # fmt: skip
            for t in ("weight", "bias"):
                eva[f"{block}.{theirs}.{t}"] = sd[f"{layer}.{hf_name}.{t}"]
        eva[f"{block}.attn.qkv.weight"] = sd[f"{layer}.self_attn.qkv.weight"]
        q_bias, k_bias, v_bias = sd[f"{layer}.self_attn.qkv.bias"].chunk(3)
        assert not k_bias.any()  # EVA has no key bias
        eva[f"{block}.attn.q_bias"], eva[f"{block}.attn.v_bias"] = q_bias, v_bias
    return state, eva


@pytest.fixture(scope="module", params=["vicuna", "t5"])
def converted(request, tmp_path_factory):
    """`blip2 convert` of the oracle's LAVIS file: (kind, oracle, tokenizer, output folder)."""
    kind = request.param
    hf, tok, pretrained = oracle(kind)
    with torch.no_grad():
        for layer in hf.vision_model.encoder.layers:
            layer.self_attn.qkv.bias.view(3, -1)[1].zero_()  # no key bias, as in every EVA checkpoint
        g = torch.Generator().manual_seed(8)  # livelier LM inputs: the projection and queries larger
        hf.query_tokens.normal_(std=1.0, generator=g)
        hf.language_projection.weight.normal_(std=0.5, generator=g)
    hf.vision_model.post_layernorm.eps = 1e-5  # LAVIS's `ln_vision` is a default nn.LayerNorm
    folder = tmp_path_factory.mktemp(f"lavis-instruct-{kind}")
    state, eva = lavis_files(hf)
    torch.save({"model": state}, folder / "instruct_tiny.pth")
    torch.save(eva, folder / "eva_vit_g.pth")
    pretrained.save_pretrained(folder / "llm")
    tok.save_pretrained(folder / "llm")
    args = ["convert", str(folder / "instruct_tiny.pth"), str(folder / "out"), "--preset", PRESET[kind]]
    args += ["--llm", str(folder / "llm"), "--tokenizer", str(folder / "llm")]
    assert main(args) == 0
    return kind, hf, tok, folder / "out"


def test_released_file_names_and_sizes():
    """The released files name their presets; a file of the real sizes (LAVIS names written from the
    reference, shapes only) fills the preset's model but for the frozen towers."""
    assert lavis.FILES["instruct_blip_vicuna7b_trimmed.pth"] == "instructblip-vicuna-7b"
    assert lavis.FILES["instruct_blip_vicuna13b_trimmed.pth"] == "instructblip-vicuna-13b"
    assert lavis.FILES["instruct_blip_flanxl_trimmed.pth"] == "instructblip-flan-t5-xl"
    assert lavis.FILES["instruct_blip_flanxxl_trimmed.pth"] == "instructblip-flan-t5-xxl"
    for name, proj, width in [("instructblip-vicuna-7b", "llm_proj", 4096), ("instructblip-flan-t5-xl", "t5_proj", 2048)]:  # fmt: skip
        config = preset(name)
        keys = {
            "query_tokens": (1, 32, 768),
            "ln_vision.weight": (1408,),
            "ln_vision.bias": (1408,),
            "Qformer.bert.embeddings.word_embeddings.weight": (30523, 768),
            "Qformer.bert.embeddings.position_embeddings.weight": (512, 768),
            "Qformer.bert.embeddings.position_ids": (1, 512),
            "Qformer.bert.embeddings.LayerNorm.weight": (768,),
            "Qformer.bert.embeddings.LayerNorm.bias": (768,),
            f"{proj}.weight": (width, 768),
            f"{proj}.bias": (width,),
        }
        for i in range(12):
            layer, cross = f"Qformer.bert.encoder.layer.{i}", i % 2 == 0  # cross-attention every 2nd layer
            parts = {f"attention.self.{p}": (768, 768) for p in ("query", "key", "value")}
            parts |= {"attention.output.dense": (768, 768), "intermediate_query.dense": (3072, 768)}
            parts |= {
                "output_query.dense": (768, 3072),
                "intermediate.dense": (3072, 768),
                "output.dense": (768, 3072),
            }
            if cross:
                parts |= {"crossattention.self.query": (768, 768), "crossattention.self.key": (768, 1408)}
                parts |= {"crossattention.self.value": (768, 1408), "crossattention.output.dense": (768, 768)}
            for p, shape in parts.items():
                keys |= {f"{layer}.{p}.weight": shape, f"{layer}.{p}.bias": (shape[0],)}
            norms = ["attention.output", "output_query", "output"] + (
                ["crossattention.output"] if cross else []
            )
            for norm in norms:
                keys |= {f"{layer}.{norm}.LayerNorm.weight": (768,), f"{layer}.{norm}.LayerNorm.bias": (768,)}
        meta = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
        with torch.device("meta"):
            model = checkpoint.build_model(config)
        expected = {
            k: tuple(v.shape)
            for k, v in checkpoint.unique_state_dict(model).items()
            if not k.startswith(("visual.tower.", "llm."))
        }
        got = {k: tuple(v.shape) for k, v in convert(meta, lavis.rules(config, vision=False)).items()}
        assert got == expected, name


def test_converted_folder_holds_the_oracles_tensors(converted):
    kind, hf, tok, out = converted
    back = InstructBlipForConditionalGeneration.from_pretrained(out).eval()
    mine, theirs = back.state_dict(), hf.state_dict()
    assert sorted(mine) == sorted(theirs)
    for k, v in theirs.items():
        if kind == "vicuna" and mine[k].shape != v.shape:  # the tables: ours padded for <image>
            assert mine[k].shape[0] % 64 == 0 and mine[k].shape[1:] == v.shape[1:], k
            assert torch.equal(mine[k][: len(tok) + 1], v[: len(tok) + 1]), k  # the words and [PAD]
        else:
            assert torch.equal(mine[k], v), k
    if kind == "vicuna":  # LAVIS's Vicuna tokenizer: [PAD] after the words, `</s>` as BOS and unknown
        pipe = blip2.load(out)
        assert pipe.llm_tokenizer.pad_token == "[PAD]"
        assert pipe.llm_tokenizer.convert_tokens_to_ids("[PAD]") == len(tok)
        assert pipe.llm_tokenizer.bos_token == pipe.llm_tokenizer.unk_token == "</s>"
        assert pipe.config.llm.hf_config["pad_token_id"] == len(tok)


@pytest.mark.parametrize("search", [{"num_beams": 1}, {"num_beams": 3}], ids=["greedy", "beam3"])
def test_converted_model_generates_what_the_oracle_generates(converted, search):
    kind, hf, tok, out = converted
    pipe = blip2.load(out)
    assert isinstance(pipe, InstructCaptioner) and pipe.config.kind == "instruct"
    prompts = ["what is the sky ?", "a photo of two cat on the couch"]
    pixels = pipe.pixels(tiny_hf.images(2))
    q = pipe.qformer_tokenizer(prompts, padding=True, return_tensors="pt")
    tok.padding_side = "left" if kind == "vicuna" else "right"
    text = tok(prompts, padding=True, return_tensors="pt")
    images = torch.full((2, QUERIES), hf.config.image_token_index)
    unspelled = list(range(len(tok), hf.config.text_config.vocab_size))  # [PAD], <image>, unused ids
    pad = hf.config.text_config.pad_token_id  # what rows ending early are padded with, in both
    options = {"max_new_tokens": 6, "suppress_tokens": unspelled, "pad_token_id": pad, **search}
    with torch.no_grad():
        ref = hf.generate(
            pixel_values=pixels,
            qformer_input_ids=q["input_ids"],
            qformer_attention_mask=q["attention_mask"],
            input_ids=torch.cat([images, text["input_ids"]], 1),
            attention_mask=torch.cat([torch.ones_like(images), text["attention_mask"]], 1),
            **options,
        )
        swapped = hf.generate(
            pixel_values=pixels.flip(0),
            qformer_input_ids=q["input_ids"],
            qformer_attention_mask=q["attention_mask"],
            input_ids=torch.cat([images, text["input_ids"]], 1),
            attention_mask=torch.cat([torch.ones_like(images), text["attention_mask"]], 1),
            **options,
        )
        got = pipe.model.generate(
            pixels,
            text["input_ids"],
            text["attention_mask"],
            qformer_input_ids=q["input_ids"],
            qformer_attention_mask=q["attention_mask"],
            **options,
        )
    assert not torch.equal(ref, swapped)  # the oracle's text depends on the image
    ref = ref[:, QUERIES + text["input_ids"].shape[1] :] if kind == "vicuna" else ref[:, 1:]
    assert len({t for row in ref.tolist() for t in row}) >= 2 and ref[0].tolist() != ref[1].tolist()
    assert got.tolist() == ref.tolist()
