"""Every contact of Engram with transformers internals, in one place.

The remote code runs inside whatever transformers the user has, for as long as a checkpoint lives on the Hub. Anything
private, underscore-named or renamed between releases is reached only through this module; each item says what it
relies on and the versions it was checked in. The model mixins and `EngramTrainer` call only this module.

Checked: transformers 5.16.0 (the lowest supported), 5.23.0 and 5.24.0 (the newest tested), by the test suite.
"""

from __future__ import annotations

import inspect
import re

import torch
import transformers
from torch import nn
from transformers.utils import logging

MIN_TRANSFORMERS = "5.16.0"  # first release with `_no_placement_params` and `WeightConverter(force_cpu=...)`
NEWEST_TESTED = "5.24.0"
TESTED_RANGE = f"{MIN_TRANSFORMERS} to {NEWEST_TESTED}"

logger = logging.get_logger("engram_hf.integration")  # one name for every copy of this file: warnings show once


def _release(version: str) -> tuple[int, ...]:
    """`"5.24.0.dev0"` -> `(5, 24, 0)`."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Raise on a transformers older than the supported range; warn once on one newer than the newest tested."""
    if _release(version) < _release(MIN_TRANSFORMERS):
        raise ImportError(
            f"Engram models need transformers>={MIN_TRANSFORMERS},<6 (tested: {TESTED_RANGE}); this is "
            f"transformers {version}. Upgrade with `pip install -U 'transformers>={MIN_TRANSFORMERS},<6'`."
        )
    if _release(version) > _release(NEWEST_TESTED):
        logger.warning_once(
            f"transformers {version} is newer than the newest release Engram models were tested with "
            f"({TESTED_RANGE}). Loading checks the cache interface; please report any difference in outputs."
        )


check_transformers_version()  # before the imports below, which older releases lack

