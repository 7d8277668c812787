"""Stage 2: the Q-Former as soft visual prompts for a frozen LLM (tiny random OPT, GPT-2 and T5 LMs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from blip2.config import LLMConfig
from blip2.models import LanguageBridge, RetrievalModel, language
from blip2.presets import TINY_LLMS, preset
from blip2.tasks.stage2 import Stage2Task

KINDS = ["tiny-opt", "tiny-gpt2", "tiny-t5"]
DECODER_ONLY = ["tiny-opt", "tiny-gpt2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they lose a lot (spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WIDTH_KEYS = {"opt": ("hidden_size", "word_embed_proj_dim"), "gpt2": ("n_embd",), "t5": ("d_model",)}


def make(
    name: str,
    seed: int = 0,
    lively: bool = False,
    scale: float | None = None,
    width: int | None = None,
    **llm_fields,
) -> LanguageBridge:
    """A tiny stage-2 model from a preset.

    `lively`: larger random LM weights (and queries/projection), so a random 2-layer LM's output depends on
    the image and prompt (default init repeats one token whatever its input) and comparisons of generated
    tokens mean something. `scale`: LM matrices drawn as `N(0, scale^2 / fan_in)` (OPT's and GPT-2's
    default std of 0.02 makes near-uniform logits that no prompt can steer). `width`: a wider LM.
    """
    torch.manual_seed(seed)
    config = preset(name)
    if width is not None:
        hf = dict(config.llm.hf_config)
        hf.update({k: width for k in WIDTH_KEYS[config.llm.model_type]})
        if config.llm.model_type == "t5":
            hf["d_kv"] = width // hf["num_heads"]
        llm_fields["hf_config"] = hf
    if llm_fields:
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, **llm_fields))
    model = LanguageBridge(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if lively or scale is not None:
            for p in model.llm.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * (scale or 3.0) / p.shape[1] ** 0.5)
        if lively:
            model.query_tokens.normal_(std=1.0, generator=g)
            model.language_projection.weight.normal_(std=0.5, generator=g)
    return model


def images(n: int, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def pad(rows: list[list[int]], side: str, pad_id: int) -> tuple[Tensor, Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def loss_of(model: LanguageBridge, px: Tensor) -> Tensor:
    """A small training batch for either LM kind (right padded, as training tokenizers pad)."""
    if model.is_encoder_decoder:
        ids, mask = pad([[5, 6, 1], [7, 1]], "right", 0)
        labels, dmask = pad([[11, 12, 13, 1], [14, 1]], "right", 0)
        return Stage2Task(model)(px, ids, mask, labels=labels, decoder_attention_mask=dmask).loss
    ids, mask = pad([[2, 5, 6, 11, 12, 13, 50], [2, 5, 6, 14, 50]], "right", 1)
    return Stage2Task(model)(px, ids, mask, prompt_lengths=3).loss


# ------------------------------------------------------------------------------------ frozen LLM, gradients


@pytest.mark.parametrize("name", KINDS)
def test_gradients_reach_qformer_through_frozen_llm_which_never_changes(name):
    model = make(name).train()  # the LLM follows train mode as in LAVIS (dropout on): still never updated
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    tower_before = {k: v.clone() for k, v in model.visual.tower.state_dict().items()}
    proj_before = model.language_projection.weight.detach().clone()
    # a careless optimizer over *all* parameters, with weight decay: frozen ones must still not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    loss_of(model, images(2)).backward()

    assert all(not p.requires_grad and p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.visual.tower.parameters())
    # the projection and queries only reach the loss through the LLM: their gradients flowed through it
    trainable = {
        "language_projection": model.language_projection,
        "qformer": model.qformer,
        "ln_vision": model.visual.ln_vision,
    }
    for part, module in trainable.items():
        for n, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {part}.{n}"
    assert model.query_tokens.grad.abs().sum() > 0

    opt.step()
    for k, v in model.llm.state_dict().items():
        assert torch.equal(v, llm_before[k]), k
    for k, v in model.visual.tower.state_dict().items():
        assert torch.equal(v, tower_before[k]), k
    assert not torch.equal(model.language_projection.weight, proj_before)


def test_state_dict_keeps_transformers_keys_under_llm():
    keys = make("tiny-opt").state_dict().keys()
    assert "llm.model.decoder.embed_tokens.weight" in keys
    assert {"query_tokens", "language_projection.weight", "language_projection.bias"} <= set(keys)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_llm_with_fp32_qformer(dtype):
    model = make("tiny-opt", dtype=dtype).eval()
    half = language.torch_dtype(dtype)
    assert all(p.dtype == half for p in model.llm.parameters())
    assert all(p.dtype == torch.float32 for p in model.qformer.parameters())
    px = images(2)
    assert model.prefix(px).dtype == half
    loss = loss_of(model, px)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.language_projection.weight.grad.dtype == torch.float32
    assert model.language_projection.weight.grad.abs().sum() > 0
    assert model.generate(px, max_new_tokens=3).shape[0] == 2


# ------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_decoder_only_loss_counts_only_text_after_the_prompt(name):
    model = make(name).eval()
    px, q, p = images(2), model.config.qformer.num_query_tokens, 3
    ids, mask = pad([[2, 5, 6, 11, 12, 13, 50], [2, 5, 6, 14, 50]], "right", 1)
    out = Stage2Task(model)(px, ids, mask, prompt_lengths=p)
    assert out.logits.shape == (2, q + ids.shape[1], 99)

    # by hand: text token t (t >= p) is predicted at sequence position q + t - 1; queries predict nothing
    targets = ids[:, p:].masked_fill(mask[:, p:] == 0, -100)
    expected = F.cross_entropy(
        out.logits[:, q + p - 1 : -1].flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)

    # relabelling prompt and padding positions changes nothing; relabelling a caption token does
    labels = ids.clone()
    labels[:, :p] = 40
    labels[1, 5:] = 40
    assert torch.equal(Stage2Task(model)(px, ids, mask, labels=labels, prompt_lengths=p).loss, out.loss)
    labels[0, p + 1] = 40
    assert not torch.allclose(
        Stage2Task(model)(px, ids, mask, labels=labels, prompt_lengths=p).loss, out.loss
    )


@pytest.mark.parametrize("name", KINDS)
def test_loss_does_not_depend_on_padding_side(name):
    model = make(name, lively=True).eval()
    px = images(2)
    if model.is_encoder_decoder:
        labels, dmask = pad([[11, 12, 1], [14, 1]], "right", 0)
        losses = [
            Stage2Task(model)(
                px, *pad([[5, 6, 7, 1], [7, 1]], side, 0), labels=labels, decoder_attention_mask=dmask
            ).loss
            for side in ("right", "left")
        ]
        torch.testing.assert_close(losses[0], losses[1])
        return
    # positions come from the attention mask (GPT-2 would otherwise count the pads); without a prompt
    # BOS is a target, predicted from the last query (not from a left pad)
    rows = [[2, 5, 6, 11, 12, 13, 50], [2, 14, 50]]
    for prompt in (1, None, 0):
        losses = [
            Stage2Task(model)(px, *pad(rows, side, 1), prompt_lengths=prompt).loss
            for side in ("right", "left")
        ]
        torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("name", KINDS)
def test_loss_only_gives_the_same_loss_and_gradients(name):
    """`return_logits=False` (training): the output layer runs only where a counted token is predicted;
    loss and gradients equal the full call's, for prompts of different lengths and either padding."""
    model = make(name, lively=True).eval()
    model.requires_grad_(False).qformer.requires_grad_(True)
    px = images(2)
    if model.is_encoder_decoder:
        ids, mask = pad([[5, 6, 7, 1], [7, 1]], "right", 0)
        labels, dmask = pad([[11, 12, 1], [14, 1]], "right", 0)
        calls = [((px, ids, mask), {"labels": labels, "decoder_attention_mask": dmask})]
    else:
        rows = [[2, 5, 6, 11, 12, 13, 50], [2, 14, 15, 16, 50]]
        calls = [
            ((px, *pad(rows, side, 1)), {"prompt_lengths": prompt})
            for side in ("right", "left")
            for prompt in (torch.tensor([4, 2]), 3, None)
        ]
    head = model.llm.get_output_embeddings()
    positions: list[int] = []
    hook = head.register_forward_hook(lambda _m, inputs, _o: positions.append(inputs[0].shape[1]))
    for args, kwargs in calls:
        full = Stage2Task(model)(*args, **kwargs)
        full.loss.backward()
        grads = [p.grad.clone() for p in model.qformer.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        lean = Stage2Task(model)(*args, **kwargs, return_logits=False)
        assert lean.logits is None
        lean.loss.backward()
        torch.testing.assert_close(lean.loss, full.loss)
        lean_grads = [p.grad for p in model.qformer.parameters() if p.grad is not None]
        assert len(grads) == len(lean_grads) > 0
        for a, b in zip(grads, lean_grads, strict=True):
            torch.testing.assert_close(a, b)
        model.zero_grad(set_to_none=True)
    hook.remove()
    if not model.is_encoder_decoder:  # the output layer really ran on fewer positions (not the queries)
        full_len, lean_len = positions[0::2], positions[1::2]
        assert all(lean < full for full, lean in zip(full_len, lean_len, strict=True)), positions


def test_encoder_decoder_loss_is_the_decoder_cross_entropy():
    model = make("tiny-t5").eval()
    px = images(2)
    ids, mask = pad([[5, 6, 1], [7, 1]], "right", 0)
    labels, dmask = pad([[11, 12, 13, 1], [14, 1]], "right", 0)
    out = Stage2Task(model)(px, ids, mask, labels=labels, decoder_attention_mask=dmask)
    assert out.logits.shape == (2, 4, 99)
    expected = F.cross_entropy(
        out.logits.flatten(0, 1), labels.masked_fill(dmask == 0, -100).flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    # the decoder reads the labels shifted right: the first step sees the start token whatever the labels
    other = labels.clone()
    other[:, 1:] = 40
    first = Stage2Task(model)(px, ids, mask, labels=other, decoder_attention_mask=dmask).logits[:, 0]
    torch.testing.assert_close(first, out.logits[:, 0])
    # labels under padding are ignored
    other = labels.clone()
    other[1, 2:] = 40
    assert torch.equal(
        Stage2Task(model)(px, ids, mask, labels=other, decoder_attention_mask=dmask).loss, out.loss
    )


# ------------------------------------------------------------------------------------ generation


def _prompts(model: LanguageBridge) -> list[list[int]]:
    if model.is_encoder_decoder:  # T5's tokenizer closes the encoder text with </s>
        return [[5, 17, 42, 1], [8, 1], [33, 9, 1]]
    return [[2, 5, 17, 42], [2], [2, 33, 9]]  # BOS first, as OPT's tokenizer gives


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("name", KINDS)
def test_batched_generation_equals_one_by_one(name, num_beams, side):
    model = make(name, lively=True).eval()
    px, prompts, pad_id = images(3), _prompts(model), model.pad_token_id
    # an EOS the model really emits (image 0's third greedy token), so rows end at different steps
    model.eos_token_id = int(model.generate(px[:1], torch.tensor([prompts[0]]), max_new_tokens=3)[0, -1])
    kw = dict(max_new_tokens=6, num_beams=num_beams)

    ids, mask = pad(prompts, side, pad_id)
    batched = model.generate(px, ids, mask, **kw)
    singles = [model.generate(px[i : i + 1], torch.tensor([r]), **kw)[0] for i, r in enumerate(prompts)]
    for row, single in zip(batched, singles, strict=True):
        assert torch.equal(row[: len(single)], single)
        assert (row[len(single) :] == pad_id).all()
    if num_beams == 1:
        assert model.eos_token_id in singles[0].tolist()
    assert len({tuple(s.tolist()) for s in singles}) > 1  # the images/prompts do steer the output


def test_batched_greedy_scores_equal_one_by_one():
    for name in KINDS:
        model = make(name, lively=True).eval()
        px, prompts = images(3), _prompts(model)
        kw = dict(max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
        batched = model.generate(px, *pad(prompts, "left", model.pad_token_id), **kw)
        for i, r in enumerate(prompts):
            single = model.generate(px[i : i + 1], torch.tensor([r]), **kw)
            assert torch.equal(batched.sequences[i, : single.sequences.shape[1]], single.sequences[0])
            # float32 rounding of a padded batch, amplified by the lively weights (scores about 10; T5's
            # unscaled attention differs by up to 3e-4 over seeds); a pad leaking in changes them by O(1)
            for step, scores in enumerate(single.scores):
                torch.testing.assert_close(batched.scores[step][i], scores[0], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", KINDS)
def test_prefix_is_computed_once_per_image_for_all_beams(name):
    model = make(name, lively=True).eval()
    batches = []
    model.qformer.register_forward_hook(
        lambda mod, args, kwargs, out: batches.append(out.hidden.shape[0]), with_kwargs=True
    )
    out = model.generate(images(2), max_new_tokens=3, num_beams=3, num_return_sequences=3)
    assert batches == [2]
    assert out.shape[0] == 6


@pytest.mark.parametrize("name", KINDS)
def test_generate_kwargs_reach_transformers(name):
    model = make(name, lively=True).eval()
    px = images(2)
    greedy = model.generate(px, max_new_tokens=5)
    assert greedy.shape == (2, 5) or (greedy.shape[1] < 5 and (greedy == model.eos_token_id).any())
    # sampling from a vanishing nucleus is greedy; seeded sampling is reproducible
    nucleus = model.generate(px, max_new_tokens=5, do_sample=True, top_p=1e-6, temperature=0.7)
    assert torch.equal(nucleus, greedy)
    torch.manual_seed(3)
    a = model.generate(px, max_new_tokens=5, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    assert torch.equal(a, model.generate(px, max_new_tokens=5, do_sample=True, temperature=1.5))
    # min_new_tokens holds back an EOS the model wants to emit first
    model.eos_token_id = int(greedy[0, 0])
    assert model.generate(px[:1], max_new_tokens=5).shape[1] == 1
    held = model.generate(px[:1], max_new_tokens=5, min_new_tokens=3)[0]
    assert len(held) >= 3 and model.eos_token_id not in held[:3].tolist()


# ------------------------------------------------------------------------------------ overfitting


@pytest.mark.parametrize("name", KINDS)
def test_overfit_two_images_then_greedy_reproduces_the_captions(name):
    # A 64-wide LM (16 is too narrow for a random frozen LM to be steered by 8 soft tokens); T5's own
    # init already gives steerable logits. eval: no dropout, a deterministic curve; gradients still flow.
    model = make(name, width=64, scale=None if name == "tiny-t5" else 2.0).eval()
    px = images(2)
    captions = [[11, 23, 35, 47], [52, 64, 76, 88]]
    if model.is_encoder_decoder:
        eos = 1
        prompt = torch.tensor([[1], [1]])  # the empty prompt: "" tokenizes to </s>
        labels = torch.tensor([c + [eos] for c in captions])

        def step_loss() -> Tensor:
            return Stage2Task(model)(px, prompt, labels=labels).loss
    else:
        eos = model.eos_token_id = 50  # like OPT's "\n": not the BOS
        prompt = torch.tensor([[2], [2]])
        ids = torch.tensor([[2] + c + [eos] for c in captions])

        def step_loss() -> Tensor:
            return Stage2Task(model)(px, ids, prompt_lengths=1).loss

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = step_loss().item()
    for _ in range(250):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1 * first
    out = model.generate(px, prompt, max_new_tokens=8)
    assert out.tolist() == [c + [eos] for c in captions]


# ------------------------------------------------------------------------------------ building


def test_from_stage1_copies_the_query_side():
    torch.manual_seed(0)
    stage1 = RetrievalModel(preset("tiny-stage1")).eval()
    with torch.no_grad():
        for p in stage1.parameters():  # not default init: a missed copy must show
            p.add_(torch.randn_like(p) * 0.1)
    px = images(2)
    want = stage1.embed_image(px).query_output

    model = LanguageBridge.from_stage1(stage1, preset("tiny-opt").llm).eval()
    assert model.qformer.embeddings.word is None and model.qformer.lm_head is None
    assert model.config.kind == "generation" and not model.config.qformer.text
    torch.testing.assert_close(model.query_output(px), want)
    assert model.visual.ln_vision.weight is not stage1.visual.ln_vision.weight  # copied, not shared

    kept = LanguageBridge.from_stage1(stage1, preset("tiny-opt").llm, text=True).eval()
    assert torch.equal(kept.qformer.embeddings.word.weight, stage1.qformer.embeddings.word.weight)
    torch.testing.assert_close(kept.query_output(px), want)

    gpt2 = language.build_llm(LLMConfig(hf_config=dict(TINY_LLMS["gpt2"])))
    given = LanguageBridge.from_stage1(stage1, gpt2)
    assert given.llm is gpt2 and given.config.llm.model_type == "gpt2"
    assert given.language_projection.out_features == 16
    assert Stage2Task(given)(px, torch.tensor([[2, 5, 6], [2, 7, 8]])).loss.isfinite()


def test_given_llm_must_match_the_config_kind():
    t5 = language.build_llm(LLMConfig(hf_config=dict(TINY_LLMS["t5"])))
    with pytest.raises(ValueError, match="matches the model"):
        LanguageBridge(preset("tiny-opt"), llm=t5)
    with pytest.raises(ValueError, match="needs an LLM"):
        LanguageBridge(preset("tiny-stage1"))


def test_a_given_llm_with_another_vocab_is_recorded_so_the_saved_model_loads(tmp_path):
    from blip2.interop.checkpoint import load_folder, read_config, save_folder

    torch.manual_seed(0)
    config = dataclasses.replace(preset("tiny-opt"), name="")
    llm_cfg = dataclasses.replace(config.llm, eos_text="\n", prompt="a photo of")
    config = dataclasses.replace(config, llm=llm_cfg)
    opt = language.build_llm(LLMConfig(hf_config={**TINY_LLMS["opt"], "vocab_size": 120}))
    model = LanguageBridge(config, llm=opt).eval()
    assert model.config.llm.hf_config["vocab_size"] == 120  # the LM used, not the preset's 99
    assert model.config.llm.eos_text == "\n" and model.config.llm.prompt == "a photo of"
    save_folder(model, tmp_path)
    again = load_folder(tmp_path, read_config(tmp_path))
    assert again.config == model.config
    want, got = model.state_dict(), again.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_vqa_prompt_per_model_kind():
    assert make("tiny-opt").vqa_prompt("what is it?") == "Question: what is it? Answer:"
    assert make("tiny-t5").vqa_prompt("what is it?") == "Question: what is it? Short answer:"
    assert make("tiny-gpt2", vqa_prompt="Q: {} A:").vqa_prompt("why?") == "Q: why? A:"


# ------------------------------------------------------------------------------------ token plumbing


def test_move_padding_keeps_token_order():
    ids = torch.tensor([[0, 5, 6, 0], [7, 8, 9, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    left, lmask = language.move_padding(ids, mask, "left")
    assert left.tolist() == [[0, 0, 5, 6], [0, 7, 8, 9], [1, 2, 3, 4]]
    assert lmask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    right, _ = language.move_padding(left, lmask, "right")
    assert right.tolist() == [[5, 6, 0, 0], [7, 8, 9, 0], [1, 2, 3, 4]]


def test_causal_lm_labels_mask_prompt_and_padding_on_either_side():
    ids, mask = pad([[2, 5, 6, 7], [2, 8]], "left", 1)
    assert language.causal_lm_labels(ids, mask, 2).tolist() == [[-100, -100, 6, 7], [-100, -100, -100, -100]]
    lengths = torch.tensor([1, 1])
    assert language.causal_lm_labels(ids, mask, lengths).tolist() == [[-100, 5, 6, 7], [-100, -100, -100, 8]]
    assert language.position_ids(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def test_build_llm_keeps_the_configured_architecture():
    # transformers 5.x T5 configs force tie_word_embeddings=True; FlanT5 (and the preset) has its own head
    t5 = language.build_llm(LLMConfig(hf_config=dict(TINY_LLMS["t5"])))
    assert t5.lm_head.weight is not t5.shared.weight and not t5.config.scale_decoder_outputs
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(t5.encoder.block[0].layer[1].DenseReluDense.act(x), F.gelu(x))  # exact, as LAVIS
    again = language.build_llm(language.llm_config_from_model(t5))
    assert again.lm_head.weight is not again.shared.weight and not again.config.scale_decoder_outputs
    opt = language.build_llm(LLMConfig(hf_config=dict(TINY_LLMS["opt"])))
    assert opt.lm_head.weight is opt.get_input_embeddings().weight
