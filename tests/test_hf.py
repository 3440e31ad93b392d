"""HuggingFace transformers through fa2dispatch (``fa2dispatch.integrations.hf``), on CPU.

Tiny randomly initialised models (no downloads): logits against ``attn_implementation="eager"``
under STYLE.md's rule (our error against the same model in float64 at most twice eager float32's,
plus the floor of tests/helpers.py), and greedy ``generate()`` token for token. Every test also
checks which path of ours ran (plain dispatcher call or the attn_mask path), so a test cannot
pass by transformers quietly using another attention.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import check_close

transformers = pytest.importorskip(
    "transformers", reason="HuggingFace transformers is not installed (requirements/test.txt installs it)")

from fa2dispatch import api
from fa2dispatch.integrations import hf

VOCAB = 128
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert hf.register() == "fa2dispatch"


@pytest.fixture
def calls(monkeypatch):
    """Every call of ours, as ("plain" | "mask", Mq, Mkv, causal); causal is None for one query
    row, where bottom-right causality masks nothing (transformers 4.x's GPT-2 passes
    is_causal=False for decode steps, 5.x leaves it to the module)."""
    seen = []
    plain, masked = api.attention, api._attention

    def record(path, q, k, causal):
        seen.append((path, q.shape[1], k.shape[1], causal if q.shape[1] > 1 else None))

    def attention(q, k, v, **kw):
        record("plain", q, k, kw["causal"])
        return plain(q, k, v, **kw)

    def _attention(q, k, v, **kw):
        if kw.get("attn_mask") is not None:
            record("mask", q, k, kw["causal"])
        return masked(q, k, v, **kw)

    monkeypatch.setattr(api, "attention", attention)
    monkeypatch.setattr(api, "_attention", _attention)
    return seen


def llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)


def gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2, **kw)


def models(config, seed=0):
    """(eager float32, ours float32, eager float64), same weights; each with its own config
    (``from_config`` keeps the config object, and the attention choice lives in it)."""
    torch.manual_seed(seed)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                         attn_implementation="fa2dispatch").eval()
    ours.load_state_dict(eager.state_dict())
    eager64 = copy.deepcopy(eager).double()
    assert ours.config._attn_implementation == "fa2dispatch"
    assert eager.config._attn_implementation == "eager"
    return eager, ours, eager64


def ids(B, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, M), generator=g)


def check_logits(ours, eager, eager64, select=slice(None)):
    """STYLE.md's rule on the logits (positions ``select``): float64 eager is the truth, float32
    eager's error sets the scale."""
    check_close("logits", ours[select], eager64[select], eager[select])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_eager(family, calls):
    config = llama_config() if family == "llama" else gpt2_config()
    eager, ours, eager64 = models(config)
    x = ids(2, 13)
    with torch.no_grad():
        out = ours(x).logits
        assert calls == [("plain", 13, 13, True)] * 2  # both layers, fast path, causal
        check_logits(out, eager(x).logits, eager64(x).logits)


def sdpa64(eager):
    """The float64 truth for padded inputs: transformers' SDPA attention in float64. Eager float64
    cannot be: its additive mask is finfo(float64).min, a fully padded row overflows to -inf and
    gives NaN, and the NaN reaches real tokens through P @ V (0 * NaN) in the next layer."""
    model = copy.deepcopy(eager).double()
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    return model


def test_padding_goes_through_the_mask_path(calls):
    """Left padding: transformers' mask reaches the attn_mask path (the reference); the logits of
    real tokens match (padded rows are garbage in eager, zeros in ours and SDPA)."""
    eager, ours, _ = models(llama_config())
    eager64 = sdpa64(eager)
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    x[1, :4] = 0
    with torch.no_grad():
        out = ours(x, attention_mask=mask).logits
        assert calls == [("mask", 9, 9, False)] * 2
        real = mask.bool()
        check_logits(out, eager(x, attention_mask=mask).logits, eager64(x, attention_mask=mask).logits, real)


