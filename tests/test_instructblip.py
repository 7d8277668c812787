"""InstructBLIP against transformers' `InstructBlipForConditionalGeneration`, built tiny and random.

Oracle: a tiny InstructBLIP with an OPT (decoder-only) or a T5 (encoder-decoder) LM, every weight random
(LayerNorms included), saved with its `InstructBlipProcessor` (the LLM's tokenizer and the Q-Former's
BERT tokenizer) as transformers writes them, and loaded with `blip2.load`. Each test first checks that
the oracle's output depends on the image (or the instruction), so no test passes on constant outputs.
Parity: the Q-Former's query outputs with an instruction (with and without padding in the batch),
greedy and beam-search generations token for token, the LM loss; round trips through transformers;
`ask` through the real tokenizers.
"""

from __future__ import annotations

import pytest
import tiny_hf
import torch
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

import blip2
from blip2 import losses
from blip2.interop import hf as hf_layout
from blip2.interop.checkpoint import build_model
from blip2.models import InstructBridge
from blip2.pipelines import Captioner, InstructCaptioner
from blip2.presets import preset

ATOL = 1e-5
SHAPE = "a"
QUERIES = tiny_hf.SHAPES[SHAPE]["queries"]
# two instructions of the same BERT length (no padding) and of different lengths (padding)
INSTRUCTIONS = {
    "unpadded": ["what is the sky ?", "what is the dog ?"],
    "padded": ["what is the sky ?", "a photo of two cat on the couch"],
}


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, tmp_path_factory):
    kind = request.param
    hf, processor = tiny_hf.instruct_model(kind, SHAPE, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # livelier weights: the default ones repeat one token whatever the input
        for t in hf.language_model.parameters():
            if t.dim() == 2:
                t.copy_(torch.randn(t.shape, generator=g) * 3.0 / t.shape[1] ** 0.5)
        hf.query_tokens.normal_(std=1.0, generator=g)
        hf.language_projection.weight.normal_(std=0.5, generator=g)
    processor.tokenizer.padding_side = "left" if kind == "opt" else "right"
    folder = tiny_hf.save_generation(hf, processor, tmp_path_factory.mktemp(f"instructblip-{kind}"))
    return kind, hf, processor, folder, blip2.load(folder)


def _inputs(processor, texts: list[str]) -> tuple[dict, dict]:
    """transformers' inputs (image tokens before the LLM text) and ours (the LLM text after them)."""
    enc = processor(images=tiny_hf.images(2), text=texts, padding=True, return_tensors="pt")
    ours = {
        "input_ids": enc["input_ids"][:, QUERIES:],
        "attention_mask": enc["attention_mask"][:, QUERIES:],
        "qformer_input_ids": enc["qformer_input_ids"],
        "qformer_attention_mask": enc["qformer_attention_mask"],
    }
    return enc, ours


def _hf_query_output(hf, enc: dict, qformer_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = enc["qformer_input_ids"] if qformer_input_ids is None else qformer_input_ids
    mask = enc["qformer_attention_mask"] if qformer_input_ids is None else torch.ones_like(ids)
    vision = hf.vision_model(pixel_values=enc["pixel_values"]).last_hidden_state
    out = hf.qformer(
        input_ids=ids,
        attention_mask=torch.cat([torch.ones(ids.shape[0], QUERIES, dtype=torch.long), mask], dim=1),
        query_embeds=hf.query_tokens.expand(ids.shape[0], -1, -1),
        encoder_hidden_states=vision,
    )
    return out.last_hidden_state[:, :QUERIES]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------- the model


def test_instruct_kind_and_presets():
    for name in ("instructblip-vicuna-7b", "instructblip-vicuna-13b", "instructblip-flan-t5-xl"):
        config = preset(name)
        assert config.kind == "instruct" and config.qformer.text and config.qformer.vocab_size == 30523
    assert preset("instructblip-vicuna-7b").llm.hf_config["vocab_size"] == 32001
    assert preset("instructblip-flan-t5-xxl").llm.hf_config["d_model"] == 4096
    assert preset("blip2-opt-2.7b").kind == "generation"
    model = build_model(preset("tiny-instruct-t5"), init=True)
    assert isinstance(model, InstructBridge) and hf_layout.architecture(model.config) == hf_layout.INSTRUCT
    with pytest.raises(ValueError, match="text side"):
        preset("tiny-instruct-opt", qformer={"text": False})
    blip2_model = build_model(preset("tiny-opt"), init=True)
    with pytest.raises(ValueError, match="reads no instruction"):  # BLIP-2's Q-Former has no text side
        blip2_model.generate(torch.zeros(1, 3, 16, 16), qformer_input_ids=torch.tensor([[101, 102]]))


@pytest.mark.parametrize("batch", list(INSTRUCTIONS))
def test_qformer_reads_the_instruction_as_transformers(pair, batch):
    kind, hf, processor, _, pipe = pair
    enc, ours = _inputs(processor, INSTRUCTIONS[batch])
    assert (enc["qformer_attention_mask"] == 0).any() == (batch == "padded")
    with torch.no_grad():
        ref = _hf_query_output(hf, enc)
        # the oracle's output depends on the image and on the instruction
        swapped = {**enc, "pixel_values": enc["pixel_values"].flip(0)}
        assert max_diff(_hf_query_output(hf, swapped), ref) > 1e-2
        other = _hf_query_output(hf, enc, qformer_input_ids=torch.tensor([[101, 2054, 102]] * 2))
        assert max_diff(other, ref) > 1e-2
        got = pipe.model.query_output(
            enc["pixel_values"], None, ours["qformer_input_ids"], ours["qformer_attention_mask"]
        )
        assert max_diff(got, ref) <= ATOL
        projected = hf.get_image_features(
            enc["pixel_values"], enc["qformer_input_ids"], enc["qformer_attention_mask"]
        ).pooler_output
        assert (
            max_diff(pipe.model.prefix(enc["pixel_values"], None, *list(ours.values())[2:]), projected)
            <= ATOL
        )


@pytest.mark.parametrize("batch", list(INSTRUCTIONS))
@pytest.mark.parametrize("search", [{"num_beams": 1}, {"num_beams": 3}], ids=["greedy", "beam3"])
def test_generation_token_identical(pair, batch, search):
    kind, hf, processor, _, pipe = pair
    enc, ours = _inputs(processor, INSTRUCTIONS[batch])
    options = {"max_new_tokens": 7, "eos_token_id": hf.config.text_config.eos_token_id, **search}
    with torch.no_grad():
        ref = hf.generate(**enc, **options)
        got = pipe.model.generate(enc["pixel_values"], **ours, **options)
    ref = ref[:, enc["input_ids"].shape[1] :] if kind == "opt" else ref[:, 1:]  # new tokens only
    assert len({t for row in ref.tolist() for t in row}) >= 2 and ref[0].tolist() != ref[1].tolist()
    assert got.tolist() == ref.tolist()
    for mode in ("fast", "static", "transformers"):  # the captioner's decode paths: the same tokens
        fast = pipe.decoding.generate(pipe.model, enc["pixel_values"], **ours, mode=mode, **options)
        assert fast.tolist() == ref.tolist(), mode


def test_lm_loss_equals_transformers(pair):
    kind, hf, processor, _, pipe = pair
    enc, ours = _inputs(processor, ["a photo of two cat", "what is the sky ? blue"])
    with torch.no_grad():
        if kind == "opt":  # the loss counts the tokens after each row's BOS and first two words
            prompt = torch.tensor([3, 3])
            text_labels = blip2.models.language.causal_lm_labels(
                ours["input_ids"], ours["attention_mask"], prompt
            )
            labels = torch.cat([torch.full((2, QUERIES), -100), text_labels], dim=1)
            ref = hf(**enc, labels=labels).loss
            out = pipe.model(enc["pixel_values"], **ours, prompt_lengths=prompt)
            got = losses.lm_loss(out.logits, out.labels)
        else:
            labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])
            ref = hf(**enc, labels=labels).loss
            out = pipe.model(enc["pixel_values"], **ours, labels=labels)
            got = losses.seq2seq_loss(out.logits, out.labels)
        swapped = hf(**{**enc, "pixel_values": enc["pixel_values"].flip(0)}, labels=labels).loss
    assert abs(swapped.item() - ref.item()) > 1e-4  # the loss depends on the image
    assert abs(got.item() - ref.item()) <= ATOL


