"""InstructBLIP for video against transformers' `InstructBlipVideoForConditionalGeneration`, tiny and random.

Oracle: a tiny InstructBLIP video model with an OPT (decoder-only) or a T5 (encoder-decoder) LM, every
weight random (LayerNorms included), saved as transformers writes it (`config.json` of model type
"instructblipvideo", the LLM tokenizer with its `<video>` token, the Q-Former's tokenizer in
`qformer_tokenizer/`) and loaded with `blip2.load`. Each clip is 4 frames; the oracle's output is first
checked to depend on the frames and their order. Parity: the soft prompt `(B, T * Q, E)`, greedy and
beam-search generations token for token; the saved folder loads in transformers' video class; a video
file answered end to end through `InstructCaptioner` and `blip2 ask --video`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiny_hf
import torch
from transformers import InstructBlipVideoForConditionalGeneration

import blip2
from blip2 import losses
from blip2.interop import hf as hf_layout
from blip2.pipelines import InstructCaptioner, Video
from blip2.processing import ImageProcessor

ATOL = 1e-5
SHAPE = "a"
QUERIES = tiny_hf.SHAPES[SHAPE]["queries"]
SIZE = tiny_hf.SHAPES[SHAPE]["image"]
FRAMES = 4
INSTRUCTIONS = ["what is the sky ?", "a photo of two cat on the couch"]  # of different lengths: padding


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, tmp_path_factory):
    kind = request.param
    hf, processor = tiny_hf.instruct_video_model(kind, SHAPE, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # livelier weights: the default ones repeat one token whatever the input
        for t in hf.language_model.parameters():
            if t.dim() == 2:
                t.copy_(torch.randn(t.shape, generator=g) * 3.0 / t.shape[1] ** 0.5)
        hf.query_tokens.normal_(std=1.0, generator=g)
        hf.language_projection.weight.normal_(std=0.5, generator=g)
    processor.tokenizer.padding_side = "left" if kind == "opt" else "right"
    folder = tmp_path_factory.mktemp(f"instructblipvideo-{kind}")
    hf.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.qformer_tokenizer.save_pretrained(folder / "qformer_tokenizer")
    return kind, hf, processor, folder, blip2.load(folder)


def clips(n: int, seed: int = 0) -> list[list]:
    """`n` clips of `FRAMES` random PIL frames."""
    return [tiny_hf.images(FRAMES, seed=seed + i) for i in range(n)]


def video_pixels(videos: list[list]) -> torch.Tensor:
    """`(B, T, 3, S, S)` pixels of clips, each frame as transformers' BLIP image processor gives it."""
    return torch.stack([ImageProcessor(SIZE)(frames) for frames in videos])


def hf_inputs(hf, processor, videos: list[list], texts: list[str]) -> tuple[dict, dict]:
    """transformers' inputs (`<video>` x T*Q before the LLM text, as `InstructBlipVideoProcessor` builds
    them) and ours (the LLM text alone)."""
    tok, qtok = processor.tokenizer, processor.qformer_tokenizer
    q = qtok(texts, padding=True, return_tensors="pt")
    text = tok(texts, padding=True, return_tensors="pt")
    video = torch.full((len(texts), QUERIES * FRAMES), hf.config.video_token_index)
    pixels = video_pixels(videos)
    theirs = {
        "pixel_values": pixels,
        "qformer_input_ids": q["input_ids"],
        "qformer_attention_mask": q["attention_mask"],
        "input_ids": torch.cat([video, text["input_ids"]], dim=1),
        "attention_mask": torch.cat([torch.ones_like(video), text["attention_mask"]], dim=1),
    }
    ours = {
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "qformer_input_ids": q["input_ids"],
        "qformer_attention_mask": q["attention_mask"],
    }
    return theirs, ours


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def test_loads_as_a_video_model(pair):
    kind, hf, processor, _, pipe = pair
    assert isinstance(pipe, InstructCaptioner) and pipe.config.kind == "instruct"
    assert pipe.config.video_frames == FRAMES
    assert pipe.config.llm.image_token_id == hf.config.video_token_index
    assert hf_layout.architecture(pipe.config) == hf_layout.VIDEO
    with pytest.raises(ValueError, match="video_frames"):
        blip2.preset("tiny-opt", video_frames=4)  # BLIP-2 has no video layout


