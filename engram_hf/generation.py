"""Generation settings for the commands' pipelines."""

from __future__ import annotations

import copy

from transformers import GenerationConfig


def generation_config(model, **updates) -> GenerationConfig:
    """`model.generation_config` with `updates`, to pass to a pipeline as its only generation argument.

    A pipeline given keyword arguments also passes its own generation config, a pair that transformers 5.16-5.23
    deprecate with a warning; one config is accepted quietly by every release.
    """
    config = copy.deepcopy(model.generation_config)
    config.update(**updates)
    return config
