"""Cached generation of Engram models equals a full uncached forward (design §5), for every family and decoding mode.

Tiny random models on the real SmolLM2 / Qwen2.5 tokenizers and compression maps, ShortConv on, every Engram weight
non-zero. Each generated step's logits are compared with `model(full_sequence, use_cache=False)`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, set_seed

from engram_hf.modeling.integration_engram import CACHE_KWARG, output_cache
from tiny_models import FAMILIES, PROMPTS, encode, tiny_config, tiny_model

ATOL = 1e-4
NEW_TOKENS = 8


@functools.cache
def model_for(family: str, seed: int = 0):
    return tiny_model(family, seed=seed)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def full_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(sequences, attention_mask=attention_mask, use_cache=False).logits


def assert_steps_match_full(model, out, prompt_len: int, attention_mask: torch.Tensor | None = None) -> None:
    """Every generated step's logits equal the uncached full forward over the final sequences."""
    seqs = out.sequences
    assert len(out.logits) == seqs.shape[1] - prompt_len
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(seqs.shape[0], len(out.logits))], dim=1)
    full = full_logits(model, seqs, attention_mask)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, prompt_len - 1 + step], atol=ATOL, rtol=0, msg=f"step {step}")


def generate(model, input_ids, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(
            input_ids, return_dict_in_generate=True, output_logits=True, output_scores=True, **kwargs
        )


def left_padded_batch(family: str, pad_id: int = 17, texts=PROMPTS[:2]):
    """Left-padded batch of `texts`; the fill id is an ordinary token (not the Engram pad id): masked positions must be
    hashed as the compressed pad id whatever they hold."""
    rows = [encode(family, t)[0] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    assert len({len(r) for r in rows}) > 1, "prompts must differ in length"
    return rows, ids, mask


# --- forward-level checks ---------------------------------------------------------------------------------------


def test_engram_is_active(family):
    """The tiny models' Engram layers change the logits (so the tests below can fail)."""
    model = model_for(family)
    ids = encode(family, PROMPTS[0])
    plain = tiny_model(family)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if "value_proj" in name:
                param.zero_()
    assert (full_logits(model, ids) - full_logits(plain, ids)).abs().max() > 0.1


@pytest.mark.parametrize("chunks", [(4, 1, 3, 2, 1, 5), (1,) * 16, (2, 7, 7)])
def test_incremental_chunks_equal_full_forward(family, chunks):
    model = model_for(family)
    ids = torch.cat([encode(family, PROMPTS[0]), encode(family, PROMPTS[2])], dim=1)[:, : sum(chunks)]
    assert ids.shape[1] == sum(chunks)
    full = full_logits(model, ids)
    cache, start, parts = None, 0, []
    with torch.no_grad():
        for size in chunks:
            out = model(ids[:, start : start + size], **{CACHE_KWARG: cache}, use_cache=True)
            cache, start = output_cache(out), start + size
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)


def test_incremental_chunks_left_padded(family):
    """Chunked cached forwards of a left-padded batch equal each row's unpadded full forward."""
    model = model_for(family)
    rows, ids, mask = left_padded_batch(family)
    width = ids.shape[1]
    cache, start, parts = None, 0, []
    with torch.no_grad():
        for size in (3, 1, width):
            end = min(start + size, width)
            if end == start:
                break
            out = model(ids[:, start:end], attention_mask=mask[:, :end], **{CACHE_KWARG: cache}, use_cache=True)
            cache, start = output_cache(out), end
            parts.append(out.logits)
    logits = torch.cat(parts, dim=1)
    for i, row in enumerate(rows):
        alone = full_logits(model, row[None])
        torch.testing.assert_close(logits[i, width - len(row) :], alone[0], atol=ATOL, rtol=0, msg=f"row {i}")


def test_left_padded_full_forward_matches_unpadded(family):
    model = model_for(family)
    rows, ids, mask = left_padded_batch(family)
    padded = full_logits(model, ids, mask)
    for i, row in enumerate(rows):
        alone = full_logits(model, row[None])
        torch.testing.assert_close(padded[i, ids.shape[1] - len(row) :], alone[0], atol=ATOL, rtol=0)


# --- generation modes ---------------------------------------------------------------------------------------------


def test_greedy(family):
    model = model_for(family)
    ids = encode(family, PROMPTS[0])
    cached = generate(model, ids)
    uncached = generate(model, ids, use_cache=False)
    assert cached.sequences.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_steps_match_full(model, cached, ids.shape[1])
    full = full_logits(model, cached.sequences)
    greedy = full[0, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(cached.sequences[0, ids.shape[1] :], greedy)


def test_sampling_fixed_seed(family):
    model = model_for(family)
    ids = encode(family, PROMPTS[2])
    kwargs = dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, num_return_sequences=2)
    set_seed(1234)
    cached = generate(model, ids, **kwargs)
    set_seed(1234)
    uncached = generate(model, ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert_steps_match_full(model, cached, ids.shape[1])


def test_beam_search(family):
    model = model_for(family)
    ids = encode(family, PROMPTS[1])
    kwargs = dict(num_beams=3, num_return_sequences=3, length_penalty=0.0, early_stopping=True)
    cached = generate(model, ids, **kwargs)
    uncached = generate(model, ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=ATOL, rtol=0)
    # with length_penalty 0 a beam's score is the sum of its tokens' log-probabilities under the full forward
    prompt_len = ids.shape[1]
    logprobs = full_logits(model, cached.sequences).log_softmax(-1)
    new = cached.sequences[:, prompt_len:]
    picked = logprobs[:, prompt_len - 1 : -1].gather(-1, new[..., None])[..., 0]
    torch.testing.assert_close(picked.sum(-1), cached.sequences_scores, atol=ATOL, rtol=0)
    # beams must be different sequences (so the cache really gets reordered)
    assert len({tuple(s.tolist()) for s in cached.sequences}) == 3


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_prefill(family, chunk):
    model = model_for(family)
    ids = encode(family, PROMPTS[0])
    plain = generate(model, ids)
    chunked = generate(model, ids, prefill_chunk_size=chunk)
    assert torch.equal(chunked.sequences, plain.sequences)
    assert_steps_match_full(model, chunked, ids.shape[1])


def test_chunked_prefill_left_padded(family):
    model = model_for(family)
    rows, ids, mask = left_padded_batch(family)
    plain = generate(model, ids, attention_mask=mask)
    chunked = generate(model, ids, attention_mask=mask, prefill_chunk_size=3)
    assert torch.equal(chunked.sequences, plain.sequences)
    assert_steps_match_full(model, chunked, ids.shape[1], mask)


def test_left_padded_batch(family):
    model = model_for(family)
    rows, ids, mask = left_padded_batch(family)
    batch = generate(model, ids, attention_mask=mask)
    assert_steps_match_full(model, batch, ids.shape[1], mask)
    width = ids.shape[1]
    for i, row in enumerate(rows):
        alone = generate(model, row[None])
        assert torch.equal(batch.sequences[i, width:], alone.sequences[0, len(row) :]), f"row {i}"
        for step, (b, a) in enumerate(zip(batch.logits, alone.logits)):
            torch.testing.assert_close(b[i], a[0], atol=ATOL, rtol=0, msg=f"row {i} step {step}")


def test_left_padded_beam_search(family):
    model = model_for(family)
    rows, ids, mask = left_padded_batch(family)
    kwargs = dict(num_beams=3, length_penalty=0.0, max_new_tokens=5)
    batch = generate(model, ids, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], **kwargs)
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(row) :]), f"row {i}"
        torch.testing.assert_close(batch.sequences_scores[i], alone.sequences_scores[0], atol=ATOL, rtol=0)