def test_soft_prompt_equals_transformers(pair):
    kind, hf, processor, _, pipe = pair
    theirs, ours = hf_inputs(hf, processor, clips(2), INSTRUCTIONS)
    assert (ours["qformer_attention_mask"] == 0).any()
    with torch.no_grad():
        ref = hf.get_video_features(
            theirs["pixel_values"], theirs["qformer_input_ids"], theirs["qformer_attention_mask"]
        ).pooler_output  # (B, T * Q, E)
        assert ref.shape == (2, FRAMES * QUERIES, hf.config.text_config.hidden_size)
        # the oracle's output depends on every frame, in order
        reordered = {**theirs, "pixel_values": theirs["pixel_values"].flip(1)}
        again = hf.get_video_features(*(reordered[k] for k in list(theirs)[:3])).pooler_output
        assert max_diff(again.unflatten(1, (FRAMES, QUERIES)).flip(1).flatten(1, 2), ref) <= ATOL
        assert max_diff(again, ref) > 1e-2
        instruction = (ours["qformer_input_ids"], ours["qformer_attention_mask"])
        got = pipe.model.prefix(theirs["pixel_values"], None, *instruction)
        assert max_diff(got, ref) <= ATOL
        per_frame = pipe.model.query_output(theirs["pixel_values"], None, *instruction)  # (B, T, Q, D)
        assert per_frame.shape == (2, FRAMES, QUERIES, pipe.config.qformer.hidden_size)
        first = pipe.model.query_output(
            theirs["pixel_values"][:, 0], None, *instruction
        )  # the first frames, as images
        assert max_diff(per_frame[:, 0], first) <= ATOL
        features = pipe.model.visual.features(theirs["pixel_values"].flatten(0, 1))  # (B * T, N, Dv)
        cached = pipe.model.prefix(None, features.unflatten(0, (2, FRAMES)), *instruction)
        assert max_diff(cached, ref) <= ATOL


@pytest.mark.parametrize("search", [{"num_beams": 1}, {"num_beams": 3}], ids=["greedy", "beam3"])
def test_generation_token_identical(pair, search):
    kind, hf, processor, _, pipe = pair
    theirs, ours = hf_inputs(hf, processor, clips(2), INSTRUCTIONS)
    options = {"max_new_tokens": 7, "eos_token_id": hf.config.text_config.eos_token_id, **search}
    with torch.no_grad():
        ref = hf.generate(**theirs, **options)
        got = pipe.model.generate(theirs["pixel_values"], **ours, **options)
    ref = ref[:, theirs["input_ids"].shape[1] :] if kind == "opt" else ref[:, 1:]  # new tokens only
    assert len({t for row in ref.tolist() for t in row}) >= 2 and ref[0].tolist() != ref[1].tolist()
    assert got.tolist() == ref.tolist()
    for mode in ("fast", "transformers"):  # the captioner's decode paths: the same tokens
        again = pipe.decoding.generate(pipe.model, theirs["pixel_values"], **ours, mode=mode, **options)
        assert again.tolist() == ref.tolist(), mode


def test_lm_loss_equals_transformers(pair):
    kind, hf, processor, _, pipe = pair
    theirs, ours = hf_inputs(hf, processor, clips(2), ["a photo of two cat", "what is the sky ? blue"])
    with torch.no_grad():
        if kind == "opt":  # the loss counts the tokens after each row's BOS and first two words
            prompt = torch.tensor([3, 3])
            text_labels = blip2.models.language.causal_lm_labels(
                ours["input_ids"], ours["attention_mask"], prompt
            )
            labels = torch.cat([torch.full((2, QUERIES * FRAMES), -100), text_labels], dim=1)
            ref = hf(**theirs, labels=labels).loss
            out = pipe.model(theirs["pixel_values"], **ours, prompt_lengths=prompt)
            got = losses.lm_loss(out.logits, out.labels)
        else:
            labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])
            ref = hf(**theirs, labels=labels).loss
            out = pipe.model(theirs["pixel_values"], **ours, labels=labels)
            got = losses.seq2seq_loss(out.logits, out.labels)
        reordered = hf(**{**theirs, "pixel_values": theirs["pixel_values"].flip(1)}, labels=labels).loss
    assert abs(reordered.item() - ref.item()) > 1e-4  # the loss depends on the frames' order
    assert abs(got.item() - ref.item()) <= ATOL


def test_save_loads_in_transformers_video_class(pair, tmp_path):
    kind, hf, processor, _, pipe = pair
    pipe.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "instructblipvideo" and config["architectures"] == [hf_layout.VIDEO]
    assert config["video_token_index"] == hf.config.video_token_index
    saved = json.loads((tmp_path / "ours" / "processor_config.json").read_text())
    assert saved["processor_class"] == "InstructBlipVideoProcessor" and saved["num_query_tokens"] == QUERIES
    assert saved["video_processor"]["size"] == {"height": SIZE, "width": SIZE}
    assert (tmp_path / "ours" / "qformer_tokenizer").is_dir()
    back = InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    theirs, mine = hf.state_dict(), back.state_dict()
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    inputs, _ = hf_inputs(hf, processor, clips(2), INSTRUCTIONS)
    with torch.no_grad():
        assert torch.equal(back.generate(**inputs, max_new_tokens=5), hf.generate(**inputs, max_new_tokens=5))
    reloaded = blip2.load(tmp_path / "ours")
    assert isinstance(reloaded, InstructCaptioner) and reloaded.config == pipe.config
    assert reloaded.image_processor.size == SIZE


