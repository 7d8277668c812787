"""The Q-Former's masks, behaviourally, and its parity with transformers' Blip2QFormerModel."""

import pytest
import torch

from blip2.config import QFormerConfig
from blip2.models.qformer import QFormer

torch.manual_seed(0)
CFG = QFormerConfig(
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    intermediate_size=40,
    cross_attention_freq=2,
    encoder_width=24,
    num_query_tokens=6,
    vocab_size=120,
    max_position_embeddings=40,
)
B, Q, L, N = 2, 6, 7, 10


@pytest.fixture(scope="module")
def qf():
    torch.manual_seed(0)
    return QFormer(CFG).eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, Q, 32, generator=g)
    image = torch.randn(B, N, 24, generator=g)
    ids = torch.randint(1, 120, (B, L), generator=g)
    return queries, image, ids


def run(qf, queries, image, ids, mode, mask=None):
    with torch.no_grad():
        return qf(queries=queries, input_ids=ids, attention_mask=mask, image_embeds=image, mode=mode).hidden


def test_unimodal_mask_separates_queries_and_text(qf):
    queries, image, ids = inputs()
    out = run(qf, queries, image, ids, "unimodal")
    other_text = run(qf, queries, image, torch.randint(1, 120, (B, L)), "unimodal")
    other_image = run(qf, queries, torch.randn(B, N, 24), ids, "unimodal")
    torch.testing.assert_close(out[:, :Q], other_text[:, :Q], rtol=0, atol=1e-6)  # queries ignore text
    torch.testing.assert_close(out[:, Q:], other_image[:, Q:], rtol=0, atol=1e-6)  # text ignores the image
    assert not torch.allclose(out[:, Q:], other_text[:, Q:])
    # one unimodal pass equals the two separate passes the ITC loss uses
    with torch.no_grad():
        q_only = qf(queries=queries, image_embeds=image).hidden
        t_only = qf(input_ids=ids).hidden
    torch.testing.assert_close(out[:, :Q], q_only, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, Q:], t_only, rtol=0, atol=1e-5)


def test_causal_mask_hides_later_tokens_and_text_from_queries(qf):
    queries, image, ids = inputs()
    out = run(qf, queries, image, ids, "causal")
    for i in range(L - 1):
        changed = ids.clone()
        changed[:, i + 1 :] = torch.randint(1, 120, (B, L - i - 1))
        other = run(qf, queries, image, changed, "causal")
        torch.testing.assert_close(out[:, : Q + i + 1], other[:, : Q + i + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, Q + i + 1 :], other[:, Q + i + 1 :])
    # text does see the queries (through them, the image)
    other_image = run(qf, queries, torch.randn(B, N, 24), ids, "causal")
    assert not torch.allclose(out[:, Q:], other_image[:, Q:])


def test_bidirectional_mask_mixes_both(qf):
    queries, image, ids = inputs()
    out = run(qf, queries, image, ids, "bidirectional")
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 120
    other_text = run(qf, queries, image, changed, "bidirectional")
    other_image = run(qf, queries, torch.randn(B, N, 24), ids, "bidirectional")
    assert not torch.allclose(out[:, :Q], other_text[:, :Q])  # queries see text
    assert not torch.allclose(out[:, Q : Q + 1], other_text[:, Q : Q + 1])  # the first token sees the last
    assert not torch.allclose(out[:, Q:], other_image[:, Q:])  # text sees the image through the queries


def test_padding_is_invisible(qf):
    queries, image, ids = inputs()
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, 4:] = 0
    out = run(qf, queries, image, ids, "bidirectional", mask)
    changed = ids.clone()
    changed[:, 4:] = torch.randint(1, 120, (B, L - 4))
    other = run(qf, queries, image, changed, "bidirectional", mask)
    torch.testing.assert_close(out[:, : Q + 4], other[:, : Q + 4], rtol=0, atol=1e-6)