def _plain_assistant(family: str):
    """A plain (non-Engram) tiny model with the same vocabulary."""
    config = tiny_config(family)
    torch.manual_seed(7)
    if family == "llama":
        base = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.to_dict().items() if not k.startswith("engram")}))
    else:
        keep = {k: getattr(config, k) for k in ("vocab_size", "pad_token_id", "eos_token_id", "bos_token_id")}
        base = Qwen2ForCausalLM(
            Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, initializer_range=0.1, **keep)
        )
    return base.eval()


@pytest.mark.parametrize("assistant", ["same_weights", "other_engram", "plain", "prompt_lookup"])
def test_assisted_decoding(family, assistant):
    model = model_for(family)
    # a repetitive prompt, so prompt lookup finds candidates
    ids = encode(family, "one two three one two three one two three one two")
    plain = generate(model, ids, max_new_tokens=10)
    if assistant == "prompt_lookup":
        kwargs = dict(prompt_lookup_num_tokens=3)
    else:
        helper = {
            "same_weights": lambda: tiny_model(family, seed=0),  # every candidate accepted
            "other_engram": lambda: model_for(family, seed=1),  # candidates mostly rejected: cache cropping
            "plain": lambda: _plain_assistant(family),
        }[assistant]()
        kwargs = dict(assistant_model=helper)
    assisted = generate(model, ids, max_new_tokens=10, **kwargs)
    assert torch.equal(assisted.sequences, plain.sequences)
    assert_steps_match_full(model, assisted, ids.shape[1])