def test_a_video_model_from_a_preset_saves_with_a_video_token(tmp_path):
    """A model built here has no placeholder token: saving gives it transformers' `<video>`."""
    from blip2.interop.checkpoint import build_model
    from blip2.tokenizers import qformer_tokenizer

    model = build_model(blip2.preset("tiny-instruct-opt", video_frames=FRAMES), init=True)
    tok = tiny_hf.word_tokenizer("opt")
    pipe = InstructCaptioner(
        model, ImageProcessor(SIZE), tok, qformer_tokenizer(tiny_hf.bert_tokenizer_dir())
    )
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "instructblipvideo"
    assert config["video_token_index"] == tok.convert_tokens_to_ids("<video>") == len(tok) - 1
    assert "<image>" not in tok.get_vocab()
    back = InstructBlipVideoForConditionalGeneration.from_pretrained(tmp_path)
    assert back.language_model.get_input_embeddings().weight.shape[0] > config["video_token_index"]


def _expected_answers(hf, processor, pipe, videos, questions, options) -> list[str]:
    prompts = [pipe.config.llm.vqa_template.format(q) for q in questions]
    theirs, _ = hf_inputs(hf, processor, videos, prompts)
    with torch.no_grad():
        ref = hf.generate(**theirs, **options)
    ref = ref[:, theirs["input_ids"].shape[1] :] if kind_of(hf) == "opt" else ref
    return [t.strip() for t in processor.tokenizer.batch_decode(ref, skip_special_tokens=True)]


def kind_of(hf) -> str:
    return "opt" if hf.config.use_decoder_only_language_model else "t5"


def test_a_video_file_answered_end_to_end(pair, tmp_path):
    from test_video import COLORS, write_video  # skips without PyAV

    from blip2.video import read_frames

    kind, hf, processor, _, pipe = pair
    path = tmp_path / "clip.mp4"
    write_video(path, COLORS, per_color=2)
    frames = read_frames(path, num_frames=FRAMES)
    spelled = len(processor.tokenizer)  # ids past the tiny vocabulary decode to nothing: not generated
    unspelled = list(range(spelled, hf.config.text_config.vocab_size))
    options = {"max_new_tokens": 4, "num_beams": 2, "length_penalty": 1.0, "suppress_tokens": unspelled}
    questions = ["what is the sky ?", "what is on the couch ?"]
    expected = _expected_answers(hf, processor, pipe, [frames, frames[::-1]], questions, options)
    assert all(expected) and expected[0] != expected[1]
    videos = [Video(path), Video(frames[::-1])]  # a file, and frames given as a list
    assert pipe.ask(videos, questions, **options) == expected
    assert pipe.ask(Video(path.read_bytes()), questions[0], **options) == expected[0]
    assert isinstance(pipe.caption(Video(path), max_new_tokens=3), str)
    greedy = {"max_new_tokens": 3, "suppress_tokens": unspelled}
    streamed = "".join(pipe.ask(Video(path), questions[0], stream=True, **greedy))
    assert streamed.strip() == pipe.ask(Video(path), questions[0], num_beams=1, **greedy)
    with pytest.raises(blip2.errors.UserError, match="both images and videos"):
        pipe.ask([Video(path), frames[0]], questions)
    with pytest.raises(blip2.errors.UserError, match="frames"):
        pipe.ask([Video(path), Video(frames[:2])], questions)
    assert pipe.ask(frames[0], questions[0], max_new_tokens=2)  # images still work


def test_cli_ask_video(pair, tmp_path):
    from test_video import COLORS, write_video  # skips without PyAV

    kind, hf, processor, folder, pipe = pair
    path = tmp_path / "clip.mp4"
    write_video(path, COLORS, per_color=2)
    expected = pipe.ask(Video(path), "what is the sky ?", max_new_tokens=3, num_beams=1)
    ask = [sys.executable, "-m", "blip2.cli", "ask", "--model", str(folder), "--video"]
    options = ["--max-new-tokens", "3", "--num-beams", "1"]
    out = subprocess.run([*ask, str(path), "what is the sky ?", *options], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
    bad = subprocess.run([*ask, str(tmp_path / "no.mp4"), "what ?"], capture_output=True, text=True)
    assert bad.returncode != 0 and "video file not found" in bad.stderr and "Traceback" not in bad.stderr
    ask_image = [sys.executable, "-m", "blip2.cli", "ask", "--model", str(folder), "--frames", "2"]
    bad = subprocess.run([*ask_image, str(path), "what ?"], capture_output=True, text=True)
    assert bad.returncode != 0 and "give --video too" in bad.stderr and "Traceback" not in bad.stderr


def test_a_too_long_video_generation_is_one_sentence(pair):
    """A clip's soft prompt is frames x queries positions: the length check counts all of them."""
    kind, hf, _, _, pipe = pair
    if kind != "opt":
        pytest.skip("the decoder-only LM's position table bounds queries + prompt + new tokens")
    limit = hf.config.text_config.max_position_embeddings
    soft = FRAMES * hf.config.num_query_tokens
    room = limit - soft - 1  # the prompt's BOS
    with pytest.raises(blip2.errors.UserError, match=f"but the {soft} image queries"):
        pipe.model.generate(video_pixels(clips(1)), max_new_tokens=room + 1)
    assert pipe.model.generate(video_pixels(clips(1)), max_new_tokens=min(room, 3)).shape[0] == 1