def test_cache_continuation_is_bottom_right(calls):
    """Several new tokens after a cached prompt (chunked prefill, assisted decoding): the queries
    are the last Mq of the Mkv keys, no mask is built, and the kernels' bottom-right causal runs."""
    eager, ours, eager64 = models(llama_config())
    prompt, more = ids(2, 7), ids(2, 4, seed=2)
    results = []
    # transformers 5.24 renamed forward's past_key_values to cache (the old name warns)
    name = "cache" if "cache" in inspect.signature(ours.forward).parameters else "past_key_values"
    with torch.no_grad():
        for model in (ours, eager, eager64):
            past = model(prompt, use_cache=True).past_key_values
            results.append(model(more, use_cache=True, **{name: past}).logits)
    assert results[0].shape == (2, 4, VOCAB)
    if TRANSFORMERS_5:
        assert calls == [("plain", 7, 7, True)] * 2 + [("plain", 4, 11, True)] * 2
    else:  # 4.x hands the mask builder positions, not an offset: the mask path, still correct
        assert calls == [("plain", 7, 7, True)] * 2 + [("mask", 4, 11, False)] * 2
    check_logits(*results)


def generate_and_check(eager, ours, eager64, x, **kw):
    """Greedy ``generate()``: the same tokens as eager, and each step's logits within STYLE.md's
    rule against float64 (tokens alone could hide a wrong mask in a tiny random model)."""
    kw = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kw)
    with torch.no_grad():
        expected = eager.generate(x, **kw)
        got = ours.generate(x, **kw)
        truth = eager64.generate(x, **kw)
    M = x.shape[1]
    assert got.sequences.shape == (x.shape[0], M + kw["max_new_tokens"])
    assert torch.equal(got.sequences, expected.sequences), \
        f"tokens differ:\n{got.sequences[:, M:]}\n{expected.sequences[:, M:]}"
    assert torch.equal(truth.sequences, expected.sequences)  # else the logits below are of other prefixes
    for step, (a, b, c) in enumerate(zip(got.logits, expected.logits, truth.logits)):
        check_logits(a, b, c)
    return got.sequences


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_matches_eager(family, calls):
    config = llama_config() if family == "llama" else gpt2_config()
    eager, ours, eager64 = models(config)
    x = ids(2, 6)
    generate_and_check(eager, ours, eager64, x, max_new_tokens=10, attention_mask=torch.ones_like(x))
    # prefill then one token at a time against the cache, all on the fast path
    assert calls[:2] == [("plain", 6, 6, True)] * 2
    assert calls[2:] == [("plain", 1, 6 + i, None) for i in range(1, 10) for _ in range(2)]


def test_greedy_generate_left_padded_batch(calls):
    eager, ours, _ = models(llama_config())
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    x[0, :3] = 0
    generate_and_check(eager, ours, sdpa64(eager), x, max_new_tokens=10, attention_mask=mask)
    assert len(calls) == 20 and all(c[0] == "mask" for c in calls)


def test_static_cache_generate(calls):
    """A static cache holds unwritten slots past the queries: transformers' SDPA path relies on
    top-left ``is_causal`` there; our mask builder must hand us the full mask instead (our None
    means bottom-right), or the prefill would attend to the empty slots."""
    eager, ours, eager64 = models(llama_config())
    x = ids(1, 5)
    generate_and_check(eager, ours, eager64, x, max_new_tokens=6, attention_mask=torch.ones_like(x),
                       cache_implementation="static")
    assert calls and all(c[0] == "mask" for c in calls)
    assert calls[0][2] > calls[0][1]  # prefill: Mkv (the cache's size) > Mq


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x's mask builders take cache_position, not q_offset")
def test_mask_builder_returns_none_only_for_bottom_right():
    from transformers.masking_utils import sdpa_mask

    def build(**kw):
        return hf.attention_mask(batch_size=2, q_length=kw.pop("q", 3), kv_length=kw.pop("kv", 3), **kw)

    assert build() is None  # no cache, no padding
    assert build(q=1, kv=6, q_offset=5) is None  # decode step
    assert build(q=3, kv=8, q_offset=5) is None  # chunk at the end of the cache
    pad = torch.ones(2, 8, dtype=torch.bool)
    assert build(q=3, kv=8, q_offset=5, attention_mask=pad) is None
    pad[1, 0] = False
    padded = build(q=3, kv=8, q_offset=5, attention_mask=pad)
    assert padded is not None and torch.equal(padded, sdpa_mask(batch_size=2, q_length=3, kv_length=8, q_offset=5,
                                                                 attention_mask=pad, allow_is_causal_skip=False))
    # static cache at prefill: queries at the start of 8 slots; SDPA would skip (top-left), we may not
    assert sdpa_mask(batch_size=2, q_length=3, kv_length=8, q_offset=0) is None
    static = build(q=3, kv=8, q_offset=0)
    assert static is not None and static.shape == (2, 1, 3, 8)
    assert not static[0, 0, 0, 1:].any() and static[0, 0, 2, :3].all() and not static[0, 0, 2, 3:].any()
    assert build(q=3, kv=8, q_offset=torch.tensor(5)) is not None  # device-side offsets: a static cache
    assert build(q=3, kv=8, q_offset=5, local_size=4) is not None  # a window that bites