def test_generate_continues_from_returned_cache(family):
    """A second generate() call on the returned cache and sequences continues exactly."""
    model = model_for(family)
    ids = encode(family, PROMPTS[0])
    first = generate(model, ids, max_new_tokens=4)
    with torch.no_grad():
        second = model.generate(
            first.sequences, **{CACHE_KWARG: output_cache(first)}, max_new_tokens=4, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )
    whole = generate(model, ids, max_new_tokens=8)
    assert torch.equal(second.sequences, whole.sequences)
    assert_steps_match_full(model, second, first.sequences.shape[1])


# --- training, attention implementations, dtypes -------------------------------------------------------------------


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_gradients(family):
    model = tiny_model(family).train()
    ids = torch.cat([encode(family, PROMPTS[0]), encode(family, PROMPTS[1])], dim=1)
    loss, grads = _grads(model, ids)
    engram = [n for n in grads if ".engram." in n]
    for part in ("table", "value_proj", "key_proj", "short_conv.conv", "norm_query"):
        assert any(part in n and grads[n].abs().sum() > 0 for n in engram), f"no gradient reaches Engram {part}"
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = _grads(model, ids)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_non_reentrant(family):
    model = tiny_model(family).train()
    ids = encode(family, PROMPTS[0])
    _, grads = _grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, grads_ckpt = _grads(model, ids)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_eager_and_sdpa_equal(family):
    model = model_for(family)
    rows, ids, mask = left_padded_batch(family)
    logits, original = {}, model.config._attn_implementation
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        logits[impl] = full_logits(model, ids, mask)
        out = generate(model, ids, attention_mask=mask, max_new_tokens=4)
        logits[impl + "_gen"] = torch.stack(out.logits)
    model.set_attn_implementation(original)
    real = mask.bool()  # padded positions attend to nothing: their outputs are arbitrary
    torch.testing.assert_close(logits["eager"][real], logits["sdpa"][real], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits["eager_gen"], logits["sdpa_gen"], atol=ATOL, rtol=0)


