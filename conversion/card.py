"""The model card of a converted folder."""

from __future__ import annotations

from pathlib import Path

import torch

from .source import BaseSource, base_license

# installed as package data of `engram_hf.hub_cards`: `hub_cards/` beside `conversion/` in a checkout and in a wheel
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "hub_cards" / "model_card.md"


def render_card(result, source: BaseSource, config, base_model: str | None, dtype: torch.dtype, command: str) -> str:
    """The model card of a converted folder (`hub_cards/model_card.md` filled in), with Hub metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=base_license(source),
        tags=["engram", "conditional-memory", "custom_code", result.family, "text-generation"],
    )
    kwargs = dict(
        model_name=result.output_dir.name,
        base_label=base_model or source.label,
        family=result.family,
        model_type=config.model_type,
        layer_ids=result.layer_ids,
        num_layers=config.num_hidden_layers,
        max_ngram_size=config.engram_max_ngram_size,
        n_head_per_ngram=config.engram_n_head_per_ngram,
        n_embed_per_ngram=config.engram_n_embed_per_ngram,
        head_dim=config.engram_n_embed_per_ngram // config.engram_n_head_per_ngram,
        engram_vocab_size=result.engram_vocab_size,
        table_rows=result.table_rows,
        use_short_conv=config.engram_use_short_conv,
        kernel_size=config.engram_kernel_size,
        seed=config.engram_seed,
        vocab_size=result.vocab_size,
        compressed_vocab_size=result.compressed_vocab_size,
        reduction=f"{result.reduction:.1%}",
        base_parameters=f"{result.base_parameters:,}",
        engram_parameters=f"{result.engram_parameters:,}",
        table_parameters=f"{result.table_parameters:,}",
        total_parameters=f"{result.base_parameters + result.engram_parameters:,}",
        dtype=str(dtype).replace("torch.", ""),
        command=command,
    )
    return str(ModelCard.from_template(data, template_path=str(CARD_TEMPLATE), **kwargs))
