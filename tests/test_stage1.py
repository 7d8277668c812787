"""The stage-1 model and task: ITC, ITM with hard negatives, ITG; gradients; learning on a tiny batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from blip2 import losses
from blip2.models import RetrievalModel
from blip2.presets import preset
from blip2.tasks.stage1 import Stage1Task

B, L = 4, 9


def batch(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (b, L), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    pixels = torch.randn(b, 3, 16, 16, generator=g)
    return ids, mask, pixels


@torch.no_grad()
def generate_itg(model: RetrievalModel, pixel_values: torch.Tensor, max_new_tokens: int = 30) -> torch.Tensor:
    """Greedy captioning with the Q-Former's own ITG head; token ids after [DEC].

    The query pass runs once; each new token attends to its keys/values and to the cached keys/values
    of earlier tokens. Generation stops at [SEP].
    """
    cfg = model.config.qformer
    image_embeds = model.encode_image(pixel_values)
    b = image_embeds.shape[0]
    past = model.qformer(queries=model.queries(b), image_embeds=image_embeds, use_cache=True).past_kv
    token = torch.full((b, 1), cfg.dec_token_id, dtype=torch.long, device=image_embeds.device)
    done = torch.zeros(b, dtype=torch.bool, device=image_embeds.device)
    out = []
    for step in range(max_new_tokens):
        dec = model.qformer(
            input_ids=token, past_kv=past, mode="causal", position_offset=step, use_cache=True
        )
        past = dec.past_kv
        token = model.qformer.lm_logits(dec.hidden[:, -1:]).argmax(-1)  # (B, 1)
        token = token.masked_fill(done[:, None], cfg.pad_token_id)
        out.append(token)
        done |= token[:, 0] == cfg.sep_token_id
        if done.all():
            break
    return torch.cat(out, dim=1)  # (B, T)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RetrievalModel(preset("tiny-stage1"))


def test_itc_equals_direct_computation(model):
    model.eval()
    ids, mask, pixels = batch()
    with torch.no_grad():
        out = Stage1Task(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(0))
        img = model.embed_image(pixels).image_feats  # (B, Q, E)
        txt = model.embed_text(ids, mask)  # (B, E)
    sim = torch.empty(B, B)
    for i in range(B):
        for t in range(B):
            sim[i, t] = max(float(img[i, q] @ txt[t]) for q in range(img.shape[1]))
    sim = sim / model.temp.item()
    labels = torch.arange(B)
    expected = (
        F.cross_entropy(sim, labels, label_smoothing=0.1)
        + F.cross_entropy(sim.t(), labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(out.loss_itc, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.itc_scores(img, txt), sim * model.temp.item(), rtol=0, atol=1e-5)


def test_itc_with_image_ids_counts_shared_images_as_positives():
    sim = torch.randn(4, 4)
    ids = torch.tensor([7, 7, 3, 5])
    pos = losses.positives(4, 4, 0, ids, ids)
    assert pos.tolist()[0] == [True, True, False, False]
    loss = losses.itc_loss(sim, sim.t(), pos, label_smoothing=0.0)
    target = pos.float() / pos.sum(1, keepdim=True)
    expected = (
        -(target * sim.log_softmax(1)).sum(1).mean() - (target * sim.t().log_softmax(1)).sum(1).mean()
    ) / 2
    torch.testing.assert_close(loss, expected)
    # with unique ids it is plain smoothed cross-entropy
    eye = losses.positives(4, 4, 0)
    labels = torch.arange(4)
    plain = (
        F.cross_entropy(sim, labels, label_smoothing=0.1)
        + F.cross_entropy(sim.t(), labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(losses.itc_loss(sim, sim.t(), eye), plain)
    # rank 1 of 2: its rows' positives sit at columns 4..7 of the gathered batch
    assert losses.positives(4, 8, 4).nonzero().tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_hard_negatives_never_positive_and_follow_the_similarities():
    n, draws = 5, 400
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(3)) * 2
    pos = torch.eye(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts_t, counts_i = torch.zeros(n, n), torch.zeros(n, n)
    for _ in range(draws):
        nt, ni = losses.sample_hard_negatives(sim, pos, g)
        counts_t[torch.arange(n), nt] += 1
        counts_i[torch.arange(n), ni] += 1
    assert counts_t.diagonal().sum() == 0 and counts_i.diagonal().sum() == 0
    expected_t = torch.softmax(sim.masked_fill(pos, float("-inf")), 1)
    expected_i = torch.softmax(sim.t().masked_fill(pos, float("-inf")), 1)
    freq_t, freq_i = counts_t / counts_t.sum(1, keepdim=True), counts_i / counts_i.sum(1, keepdim=True)
    # 400 draws per row: a frequency's standard error is at most 0.025; allow 4 of them
    assert (freq_t - expected_t).abs().max() < 0.1
    assert (freq_i - expected_i).abs().max() < 0.1
    # a chi-square statistic per row stays far below what a wrong distribution gives
    for f, e in ((counts_t, expected_t), (counts_i, expected_i)):
        exp_counts = e * f.sum(1, keepdim=True)
        chi2 = ((f - exp_counts) ** 2 / exp_counts.clamp_min(1e-9)).masked_fill(pos, 0).sum(1)
        assert (chi2 < 30).all(), chi2  # 3 degrees of freedom: p < 1e-5 beyond 25


def test_hard_negatives_skip_every_pair_sharing_an_image_and_are_reproducible():
    ids = torch.tensor([1, 1, 2, 3, 3, 4])
    pos = ids[:, None] == ids[None, :]
    sim = torch.randn(6, 6)
    for seed in range(20):
        nt, ni = losses.sample_hard_negatives(sim, pos, torch.Generator().manual_seed(seed))
        assert not pos[torch.arange(6), nt].any() and not pos[torch.arange(6), ni].any()
    a = losses.sample_hard_negatives(sim, pos, torch.Generator().manual_seed(5))
    b = losses.sample_hard_negatives(sim, pos, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_gradients_reach_trainable_parts_never_the_frozen_encoder(model):
    model.train()
    model.zero_grad()
    ids, mask, pixels = batch()
    out = Stage1Task(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    for name, p in model.visual.tower.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert not model.visual.tower.training  # frozen means eval mode even when the model trains
    for name in [
        "query_tokens",
        "temp",
        "vision_proj.weight",
        "text_proj.weight",
        "itm_head.weight",
        "visual.ln_vision.weight",
    ]:
        p = model.get_parameter(name)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.qformer.named_parameters():
        if name == "embeddings.word.weight":  # only rows of tokens in the batch get gradient
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_each_loss_has_its_own_gradient_path(model):
    """ITC trains the projections, ITM the itm head, ITG the LM head; all of them the Q-Former."""
    model.eval()
    ids, mask, pixels = batch()
    for loss_name, head, other in [
        ("loss_itc", "text_proj.weight", "itm_head.weight"),
        ("loss_itm", "itm_head.weight", "text_proj.weight"),
        ("loss_itg", "qformer.lm_head.dense.weight", "itm_head.weight"),
    ]:
        model.zero_grad()
        getattr(
            Stage1Task(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(0)),
            loss_name,
        ).backward()
        assert model.get_parameter(head).grad.abs().sum() > 0
        assert model.get_parameter(other).grad is None or model.get_parameter(other).grad.abs().sum() == 0
        assert model.query_tokens.grad.abs().sum() > 0


def test_cached_features_give_the_same_loss_as_pixels(model):
    model.eval()
    ids, mask, pixels = batch()
    feats = model.visual.features(pixels)
    with torch.no_grad():
        a = Stage1Task(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(1))
        b = Stage1Task(model)(ids, mask, image_features=feats, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_overfitting_a_tiny_batch_drives_every_loss_down():
    torch.manual_seed(0)
    model = RetrievalModel(preset("tiny-stage1")).train()
    ids, mask, pixels = batch(seed=2, b=6)
    feats = model.visual.features(pixels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = last = None
    for _ in range(200):
        out = Stage1Task(model)(ids, mask, image_features=feats, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        values = {k: getattr(out, k).item() for k in ("loss_itc", "loss_itm", "loss_itg")}
        first = first or values
        last = values
    assert all(math.isfinite(v) for v in last.values())
    assert last["loss_itc"] < 0.6 * first["loss_itc"], (first, last)
    assert last["loss_itm"] < 0.5 * first["loss_itm"], (first, last)
    assert last["loss_itg"] < 0.3 * first["loss_itg"], (first, last)


def test_itm_and_generation_helpers(model):
    model.eval()
    ids, mask, pixels = batch()
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        logits = model.itm_logits(ids, mask, image_embeds=embeds)
        tokens = generate_itg(model, pixels, max_new_tokens=4)
    assert logits.shape == (B, 2) and torch.isfinite(logits).all()
    assert tokens.shape[0] == B and 1 <= tokens.shape[1] <= 4


def test_itm_loss_equals_a_direct_computation_of_its_three_kinds_of_pairs(model):
    """(image, text), (hard negative image, text), (image, hard negative text); labels 1, 0, 0."""
    model.eval()
    ids, mask, pixels = batch()
    with torch.no_grad():
        out = Stage1Task(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(7))
        emb = model.embed_image(pixels)
        sim = losses.max_over_queries(emb.image_feats, model.embed_text(ids, mask)) / model.temp
        neg_text, neg_image = losses.sample_hard_negatives(
            sim, torch.eye(B, dtype=torch.bool), torch.Generator().manual_seed(7)
        )
        img = emb.image_embeds
        logits = torch.cat(
            [
                model.itm_logits(ids, mask, image_embeds=img),
                model.itm_logits(ids, mask, image_embeds=img[neg_image]),
                model.itm_logits(ids[neg_text], mask[neg_text], image_embeds=img),
            ]
        )
    labels = torch.tensor([1] * B + [0] * 2 * B)
    torch.testing.assert_close(out.loss_itm, F.cross_entropy(logits, labels), rtol=0, atol=1e-5)


def test_itg_loss_equals_a_joint_causal_pass_with_dec_first(model):
    model.eval()
    ids, mask, pixels = batch()
    with torch.no_grad():
        out = Stage1Task(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(0))
        dec = ids.clone()
        dec[:, 0] = model.config.qformer.dec_token_id
        joint = model.qformer(
            queries=model.queries(B),
            input_ids=dec,
            attention_mask=mask,
            image_embeds=model.encode_image(pixels),
            mode="causal",
        ).hidden
        logits = model.qformer.lm_logits(joint[:, model.config.qformer.num_query_tokens :])
    labels = dec.masked_fill(mask == 0, -100)
    expected = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=0.1
    )
    torch.testing.assert_close(out.loss_itg, expected, rtol=0, atol=1e-5)


def test_itg_generation_stops_at_sep():
    torch.manual_seed(0)
    model = RetrievalModel(preset("tiny-stage1")).eval()
    with torch.no_grad():
        model.qformer.lm_head.bias[model.config.qformer.sep_token_id] = 1e4  # [SEP] always wins
        tokens = generate_itg(model, torch.randn(2, 3, 16, 16), max_new_tokens=6)
    assert tokens.tolist() == [[102], [102]]


def test_fixed_itm_negatives_replace_the_hard_negative_draw(model):
    """A caller's own negatives (research comparisons): ITM on exactly those pairs; -1 leaves a pair
    out; ITC and ITG do not depend on them."""
    model.eval()
    ids, mask, pixels = batch()
    neg_text, neg_image = torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])
    task = Stage1Task(model)
    with torch.no_grad():
        drawn = task(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(0))
        out = task(ids, mask, pixel_values=pixels, negatives=(neg_text, neg_image))
        img = model.encode_image(pixels)
        logits = torch.cat(
            [
                model.itm_logits(ids, mask, image_embeds=img),
                model.itm_logits(ids, mask, image_embeds=img[neg_image]),
                model.itm_logits(ids[neg_text], mask[neg_text], image_embeds=img),
            ]
        )
        dropped = task(ids, mask, pixel_values=pixels, negatives=(torch.tensor([-1, 2, 3, 0]), neg_image))
    labels = torch.tensor([1] * B + [0] * 2 * B)
    torch.testing.assert_close(out.loss_itm, F.cross_entropy(logits, labels), rtol=0, atol=1e-5)
    per_row = F.cross_entropy(logits, labels, reduction="none")
    keep = torch.ones(3 * B, dtype=torch.bool)
    keep[2 * B] = False  # image 0's pair with a negative text
    torch.testing.assert_close(dropped.loss_itm, per_row[keep].mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss_itc, drawn.loss_itc, rtol=0, atol=0)
    torch.testing.assert_close(out.loss_itg, drawn.loss_itg, rtol=0, atol=0)


def test_itg_logits_and_hidden_states_are_what_the_itg_loss_scores(model):
    model.eval()
    ids, mask, pixels = batch()
    with torch.no_grad():
        out = Stage1Task(model)(ids, mask, pixel_values=pixels, generator=torch.Generator().manual_seed(0))
        itg = model.itg(ids, mask, pixel_values=pixels)
    dec = ids.clone()
    dec[:, 0] = model.config.qformer.dec_token_id
    assert itg.logits.shape == (B, L, model.config.qformer.vocab_size)
    assert itg.hidden_states.shape == (B, L, model.config.qformer.hidden_size)
    torch.testing.assert_close(losses.itg_loss(itg.logits, dec.masked_fill(mask == 0, -100)), out.loss_itg)
    # the logits are the LM head of those hidden states
    torch.testing.assert_close(itg.logits, model.qformer.lm_logits(itg.hidden_states))