def test_kv_cache_equals_the_joint_causal_pass(qf):
    """ITG reuses the query pass's keys/values; generation feeds tokens one by one."""
    queries, image, ids = inputs()
    joint = run(qf, queries, image, ids, "causal")
    with torch.no_grad():
        past = qf(queries=queries, image_embeds=image, use_cache=True).past_kv
        cached = qf(input_ids=ids, past_kv=past, mode="causal").hidden
        torch.testing.assert_close(cached, joint[:, Q:], rtol=0, atol=1e-5)
        steps = []
        for i in range(L):
            out = qf(
                input_ids=ids[:, i : i + 1], past_kv=past, mode="causal", position_offset=i, use_cache=True
            )
            past = out.past_kv
            steps.append(out.hidden)
    torch.testing.assert_close(torch.cat(steps, 1), joint[:, Q:], rtol=0, atol=1e-5)


def test_shared_image_kv_equals_recomputing(qf):
    queries, image, ids = inputs()
    with torch.no_grad():
        a = qf(queries=queries, input_ids=ids, image_embeds=image).hidden
        b = qf(queries=queries, input_ids=ids, image_kv=qf.image_kv(image)).hidden
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_text_side_says_so():
    qf = QFormer(
        QFormerConfig(
            hidden_size=16, num_layers=1, num_heads=2, intermediate_size=8, encoder_width=8, text=False
        )
    )
    with pytest.raises(ValueError, match="no text side"):
        qf(input_ids=torch.ones(1, 3, dtype=torch.long))


# ------------------------------------------------------------------------------- transformers parity

# transformers' Blip2QFormerModel names -> ours (an independent, hand-written table)
HF_LAYER = {
    "attention.attention.query": "self_attn.query",
    "attention.attention.key": "self_attn.key",
    "attention.attention.value": "self_attn.value",
    "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.attention.query": "cross_attn.query",
    "crossattention.attention.key": "cross_attn.key",
    "crossattention.attention.value": "cross_attn.value",
    "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate_query.dense": "query_ffn.fc1",
    "output_query.dense": "query_ffn.fc2",
    "output_query.LayerNorm": "query_ffn.norm",
    "intermediate.dense": "text_ffn.fc1",
    "output.dense": "text_ffn.fc2",
    "output.LayerNorm": "text_ffn.norm",
}


def hf_to_ours(name):
    if name.startswith("layernorm."):
        return "embeddings.norm." + name.split(".")[-1]
    _, _, i, rest = name.split(".", 3)  # encoder.layer.{i}.{module}.{param}
    module, param = rest.rsplit(".", 1)
    return f"layers.{i}.{HF_LAYER[module]}.{param}"


@pytest.mark.parametrize("freq,width", [(1, 32), (2, 48)])
def test_query_pass_equals_transformers(freq, width):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(1)
    hf_cfg = Blip2QFormerConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        cross_attention_frequency=freq,
        encoder_hidden_size=width,
        use_qformer_text_input=True,
    )
    hf = Blip2QFormerModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # randomize everything, LayerNorms and biases included
            p.copy_(
                1 + 0.1 * torch.randn_like(p)
                if "LayerNorm" in name or "layernorm" in name
                else 0.2 * torch.randn_like(p)
            )
    ours = QFormer(
        QFormerConfig(
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            intermediate_size=37,
            cross_attention_freq=freq,
            encoder_width=width,
            vocab_size=99,
            max_position_embeddings=64,
        )
    ).eval()
    params = dict(ours.named_parameters())
    filled = set()
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            params[hf_to_ours(name)].copy_(p)
            filled.add(hf_to_ours(name))
    assert {
        k for k in params if not k.startswith(("embeddings.word", "embeddings.position", "lm_head"))
    } == filled

    queries, image = torch.randn(3, 5, 32), torch.randn(3, 11, width)
    with torch.no_grad():
        theirs = hf(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        mine = ours(queries=queries, image_embeds=image).hidden
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
