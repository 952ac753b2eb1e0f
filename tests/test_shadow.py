"""Fast meta shadows (bigload.distributed.shadow): the same shapes and the same KV-cache
effects as running the module on meta as torch does, at a fraction of the cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigload.distributed.shadow import FastMeta

transformers = pytest.importorskip("transformers")


def test_cat_and_attention_shapes_are_computed() -> None:
    a, b = torch.empty(2, 3, 5, 4, device="meta"), torch.empty(2, 3, 1, 4, device="meta")
    q, v = torch.empty(2, 8, 1, 4, device="meta"), torch.empty(2, 8, 6, 16, device="meta")
    k, nothing = torch.empty(2, 8, 6, 4, device="meta"), torch.empty(0, device="meta")
    with FastMeta() as fast:
        grown = torch.cat([a, b], dim=-2)
        started = torch.cat([nothing, b], dim=-2)  # a cache layer's empty start
        out = F.scaled_dot_product_attention(q, k, v)
    assert grown.shape == (2, 3, 6, 4) and started.shape == b.shape
    assert out.shape == (2, 8, 1, 16) and out.device.type == "meta"
    assert not fast.shapes  # computed, not remembered


def test_a_call_seen_before_is_answered_from_its_shapes() -> None:
    x, w = torch.empty(3, 7, device="meta"), torch.empty(5, 7, device="meta")
    y = torch.empty(4, 7, device="meta")
    with FastMeta() as fast:
        first = F.linear(x, w)
        second = F.linear(x, w)
        other = F.linear(y, w)
    assert first.shape == second.shape == (3, 5) and other.shape == (4, 5)
    assert len(fast.shapes) == 2 and second is not first


def test_a_decoder_layer_shadow_matches_plain_meta_step_by_step() -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128,
                                      num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    rotary = LlamaRotaryEmbedding(config)
    caches = [transformers.DynamicCache(config=config) for _ in range(2)]
    fast = FastMeta()
    for length in (5, 1, 1, 1):
        x = torch.empty(2, length, 64, device="meta")
        cos, sin = (t.to("meta") for t in rotary(torch.zeros(1), torch.arange(length)[None]))
        plain = layer(x, position_embeddings=(cos, sin), cache=caches[0])
        with fast:
            shadow = layer(x, position_embeddings=(cos, sin), cache=caches[1])
        assert shadow.shape == plain.shape and shadow.dtype == plain.dtype
        assert caches[1].get_seq_length() == caches[0].get_seq_length()
        assert caches[1].layers[0].keys.shape == caches[0].layers[0].keys.shape
    assert caches[1].get_seq_length() == 8


def _llama_layer() -> tuple:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128,
                                      num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    return config, layer, LlamaRotaryEmbedding(config)


def test_a_remembered_shadow_repeats_the_cache_updates_of_the_call_it_remembers() -> None:
    from bigload.distributed.shadow import RememberedShadow

    config, layer, rotary = _llama_layer()
    remembered = RememberedShadow(layer, layer.forward)
    caches = [transformers.DynamicCache(config=config) for _ in range(2)]
    for length in (5, 1, 1, 1, 1):
        x = torch.empty(2, length, 64, device="meta")
        cos, sin = (t.to("meta") for t in rotary(torch.zeros(1), torch.arange(length)[None]))
        plain = layer(x, position_embeddings=(cos, sin), cache=caches[0])
        with FastMeta():
            shadow = remembered(x, position_embeddings=(cos, sin), cache=caches[1])
        assert shadow.shape == plain.shape
        assert caches[1].layers[0].keys.shape == caches[0].layers[0].keys.shape
    # the prefill changed the cache's flags (not remembered); the first step was, the rest hit
    assert sum(v is not None for v in remembered.remembered.values()) == 1
    assert caches[1].get_seq_length() == 9


def test_a_shadow_with_hooks_inside_is_not_remembered() -> None:
    from bigload.distributed.shadow import RememberedShadow

    config, layer, rotary = _llama_layer()
    seen = []
    layer.self_attn.register_forward_hook(lambda *a: seen.append(1))  # output capture
    remembered = RememberedShadow(layer, layer.forward)
    cache = transformers.DynamicCache(config=config)
    for _ in range(3):
        x = torch.empty(1, 1, 64, device="meta")
        cos, sin = (t.to("meta") for t in rotary(torch.zeros(1), torch.arange(1)[None]))
        with FastMeta():
            remembered(x, position_embeddings=(cos, sin), cache=cache)
    assert len(seen) == 3 and not remembered.remembered