# ----------------------------------------------------------------------------------- interop, use


def test_save_loads_in_transformers_with_the_same_outputs(pair, tmp_path):
    kind, hf, processor, _, pipe = pair
    pipe.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "qformer_tokenizer").is_dir()
    back = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    theirs, mine = hf.state_dict(), back.state_dict()
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    back_processor = InstructBlipProcessor.from_pretrained(tmp_path / "ours")
    back_processor.tokenizer.padding_side = processor.tokenizer.padding_side
    texts = INSTRUCTIONS["padded"]
    enc = processor(images=tiny_hf.images(2), text=texts, padding=True, return_tensors="pt")
    again = back_processor(images=tiny_hf.images(2), text=texts, padding=True, return_tensors="pt")
    assert all(torch.equal(enc[k], again[k]) for k in enc)
    with torch.no_grad():
        assert torch.equal(back.generate(**again, max_new_tokens=5), hf.generate(**enc, max_new_tokens=5))
    reloaded = blip2.load(tmp_path / "ours")
    assert isinstance(reloaded, InstructCaptioner) and reloaded.config == pipe.config
    state = reloaded.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pipe.model.state_dict().items())


def test_ask_answers_through_both_tokenizers(pair):
    kind, hf, processor, _, pipe = pair
    assert isinstance(pipe, InstructCaptioner) and isinstance(pipe, Captioner)
    assert pipe.qformer_tokenizer.truncation_side == "left"
    questions = ["what is the sky ?", "what is on the couch ?"]
    prompts = [pipe.config.llm.vqa_template.format(q) for q in questions]
    spelled = len(processor.tokenizer)  # ids past the tiny vocabulary decode to nothing: not generated
    unspelled = list(range(spelled, hf.config.text_config.vocab_size))
    options = {"max_new_tokens": 4, "num_beams": 2, "length_penalty": 1.0, "suppress_tokens": unspelled}
    enc = processor(images=tiny_hf.images(2), text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**enc, **options)
        cls_only = {k: enc[k][:, :1] for k in ("qformer_input_ids", "qformer_attention_mask")}
        without = hf.generate(**{**enc, **cls_only}, **options)
    assert not torch.equal(ref, without)  # the oracle's answer depends on the instruction
    ref = ref[:, enc["input_ids"].shape[1] :] if kind == "opt" else ref
    expected = [t.strip() for t in processor.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    assert all(expected) and expected[0] != expected[1]
    assert pipe.ask(tiny_hf.images(2), questions, **options) == expected
    assert pipe.ask(tiny_hf.images(2)[1], questions[1], **options) == expected[1]
    greedy = {"max_new_tokens": 3, "suppress_tokens": unspelled}
    streamed = "".join(pipe.ask(tiny_hf.images(2)[0], questions[0], stream=True, **greedy))
    assert streamed.strip() == pipe.ask(tiny_hf.images(2)[0], questions[0], num_beams=1, **greedy) != ""


def test_hub_id_loads_with_the_released_conventions(pair, tmp_path):
    """`blip2.load("Salesforce/instructblip-...")` through the hub path (a hub cache holding the tiny
    model under the released name): an `InstructCaptioner` with the preset's prompt and lengths."""
    import shutil

    kind, _, _, folder, pipe = pair
    repo = {"opt": "instructblip-vicuna-7b", "t5": "instructblip-flan-t5-xl"}[kind]
    cached = tmp_path / f"models--Salesforce--{repo}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, cached / "snapshots" / ("0" * 40))
    loaded = blip2.load(f"Salesforce/{repo}", cache_dir=tmp_path, local_files_only=True)
    assert isinstance(loaded, InstructCaptioner) and loaded.config.name == repo
    assert loaded.config.llm.vqa_template == "Question: {} Short answer:"
    assert loaded.config.llm.prompt == "A short image description:"  # the paper's caption prompt
    assert loaded.config.llm.max_txt_len == 128 and loaded.config.kind == "instruct"
    state = loaded.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pipe.model.state_dict().items())
    assert isinstance(loaded.ask(tiny_hf.images(1)[0], "what is the sky ?", max_new_tokens=2), str)