from transformers import CompileConfig, GenerationMixin  # noqa: E402
from transformers.cache_utils import (  # noqa: E402
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionAndStaticFullAttentionLayer,
    LinearAttentionAndStaticSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    StaticLayer,
    StaticSlidingWindowLayer,
)
from transformers.conversion_mapping import (  # noqa: E402
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming  # noqa: E402
from transformers.integrations.accelerate import _get_device_map  # noqa: E402

from .mmap_engram import map_rows  # noqa: E402


# --- the cache argument ------------------------------------------------------------------------------------------
# transformers 5.24 renamed the cache argument of every model, decoder layer and `prepare_inputs_for_generation` from
# `past_key_values` to `cache` (the old name is deprecated until 5.40), and the `cache` field of model and generate
# outputs likewise. Checked: `past_key_values` in 5.16.0-5.23.0, `cache` in 5.24.0.
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else (
    "past_key_values"
)
_CACHE_NAMES = ("cache", "past_key_values")


def pop_cache(kwargs: dict) -> Cache | None:
    """Remove the cache from `kwargs` under either name and return it (`None` if absent)."""
    found = [kwargs.pop(name) for name in _CACHE_NAMES if name in kwargs]
    found = [cache for cache in found if cache is not None]
    if len(found) > 1 and found[0] is not found[1]:
        raise ValueError("Two different caches were passed, as `cache` and as `past_key_values`; pass one.")
    return found[0] if found else None


def output_cache(output) -> Cache | None:
    """The cache of a model or `generate` output, under this transformers' field name."""
    return getattr(output, CACHE_KWARG, None)


def check_cache_argument(*functions) -> None:
    """Raise unless every function takes the cache as a named `CACHE_KWARG` parameter.

    Run for the family's base model and decoder layer when an Engram model is built: if a release renames the cache
    argument again, the Engram state would silently miss the cache (wrong generations) instead of failing.
    """
    for function in functions:
        if CACHE_KWARG not in inspect.signature(function).parameters:
            raise RuntimeError(
                f"{function.__qualname__} in transformers {transformers.__version__} does not take the cache as "
                f"`{CACHE_KWARG}`, which Engram models pass it as (tested: {TESTED_RANGE}). Cached generation would "
                f"be wrong, so loading stops here; install a tested transformers version."
            )


# --- cache layers that hold the Engram states --------------------------------------------------------------------
# The Engram id history and ShortConv inputs live in the conv states of the linear-attention cache layers
# (`LinearAttentionAnd*AttentionLayer`, `Cache.update_conv_state(..., conv_kernel_size=)`), swapped in for the
# attention-only dynamic layers; relies on `Cache.layers`, `layer_class_to_replicate`, `is_initialized`, `record_past`
# and the layers' `conv_states` / `has_previous_state`.
# Checked: 5.16.0-5.24.0.


def _engram_cache_layer(layer, number_of_states: int):
    """A cache layer that also holds `number_of_states` Engram states, replacing a still-empty attention-only one.

    Dynamic and static (fixed-size, compilable) layers, full or sliding-window, get their linear-attention twin; a
    static sliding layer keeps its effective length and (5.24+) whether it can be cropped.
    """
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        return layer
    if getattr(layer, "is_initialized", False):
        raise ValueError("This cache was filled by a model without Engram; start generation with a fresh cache.")
    states = {"number_of_states": number_of_states}
    if type(layer) is StaticSlidingWindowLayer:
        # the layer keeps only its effective length, min(max_cache_len, sliding_window): the twin gets it for both
        new = LinearAttentionAndStaticSlidingWindowAttentionLayer(layer.max_cache_len, layer.max_cache_len, **states)
        if hasattr(layer, "_is_croppable"):
            new._is_croppable = layer._is_croppable
    elif type(layer) is StaticLayer:
        new = LinearAttentionAndStaticFullAttentionLayer(layer.max_cache_len, **states)
    elif type(layer) is DynamicSlidingWindowLayer:
        new = LinearAttentionAndSlidingWindowAttentionLayer(layer.sliding_window, **states)
    elif type(layer) is DynamicLayer:
        new = LinearAttentionAndFullAttentionLayer(**states)
    else:
        raise NotImplementedError(
            f"Engram models support dynamic and static caches, not a {type(layer).__name__} layer."
        )
    if getattr(layer, "record_past", False):
        new.activate_past_recording()
    return new


def add_state_layers(cache: Cache, states: dict[int, int]) -> None:
    """Give decoder layer `i` of `cache` a layer that can hold `states[i]` Engram states (none where it is 0)."""
    layers = cache.layers
    if cache.layer_class_to_replicate is not None:
        while len(layers) <= max(states):
            layers.append(cache.layer_class_to_replicate())
    for layer_idx, number_of_states in states.items():
        if number_of_states:
            layers[layer_idx] = _engram_cache_layer(layers[layer_idx], number_of_states)


def get_conv_state(cache: Cache, layer_idx: int, state_idx: int) -> torch.Tensor | None:
    """`Cache.get_conv_state` (public from 5.21) for every supported version: `None` before the first update."""
    layer = cache.layers[layer_idx]
    return layer.conv_states[state_idx] if layer.has_previous_state[state_idx] else None


def is_recording_past(cache: Cache) -> bool:
    """Whether assisted decoding asked `cache` to record its past states (for `crop`)."""
    return any(getattr(layer, "record_past", False) for layer in cache.layers)


# --- compiled generation -------------------------------------------------------------------------------------------
# `generate` compiles its decode step only on accelerators unless `CompileConfig._compile_all_devices` is set (meant
# for testing). Checked: 5.16.0-5.24.0.


def compile_config(**kwargs) -> CompileConfig:
    """A `CompileConfig(**kwargs)` that `generate` honours on every device, the CPU included."""
    config = CompileConfig(**kwargs)
    config._compile_all_devices = True
    return config


# --- device maps -------------------------------------------------------------------------------------------------
# `_get_device_map` (integrations.accelerate) plans "auto"/"balanced"/... and reads `_no_split_modules`.
# Checked: 5.16.0-5.24.0.


def transformers_device_map(
    model: nn.Module, strategy: str, max_memory: dict | None, hf_quantizer, whole: set[str]
) -> dict:
    """transformers' plan for `device_map=strategy`, never splitting the modules named in `whole` (class names)."""
    model._no_split_modules = {*(model._no_split_modules or ()), *whole}
    return dict(_get_device_map(model, strategy, max_memory, hf_quantizer))


# --- loading tables stored as row slices -------------------------------------------------------------------------
# A checkpoint conversion mapping (`register_checkpoint_conversion_mapping`) with a `WeightConverter` whose
# `ConversionOps` concatenates `...engram.table.weight.part.<i>` into `...engram.table.weight`; `from_pretrained`
# applies it, for remote code too. Relies on `ConversionOps.convert(input_dict, source_patterns, target_patterns)`,
# `WeightConverter(force_cpu=)` and `_original_target_patterns`. Checked: 5.16.0-5.24.0.
TABLE_PART_PATTERN = r"engram\.table\.weight\.part\.\d+$"
TABLE_KEY = "engram.table.weight"


class ConcatenateRows(ConversionOps):
    """Row slices -> one tensor: one memory map over the slices' files where they are laid out for it (`map_rows`),
    else copied slice by slice into a buffer whose pages are committed as they are filled.

    Each slice is dropped once copied, so a table converted at load (to another dtype, say) is never held twice.
    """

    @torch.no_grad()
    def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str], **kwargs) -> dict:
        parts = [part for pattern in source_patterns for part in input_dict.pop(pattern, [])]
        table = map_rows(parts)
        if table is not None:
            return {target_patterns[0]: table}
        parts.reverse()
        table = parts[-1].new_empty((sum(len(part) for part in parts), *parts[-1].shape[1:]))
        start = 0
        while parts:
            part = parts.pop()
            table[start : start + len(part)].copy_(part)
            start += len(part)
        return {target_patterns[0]: table}


