"""Family-independent Engram model machinery: decoder-layer wiring, hashing at forward entry, cache state, init, save."""

from __future__ import annotations

import shutil
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming
from transformers.integrations.accelerate import _get_device_map

from .configuration_engram import EngramLlamaConfig, EngramQwen2Config, EngramQwen3Config
from .hashing_engram import NgramHasher
from .layer_engram import CONV_STATE, EngramLayer, EngramTable


def _engram_cache_layer(layer, number_of_states: int):
    """A cache layer that also holds Engram states, replacing a still-empty attention-only layer."""
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        return layer
    if getattr(layer, "is_initialized", False):
        raise ValueError("This cache was filled by a model without Engram; start generation with a fresh cache.")
    if isinstance(layer, DynamicSlidingWindowLayer):
        new = LinearAttentionAndSlidingWindowAttentionLayer(layer.sliding_window, number_of_states=number_of_states)
    elif type(layer) is DynamicLayer:
        new = LinearAttentionAndFullAttentionLayer(number_of_states=number_of_states)
    else:
        raise NotImplementedError(f"Engram models support dynamic caches only, got a {type(layer).__name__} layer.")
    if getattr(layer, "record_past", False):
        new.activate_past_recording()
    return new


def keep_tables_on_host(model: nn.Module, device_map: dict) -> dict:
    """Rewrite `device_map` in place so that no entry covers an Engram table (`EngramTable` with `keep_on_host`).

    Every entry that is an ancestor of a table (`""`, `"model"`, `"model.layers.1"`, ...) is replaced by entries for
    its children on the same device, the table excepted. Tables then load on the CPU (the default of an unmapped
    weight), get no accelerate hook and do not appear in `hf_device_map`.
    """
    tables = [name for name, module in model.named_modules() if isinstance(module, EngramTable) and module.keep_on_host]
    for table in tables:
        parts = table.split(".")
        for depth in range(len(parts) + 1):  # top-down, so each expanded ancestor's child is expanded next
            name = ".".join(parts[:depth])
            if name not in device_map:
                continue
            device = device_map.pop(name)
            if name == table:
                continue
            module, prefix = model.get_submodule(name), f"{name}." if name else ""
            for child, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                device_map.setdefault(prefix + child, device)
            for child, _ in module.named_children():
                if prefix + child != table:
                    device_map.setdefault(prefix + child, device)
    return device_map


# `device_map` strategy and `max_memory` of the `from_pretrained` call in progress, planned again without the tables
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_device_map_request: ContextVar[tuple[str, dict | None] | None] = ContextVar("engram_device_map_request", default=None)


def plan_device_map(model: nn.Module, strategy: str, max_memory: dict | None = None, hf_quantizer=None) -> dict:
    """transformers' `device_map="auto"` (or `"balanced"`, ...) plan for `model`, with the tables left out.

    Engram tables stay in host memory (spec §6), so their bytes count against no device budget: the planner sees empty
    stand-ins, and the tables get no entry (see `keep_tables_on_host`). Engram decoder layers are kept whole on one
    device, like the family's own decoder layers.
    """
    tables = [module for module in model.modules() if isinstance(module, EngramTable) and module.keep_on_host]
    weights = [table.weight for table in tables]
    model._no_split_modules = {*(model._no_split_modules or ()), *(
        type(module).__name__ for module in model.modules() if isinstance(module, EngramDecoderLayerMixin)
    )}
    try:
        for table in tables:
            stand_in = table.weight.new_empty(0, table.embedding_dim, device="meta")
            table.weight = nn.Parameter(stand_in, requires_grad=False)
        device_map = _get_device_map(model, strategy, max_memory, hf_quantizer)
    finally:
        for table, weight in zip(tables, weights):
            table.weight = weight
    return keep_tables_on_host(model, dict(device_map))


# A table larger than a shard is stored as row slices `...engram.table.weight.part.<i>` (see the converter).
TABLE_PART_PATTERN = r"engram\.table\.weight\.part\.\d+$"
TABLE_KEY = "engram.table.weight"