def test_bfloat16_forward_and_generate(family):
    model = tiny_model(family, dtype=torch.bfloat16)
    hasher = model.get_engram_hasher()
    assert hasher.compression_map.dtype == torch.long and hasher.multipliers.dtype == torch.long
    assert model.model.layers[model.config.engram_layer_ids[0]].engram.table.weight.dtype == torch.bfloat16
    ids = encode(family, PROMPTS[0])
    logits = full_logits(model, ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    out = generate(model, ids, max_new_tokens=4)
    assert all(torch.isfinite(step).all() for step in out.logits)
    # the hash ids do not depend on the dtype: bf16 logits stay near the float32 ones
    ref = full_logits(model_for(family), ids)
    assert (logits.float() - ref).abs().max() < 0.5


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["too_large", "negative"])
def test_out_of_vocabulary_ids_raise(family, bad):
    model = model_for(family)
    ids = encode(family, PROMPTS[1]).clone()
    value = model.config.vocab_size + 5 if bad == "too_large" else -3
    ids[0, 1] = value
    with pytest.raises(ValueError, match=str(value)):
        with torch.no_grad():
            model(ids)
    with pytest.raises(ValueError, match=str(value)):
        model.generate(ids, max_new_tokens=2, do_sample=False)


def test_wrong_shape_engram_hash_ids_raise(family):
    model = model_for(family)
    ids = encode(family, PROMPTS[1])
    rows = model.model.engram_hash(ids, None, None)  # [B, T, L, (N-1)*K]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, engram_hash_ids=rows).logits, model(ids).logits, atol=0, rtol=0)
        for bad in (rows[:, :, :1], rows[..., :-1], rows[:, :-1], rows[0]):
            with pytest.raises(ValueError, match="engram_hash_ids must have shape"):
                model(ids, engram_hash_ids=bad)


def test_int32_ids_like_int64(family):
    model = model_for(family)
    ids = encode(family, PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()).logits, model(ids).logits, atol=0, rtol=0)
    assert torch.equal(generate(model, ids.int()).sequences, generate(model, ids).sequences)


def test_engram_layer_ids_beyond_depth_raise(family):
    with pytest.raises(ValueError, match="engram_layer_ids"):
        tiny_config(family, engram_layer_ids=[0, 3])
    with pytest.raises(ValueError, match="engram_layer_ids"):
        tiny_config(family, engram_layer_ids=[-1])
    with pytest.raises(ValueError, match="engram_layer_ids"):
        tiny_config(family, engram_layer_ids=[1, 1])


# --- fixed-size (static) caches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "left_padded", "beam_search", "chunked_prefill"])
def test_static_cache_equals_dynamic(family, mode):
    """`cache_implementation="static"` (the cache compiled decoding uses) gives the dynamic cache's tokens and logits."""
    model = model_for(family)
    rows, ids, mask = left_padded_batch(family)
    kwargs = dict(attention_mask=mask)
    if mode == "greedy":
        ids, kwargs = encode(family, PROMPTS[0]), {}
    elif mode == "beam_search":
        kwargs.update(num_beams=3, length_penalty=0.0, max_new_tokens=5)
    elif mode == "chunked_prefill":
        kwargs.update(prefill_chunk_size=3)
    dynamic = generate(model, ids, **kwargs)
    static = generate(model, ids, cache_implementation="static", **kwargs)
    assert type(output_cache(static)).__name__ == "StaticCache"
    assert torch.equal(static.sequences, dynamic.sequences)
    for step, (a, b) in enumerate(zip(static.scores, dynamic.scores)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"step {step}")
    if mode != "beam_search":
        assert_steps_match_full(model, static, ids.shape[1], kwargs.get("attention_mask"))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_base_model_takes_the_cache_under_either_name(family, name):
    """The Engram base model takes the cache under the old and the new name alike, on any supported transformers."""
    model = model_for(family).model
    ids = encode(family, PROMPTS[0])
    with torch.no_grad():
        full = model(ids, use_cache=False).last_hidden_state
        first = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], **{name: output_cache(first)}, use_cache=True)
    torch.testing.assert_close(torch.cat([first.last_hidden_state, rest.last_hidden_state], 1), full, atol=ATOL, rtol=0)