class EngramTablePartsConverter(WeightConverter):
    """Loads a table stored as row slices `...engram.table.weight.part.<i>` as the whole `...engram.table.weight`.

    Reassembled on the CPU (tables stay in host memory), as a memory map where the layout allows; saving writes the
    whole table (the reverse is the identity), split again by `EngramPreTrainedMixin.save_pretrained`.
    """

    __slots__ = ()

    def __init__(
        self,
        source_patterns: str | list[str] = TABLE_PART_PATTERN,
        target_patterns: str | list[str] = TABLE_KEY,
        operations: list[ConversionOps] | None = None,
        force_cpu: bool = True,
    ):
        super().__init__(source_patterns, target_patterns, operations or [ConcatenateRows()], force_cpu=force_cpu)

    def reverse_transform(self) -> WeightRenaming:
        return WeightRenaming(self._original_target_patterns, self._original_target_patterns)


def register_table_parts_conversion(model_type: str) -> None:
    """Register `EngramTablePartsConverter` for `model_type` (idempotent: this file may be imported more than once)."""
    others = [
        transform
        for transform in get_checkpoint_conversion_mapping(model_type) or []
        if type(transform).__name__ != EngramTablePartsConverter.__name__
    ]
    register_checkpoint_conversion_mapping(model_type, [*others, EngramTablePartsConverter()], overwrite=True)


# --- private hooks of PreTrainedModel / GenerationMixin ----------------------------------------------------------


class PreTrainedHooks:
    """Overrides of private `PreTrainedModel` / `GenerationMixin` hooks, forwarded to the model's public methods.

    - `_load_pretrained_model(model, state_dict, checkpoint_files, load_config, ...)` (static): called by
      `from_pretrained` after the device map is final and before weights are placed; `load_config.device_map` is the
      dict that accelerate dispatches with afterwards. Forwards to `model.engram_adjust_device_map(device_map,
      hf_quantizer)`, which edits it in place.
    - `_prepare_cache_for_generation(generation_config, model_kwargs, ...)`: `generate` builds its cache here, under
      `model_kwargs[CACHE_KWARG]`, before assisted decoding marks it for past recording. Forwards to
      `self.engram_prepare_generation_cache(cache, recording)`.
    - `_get_static_cache_init_shape()`: `(num_heads, head_dim)` for `generate` to allocate a static cache before a
      chunked prefill; `None` leaves the layers to initialise at their first update, which lets the Engram state
      layers be swapped in first (the cost: a possible recompilation on the next call, as transformers notes).
    - `_no_placement_params`: parameter names that accelerate's dispatch leaves out of the device map check, so a map
      without the tables is accepted (they stay in host memory, design §6).
    Checked: 5.16.0-5.24.0.
    """

    _no_placement_params = [TABLE_KEY]

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        if load_config.device_map is not None:
            model.engram_adjust_device_map(load_config.device_map, load_config.hf_quantizer)
        return super(PreTrainedHooks, type(model))._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, *args, **kwargs
        )

    def _get_static_cache_init_shape(self, *args, **kwargs) -> None:
        return None

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_KWARG)
        if isinstance(cache, Cache):
            recording = getattr(generation_config, "is_assistant", False) or is_recording_past(cache)
            self.engram_prepare_generation_cache(cache, recording)
        return result


# --- private hooks of Trainer ------------------------------------------------------------------------------------
# `Trainer._clip_grad_norm(model)` and `_get_grad_norm(model, grad_norm=None)` (the training step's clipping and the
# logged norm), `_save(output_dir, state_dict)` (every checkpoint and `save_model`) and
# `_load_from_checkpoint(resume_from_checkpoint, model)`. Checked: 5.16.0-5.24.0.
TRAINER_HOOKS = {
    "_clip_grad_norm": ("model",),
    "_get_grad_norm": ("model", "grad_norm"),
    "_save": ("output_dir", "state_dict"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
}


class TrainerHooks:
    """Overrides of private `Trainer` hooks, forwarded to the trainer's public `engram_*` methods."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, parameters in TRAINER_HOOKS.items():
            hook = getattr(super(TrainerHooks, cls), name, None)
            if hook is None or list(inspect.signature(hook).parameters)[1:] != list(parameters):
                raise RuntimeError(
                    f"transformers {transformers.__version__}'s Trainer has no `{name}{parameters}` hook, which "
                    f"EngramTrainer relies on (tested: {TESTED_RANGE})."
                )

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        return self.engram_clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: torch.Tensor | None = None) -> float:
        return self.engram_grad_norm(model, grad_norm)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        self.engram_after_save(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.engram_after_load(resume_from_checkpoint, self.model if model is None else model)

