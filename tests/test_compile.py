"""Compiled generation (static cache + torch.compile, as transformers' `compile_config` does it) equals the eager
dynamic-cache generation, with no graph break in the decode step (`fullgraph=True`)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from engram_hf.modeling.integration_engram import compile_config
from test_generation import ATOL, assert_steps_match_full, generate, left_padded_batch, model_for
from tiny_models import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_generation_equals_dynamic(family):
    """Left-padded batch, ShortConv on, non-zero Engram weights; compiled on the CPU like on an accelerator."""
    model = model_for(family)
    _, ids, mask = left_padded_batch(family)
    eager = generate(model, ids, attention_mask=mask)
    torch._dynamo.reset()
    compiled = generate(
        model, ids, attention_mask=mask, cache_implementation="static",
        compile_config=compile_config(fullgraph=True, mode="default"),
    )
    assert counters["stats"]["unique_graphs"] > 0, "generate did not compile the decode step"
    assert torch.equal(compiled.sequences, eager.sequences)
    for step, (a, b) in enumerate(zip(compiled.logits, eager.logits)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"step {step}")
    assert_steps_match_full(model, compiled, ids.shape[1], mask)