def test_training_gradients_match_eager(calls):
    eager, ours, eager64 = models(llama_config())
    for m in (eager, ours, eager64):
        m.train()  # attention_dropout is 0: training changes nothing but the dropout argument
    x = ids(2, 10)
    grads = []
    for model in (ours, eager, eager64):
        model.zero_grad()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls == [("plain", 10, 10, True)] * 2
    mag = max(g.abs().max().item() for g in grads[2].values())
    for name in grads[2]:
        if "self_attn" in name:
            check_close(f"grad {name}", grads[0][name], grads[2][name], grads[1][name], mag)


def test_dropout_only_while_training(calls):
    _, ours, _ = models(llama_config(attention_dropout=0.5))
    x = ids(1, 8)
    with torch.no_grad():
        ours.eval()
        clean = ours(x).logits
        ours.train()
        torch.manual_seed(3)
        dropped = ours(x).logits
        torch.manual_seed(3)
        again = ours(x).logits
    assert torch.equal(dropped, again), "dropout is not repeatable under torch.manual_seed"
    assert not torch.allclose(dropped, clean), "attention_dropout=0.5 in training changed nothing"


def gemma2_config(**kw):
    # initializer_range 0.5: scores of several units, so a softcap of 2 and the window both bite
    return transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=64, initializer_range=0.5, final_logit_softcapping=None,
                                     layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                                     eos_token_id=1, bos_token_id=2, **kw)


def test_softcap_and_sliding_window_match_eager(calls):
    """Gemma 2: soft-capped scores on both layers, a sliding window of 4 over 10 tokens on the
    first (transformers' mask states it: the attn_mask path), full causal on the second."""
    eager, ours, eager64 = models(gemma2_config(sliding_window=4, attn_logit_softcapping=2.0))
    x = ids(2, 10)
    with torch.no_grad():
        out = ours(x).logits
        check_logits(out, eager(x).logits, eager64(x).logits)
    assert calls == [("mask", 10, 10, False), ("plain", 10, 10, True)]
    # both features must change the answer at this size, or the test would not test them
    for changed in ({"sliding_window": 4, "attn_logit_softcapping": None},
                    {"sliding_window": 64, "attn_logit_softcapping": 2.0}):
        _, other, _ = models(gemma2_config(**changed))
        with torch.no_grad():
            assert (other(x).logits - out).abs().max() > 1e-3, changed


def test_unsupported_arguments_raise():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="position_bias"):
        hf.attention_forward(module, q, q, q, None, position_bias=torch.zeros(1, 2, 3, 3))
    with pytest.raises(NotImplementedError, match="s_aux"):
        hf.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))


def test_attention_forward_shapes_and_gqa():
    """The function alone: (B, H, Mq, D) in, (B, Mq, H, D) out, GQA without repeat_kv, against
    PyTorch SDPA on the same call (bottom-right causal for a decode step is all keys)."""
    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), \
        torch.randn(2, 2, 7, 16, generator=g)
    out, weights = hf.attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 3, 4, 16)
    keep = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)  # bottom-right: queries are the last 3 positions
    truth = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep,
                                                             scale=0.3, enable_gqa=True)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3, enable_gqa=True)
    check_close("out", out, truth.transpose(1, 2), low.transpose(1, 2))