class ConcatenateRows(ConversionOps):
    """Row slices -> one tensor, copied slice by slice into a buffer whose pages are committed as they are filled.

    Each slice is dropped once copied, so a table converted at load (to another dtype, say) is never held twice.
    """

    @torch.no_grad()
    def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str], **kwargs) -> dict:
        parts = [part for pattern in source_patterns for part in input_dict.pop(pattern, [])][::-1]
        table = parts[-1].new_empty((sum(len(part) for part in parts), *parts[-1].shape[1:]))
        start = 0
        while parts:
            part = parts.pop()
            table[start : start + len(part)].copy_(part)
            start += len(part)
        return {target_patterns[0]: table}


class EngramTablePartsConverter(WeightConverter):
    """Loads a table stored as row slices `...engram.table.weight.part.<i>` as the whole `...engram.table.weight`.

    Reassembled on the CPU (tables stay in host memory); saving keeps the table whole (the reverse is the identity).
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
    """Register `EngramTablePartsConverter` for `model_type` with transformers' checkpoint conversion mappings, which
    `from_pretrained` applies (also to remote code: this runs when the remote module is imported)."""
    others = [
        transform
        for transform in get_checkpoint_conversion_mapping(model_type) or []
        if type(transform).__name__ != EngramTablePartsConverter.__name__  # this module may be imported more than once
    ]
    register_checkpoint_conversion_mapping(model_type, [*others, EngramTablePartsConverter()], overwrite=True)


for _config_class in (EngramLlamaConfig, EngramQwen2Config, EngramQwen3Config):
    register_table_parts_conversion(_config_class.model_type)


class EngramDecoderLayerMixin:
    """Adds `self.engram` to a base decoder layer and computes `h = h + Engram(h)` before attention."""

    def __init__(self, config, layer_idx: int, num_rows: int):
        super().__init__(config, layer_idx)
        self.engram = EngramLayer(config, layer_idx, num_rows)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *args,
        engram_memory: dict[int, torch.Tensor] | None = None,
        engram_padding_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        memory = engram_memory[self.engram.layer_idx]  # [B, T, d_mem]
        update = self.engram(hidden_states.unsqueeze(2), memory, engram_padding_mask, past_key_values)
        hidden_states = hidden_states + update.squeeze(2)
        return super().forward(hidden_states, *args, past_key_values=past_key_values, **kwargs)


class EngramPreTrainedMixin:
    """Engram init, load-time map check and remote-code saving, mixed before the family's `PreTrainedModel`."""

    # {"AutoModel": class name, "AutoModelForCausalLM": class name} of the family module
    engram_auto_classes: dict[str, str] = {}
    # Engram tables stay in host memory (spec §6), out of every device_map. transformers reads this attribute: with it,
    # accelerate's dispatch accepts a device_map that does not cover the tables (see `plan_device_map` for "auto").
    _no_placement_params = ["engram.table.weight"]

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        device_map = load_config.device_map  # the same dict object that accelerate dispatch receives afterwards
        request = _device_map_request.get()
        if device_map is not None and request is not None:  # "auto" & co.: planned again, without the tables
            _device_map_request.set(None)
            plan = plan_device_map(model, *request, load_config.hf_quantizer)
            device_map.clear()
            device_map.update(plan)
        elif device_map is not None:
            keep_tables_on_host(model, device_map)
        return super(EngramPreTrainedMixin, type(model))._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, *args, **kwargs
        )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "engram_zero_init", False):
            # graft init (spec §4): value path and conv start at zero, so every Engram layer adds exactly zero
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, NgramHasher):
            identity = torch.arange(module.compression_map.shape[0]) % module.compressed_vocab_size
            init.copy_(module.compression_map, identity)
            module.reset_constants()
        else:
            super()._init_weights(module)

    def check_engram_map(self) -> None:
        """Raise if the stored compression map disagrees with the config (length or V')."""
        hasher = self.get_engram_hasher()
        cmap, cfg = hasher.compression_map, self.config
        n_distinct = int(torch.unique(cmap).numel())
        if cmap.shape[0] != cfg.engram_map_size or n_distinct != cfg.engram_compressed_vocab_size or (
            cmap.numel() and (int(cmap.min()) < 0 or int(cmap.max()) >= cfg.engram_compressed_vocab_size)
        ):
            raise ValueError(
                f"Stored Engram compression map (length {cmap.shape[0]}, {n_distinct} compressed ids) does not match the "
                f"config (engram_map_size={cfg.engram_map_size}, "
                f"engram_compressed_vocab_size={cfg.engram_compressed_vocab_size})."
            )

    def set_compression_map(self, compression_map: torch.Tensor) -> None:
        """Install a tokenizer's compression map (from `build_compression_map`) and check it against the config."""
        hasher = self.get_engram_hasher()
        if compression_map.shape != hasher.compression_map.shape:
            raise ValueError(
                f"Compression map covers {compression_map.shape[0]} ids, the config expects "
                f"engram_map_size={self.config.engram_map_size}."
            )
        hasher.compression_map.copy_(compression_map)
        self.check_engram_map()

    def get_engram_hasher(self) -> NgramHasher:
        return self.get_decoder().engram_hasher

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """Swap in the Engram cache layers before `generate` marks the cache for past recording.

        Assisted decoding calls `activate_past_recording` on the cache before the prefill; a plain `DynamicLayer` has no
        such flag, so a layer swapped in lazily at the first forward would not record its states and `crop` would fail.
        """
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if isinstance(cache, Cache):
            recording = getattr(generation_config, "is_assistant", False) or any(
                getattr(layer, "record_past", False) for layer in cache.layers
            )
            self.get_decoder().prepare_engram_cache(cache)
            if recording:
                cache.activate_past_recording()
        return result

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if isinstance(kwargs.get("device_map"), dict):  # rewritten in place by keep_tables_on_host: not the caller's
            kwargs["device_map"] = dict(kwargs["device_map"])
        want_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True
        strategy = kwargs.get("device_map")
        request = (strategy, kwargs.get("max_memory")) if strategy in _DEVICE_MAP_STRATEGIES else None
        token = _device_map_request.set(request)  # read by `_load_pretrained_model`
        try:
            model, info = super().from_pretrained(*args, **kwargs)
        finally:
            _device_map_request.reset(token)
        # a map missing from the checkpoint (or dropped by `ignore_mismatched_sizes`) is re-initialised to the identity,
        # which only agrees with a config without compression (V' == map size): anything else would hash silently wrong
        not_loaded = set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())}
        cfg = model.config
        if any(k.endswith("engram_hasher.compression_map") for k in not_loaded) and (
            cfg.engram_compressed_vocab_size != cfg.engram_map_size
        ):
            raise ValueError(
                "The checkpoint holds no Engram compression map of the configured length "
                f"(engram_map_size={cfg.engram_map_size}, engram_compressed_vocab_size="
                f"{cfg.engram_compressed_vocab_size}); the compression map is a property of the checkpoint."
            )
        model.check_engram_map()
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save weights and config, plus `auto_map` and every remote-code file of this folder."""
        module = type(self).__module__.rsplit(".", 1)[-1]
        config_module = type(self.config).__module__.rsplit(".", 1)[-1]
        self.config.auto_map = {
            "AutoConfig": f"{config_module}.{type(self.config).__name__}",
            **{auto: f"{module}.{name}" for auto, name in self.engram_auto_classes.items()},
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        for source in Path(__file__).parent.glob("*.py"):
            if source.name != "__init__.py":
                shutil.copy(source, Path(save_directory) / source.name)


class EngramModelMixin:
    """Mixed before the family's base model: swaps in Engram decoder layers and hashes once at forward entry."""

    decoder_layer_class: type

    def __init__(self, config):
        super().__init__(config)
        self.engram_hasher = NgramHasher.from_config(config)
        for layer_idx in config.engram_layer_ids:
            rows = self.engram_hasher.rows_per_layer(layer_idx)
            self.layers[layer_idx] = self.decoder_layer_class(config, layer_idx, rows)
        # read on every forward, and a config attribute read is slow: kept as plain attributes (fixed by the layers)
        self.engram_layer_ids: list[int] = list(config.engram_layer_ids)
        # cache states per Engram layer: its ShortConv history (`CONV_STATE`); the first also holds the N-1 previous
        # compressed ids, in state `engram_id_state`, after it
        conv = int(config.engram_use_short_conv)
        self.engram_cache_states = {layer_idx: conv for layer_idx in self.engram_layer_ids}
        self.engram_cache_states[self.engram_layer_ids[0]] += 1
        self.engram_id_state = conv
        self.post_init()  # initialises only the modules added above

    def prepare_engram_cache(self, past_key_values: Cache) -> None:
        """Give every Engram layer that keeps a state (the ShortConv history; for the first, also the id history) a
        cache layer that can hold it."""
        layers = past_key_values.layers
        if past_key_values.layer_class_to_replicate is not None:
            while len(layers) <= max(self.engram_layer_ids):
                layers.append(past_key_values.layer_class_to_replicate())
        for layer_idx, n_states in self.engram_cache_states.items():
            if n_states:
                layers[layer_idx] = _engram_cache_layer(layers[layer_idx], n_states)

    def _engram_window(self, compressed: torch.Tensor, past_key_values: Cache) -> torch.Tensor:
        """Push `[B, T]` compressed ids into the cache; return them after the N-1 ids before them, `[B, N-1+T]`."""
        hasher, seq, first = self.engram_hasher, compressed.shape[1], self.engram_layer_ids[0]
        self.prepare_engram_cache(past_key_values)
        if past_key_values.get_conv_state(first, self.engram_id_state) is None:  # before the start: the pad id
            compressed = torch.cat([hasher.pad_context(compressed.shape[0]), compressed], dim=1)
        window = past_key_values.update_conv_state(
            compressed, first, state_idx=self.engram_id_state, conv_kernel_size=hasher.context_size
        )
        return window[:, -(hasher.context_size + seq) :]

    def engram_hash(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values: Cache | None
    ) -> torch.Tensor:
        """`[B, T, L, (N-1)*K]` row ids (before offsets) of new raw `[B, T]` ids, which join the id history."""
        hasher = self.engram_hasher
        compressed = hasher.compress(input_ids, attention_mask)  # [B, T]
        if past_key_values is None:
            return hasher.hash_compressed(compressed)
        return hasher.hash_window(self._engram_window(compressed, past_key_values))

    def engram_memory(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        engram_hash_ids: torch.Tensor | None,
    ) -> dict[int, torch.Tensor]:
        """Hash the new tokens for all Engram layers and look up their rows: `{layer_id: [B, T, d_mem]}`."""
        hasher = self.engram_hasher
        if engram_hash_ids is None:
            if input_ids is None:
                raise ValueError(
                    "Engram models hash token ids: pass `input_ids` (or precomputed `engram_hash_ids`), "
                    "not only `inputs_embeds`."
                )
            engram_hash_ids = self.engram_hash(input_ids, attention_mask, past_key_values)  # [B, T, L, (N-1)*K]
        elif past_key_values is not None and input_ids is not None:
            self._engram_window(hasher.compress(input_ids, attention_mask), past_key_values)
        rows = engram_hash_ids + hasher.offsets  # [B, T, L, (N-1)*K] global rows
        device = engram_hash_ids.device  # prefetch every layer's rows here, at forward entry
        engrams = [self.layers[layer_idx].engram for layer_idx in self.engram_layer_ids]
        tables = {engram.table.weight.device for engram in engrams}
        if len(tables) == 1:  # one transfer of all layers' row ids (host tables, accelerator model: one sync)
            rows = rows.to(tables.pop())
        return {engram.layer_idx: engram.lookup(rows[:, :, i], device) for i, engram in enumerate(engrams)}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        engram_hash_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""
        engram_hash_ids (`torch.LongTensor` of shape `(batch_size, sequence_length, num_engram_layers, (N-1)*K)`, *optional*):
            Per-head row ids precomputed by `NgramHasher.hash_compressed` (e.g. in a data collator); by default they
            are computed here from `input_ids` and `attention_mask`.
        """
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        padding_mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        memory = self.engram_memory(input_ids, padding_mask, past_key_values, engram_hash_ids)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            engram_memory=memory,
            engram_padding_mask=padding_mask,
            **kwargs,
        )


class EngramForCausalLMMixin:
    """Mixed before the family's `*ForCausalLM`: builds the Engram base model instead of the plain one."""

    model_class: type
    causal_lm_base: type  # the family's plain *ForCausalLM

    def __init__(self, config):
        super(self.causal_lm_base, self).__init__(config)  # PreTrainedModel init, skipping the plain decoder build
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
