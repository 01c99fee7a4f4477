"""The Engram layer (design §3) against an independent float64 recomputation; ShortConv receptive field; graft init."""

import numpy as np
import pytest
import torch

from engram_hf import EngramLlamaConfig, EngramLlamaForCausalLM
from engram_hf.modeling.layer_engram import EngramLayer


def _config(**overrides):
    values = dict(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        engram_layer_ids=[1], engram_n_embed_per_ngram=16, engram_n_head_per_ngram=4, engram_vocab_size=[53, 59],
        engram_hc_mult=2, engram_proj_bias=True, pad_token_id=0,
    )
    values.update(overrides)
    return EngramLlamaConfig(**values)


def _random_layer(config, dtype, seed=0):
    torch.manual_seed(seed)
    layer = EngramLayer(config, layer_idx=1, num_rows=97).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.7)
    return layer


def _rms(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def _reference(layer, hidden, rows, dilation):
    """Spec §3 in float64 NumPy from the layer's weights: hidden [B, T, M, d], rows [B, T, H] -> Y [B, T, M, d]."""
    P = lambda t: t.detach().double().numpy()  # noqa: E731
    eps = layer.norm_key[0].eps
    table = P(layer.table.weight)
    e = table[rows.numpy()].reshape(*rows.shape[:2], -1)  # [B, T, d_mem]
    d = hidden.shape[-1]
    v = e @ P(layer.value_proj.weight).T + P(layer.value_proj.bias)
    branches = []
    for m in range(layer.hc_mult):
        k = _rms(e @ P(layer.key_proj[m].weight).T + P(layer.key_proj[m].bias), P(layer.norm_key[m].weight), eps)
        q = _rms(P(hidden[:, :, m]), P(layer.norm_query[m].weight), eps)
        s = (k * q).sum(-1, keepdims=True) / np.sqrt(d)
        s = np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))
        branches.append(1.0 / (1.0 + np.exp(-s)) * v)
    V = np.stack(branches, 2)  # [B, T, M, d]
    if layer.short_conv is None:
        return V
    conv = layer.short_conv
    normed = np.concatenate([_rms(V[:, :, m], P(conv.norms[m].weight), eps) for m in range(layer.hc_mult)], -1)
    w = P(conv.conv.weight)[:, 0, :]  # [C, K]
    kernel = w.shape[1]
    y = np.zeros_like(normed)
    for t in range(normed.shape[1]):
        for k in range(kernel):
            src = t - (kernel - 1 - k) * dilation
            if src >= 0:
                y[:, t] += w[:, k] * normed[:, src]
    y = y / (1.0 + np.exp(-y))  # SiLU
    return V + y.reshape(V.shape)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("short_conv", [True, False])
def test_layer_matches_float64_reference(dtype, tol, short_conv):
    config = _config(engram_use_short_conv=short_conv)
    layer = _random_layer(config, dtype)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 17, 2, 32, generator=gen, dtype=torch.float64)
    rows = torch.randint(0, 97, (2, 17, 8), generator=gen)
    out = layer(hidden.to(dtype), layer.lookup(rows))
    expected = _reference(layer, hidden, rows, dilation=config.engram_max_ngram_size)
    rel = np.abs(out.detach().double().numpy() - expected).max() / np.abs(expected).max()
    assert rel <= tol


def test_short_conv_receptive_field():
    config = _config(engram_hc_mult=1)
    layer = _random_layer(config, torch.float64)
    n, T, t = config.engram_max_ngram_size, 24, 5
    hidden = torch.randn(1, T, 1, 32, dtype=torch.float64)
    memory = torch.randn(1, T, 32, dtype=torch.float64)
    base = layer(hidden, memory)
    perturbed = memory.clone()
    perturbed[:, t] += 1.0
    changed = (layer(hidden, perturbed) != base).any(-1).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == [t, t + n, t + 2 * n, t + 3 * n]


def test_padding_mask_zeroes_conv_input():
    config = _config(engram_hc_mult=1)
    layer = _random_layer(config, torch.float64)
    hidden, memory = torch.randn(1, 10, 1, 32, dtype=torch.float64), torch.randn(1, 10, 32, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    padded = layer(hidden, memory, mask)
    alone = layer(hidden[:, 3:], memory[:, 3:])
    assert torch.allclose(padded[:, 3:], alone, rtol=0, atol=1e-12)


def test_graft_init_outputs_exact_zero():
    config = _config(engram_hc_mult=1, engram_proj_bias=False)
    model = EngramLlamaForCausalLM(config)
    layer = model.model.layers[1].engram
    assert layer.value_proj.weight.abs().sum() == 0 and layer.short_conv.conv.weight.abs().sum() == 0
    assert layer.table.weight.std() > 0 and layer.key_proj[0].weight.std() > 0  # the rest is trainable, non-zero
    hidden = torch.randn(2, 9, 1, 32)
    out = layer(hidden, layer.lookup(torch.randint(0, 97, (2, 9, 8))))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("placement", ["host", "device", "auto"])
def test_table_placement_from_config(placement):
    """"auto" keeps a table in host memory above 2^27 parameters; a wrong value is rejected."""
    config = _config(engram_table_device=placement)
    dim = config.engram_n_embed_per_ngram // config.engram_n_head_per_ngram
    with torch.device("meta"):
        small = EngramLayer(config, layer_idx=1, num_rows=97)
        large = EngramLayer(config, layer_idx=1, num_rows=2**27 // dim + 1)
    assert small.table.keep_on_host == (placement == "host")
    assert large.table.keep_on_host == (placement in ("host", "auto"))
    with pytest.raises(ValueError, match="engram_table_device must be one of host, device, auto"):
        _config(engram_table_device="gpu")
