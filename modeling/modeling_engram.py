"""Family-independent Engram model machinery: decoder-layer wiring, hashing at forward entry, cache state, init, save."""

from __future__ import annotations

import shutil
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils.hub import convert_file_size_to_int

from .configuration_engram import EngramLlamaConfig, EngramQwen2Config, EngramQwen3Config
from .hashing_engram import NgramHasher
from .integration_engram import (
    CACHE_KWARG,
    TABLE_KEY,
    PreTrainedHooks,
    add_state_layers,
    check_cache_argument,
    get_conv_state,
    pop_cache,
    register_table_parts_conversion,
    transformers_device_map,
)
from .layer_engram import EngramLayer, EngramTable
from .mmap_engram import save_table_parts


def copy_remote_code(folder: str | Path) -> None:
    """Copy every remote-code file (this folder's modules) into a checkpoint folder."""
    for source in Path(__file__).parent.glob("*.py"):
        if source.name != "__init__.py":
            shutil.copy(source, Path(folder) / source.name)


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

    Engram tables stay in host memory (design §6), so their bytes count against no device budget: the planner sees empty
    stand-ins, and the tables get no entry (see `keep_tables_on_host`). Engram decoder layers are kept whole on one
    device, like the family's own decoder layers.
    """
    tables = [module for module in model.modules() if isinstance(module, EngramTable) and module.keep_on_host]
    weights = [table.weight for table in tables]
    whole = {type(module).__name__ for module in model.modules() if isinstance(module, EngramDecoderLayerMixin)}
    try:
        for table in tables:
            stand_in = table.weight.new_empty(0, table.embedding_dim, device="meta")
            table.weight = nn.Parameter(stand_in, requires_grad=False)
        device_map = transformers_device_map(model, strategy, max_memory, hf_quantizer, whole)
    finally:
        for table, weight in zip(tables, weights):
            table.weight = weight
    return keep_tables_on_host(model, device_map)


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
        **kwargs,
    ) -> torch.Tensor:
        cache = pop_cache(kwargs)  # passed as `cache` or `past_key_values`, depending on the transformers version
        memory = engram_memory[self.engram.layer_idx]  # [B, T, d_mem]
        update = self.engram(hidden_states.unsqueeze(2), memory, engram_padding_mask, cache)
        hidden_states = hidden_states + update.squeeze(2)
        return super().forward(hidden_states, *args, **{CACHE_KWARG: cache}, **kwargs)


class EngramPreTrainedMixin(PreTrainedHooks):
    """Engram init, load-time map check and remote-code saving, mixed before the family's `PreTrainedModel`."""

    # {"AutoModel": class name, "AutoModelForCausalLM": class name} of the family module
    engram_auto_classes: dict[str, str] = {}

    def engram_adjust_device_map(self, device_map: dict, hf_quantizer=None) -> None:
        """Edit the final `device_map` of a `from_pretrained` call in place so that no entry covers a table."""
        request = _device_map_request.get()
        if request is not None:  # "auto" & co.: planned again, without the tables
            _device_map_request.set(None)
            plan = plan_device_map(self, *request, hf_quantizer)
            device_map.clear()
            device_map.update(plan)
        else:
            keep_tables_on_host(self, device_map)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "engram_zero_init", False):
            # graft init (design §4): value path and conv start at zero, so every Engram layer adds exactly zero
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, NgramHasher):
            identity = torch.arange(module.compression_map.shape[0]) % module.compressed_vocab_size
            init.copy_(module.compression_map, identity)
            init.copy_(module.geometry, module.expected_geometry())
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

    def engram_prepare_generation_cache(self, cache: Cache, recording: bool) -> None:
        """Swap in the Engram cache layers before `generate` marks the cache for past recording.

        Assisted decoding calls `activate_past_recording` on the cache before the prefill; a plain `DynamicLayer` has no
        such flag, so a layer swapped in lazily at the first forward would not record its states and `crop` would fail.
        """
        self.get_decoder().prepare_engram_cache(cache)
        if recording:
            cache.activate_past_recording()

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
        engram_keys = sorted(k for k in not_loaded if ".engram." in k)
        if engram_keys:  # initialised where the checkpoint should have held trained (or grafted) values
            raise ValueError(
                f"The checkpoint lacks (or has other shapes for) Engram weights: {', '.join(engram_keys[:6])}"
                f"{' ...' if len(engram_keys) > 6 else ''}. Engram checkpoints come from `engram-hf convert` or "
                "`save_pretrained` of an Engram model, with the geometry in their config."
            )
        model.check_engram_map()
        changed = model.get_engram_hasher().geometry_mismatch()
        if changed:
            raise ValueError(
                f"config.json's {', '.join(changed)} differ(s) from what this checkpoint's Engram tables were made "
                "with: every hash would change. Restore the original values (edit the model through engram_hf, "
                "not config.json)."
            )
        return (model, info) if want_info else model

    @classmethod
    def remote_code_auto_map(cls) -> dict[str, str]:
        """`config.auto_map` of a checkpoint of this family: the Auto classes -> this folder's remote code."""
        module = cls.__module__.rsplit(".", 1)[-1]
        config_module = cls.config_class.__module__.rsplit(".", 1)[-1]
        return {
            "AutoConfig": f"{config_module}.{cls.config_class.__name__}",
            **{auto: f"{module}.{name}" for auto, name in cls.engram_auto_classes.items()},
        }

    def save_pretrained(
        self, save_directory, *args, state_dict: dict | None = None, max_shard_size: int | str = "50GB", **kwargs
    ) -> None:
        """Save weights and config, plus `auto_map` and every remote-code file of this folder.

        A table larger than `max_shard_size` is saved as aligned row slices (`save_table_parts`), which load back as one
        memory map; transformers would write it whole, in a shard of its own as large as the table.
        """
        self.config.auto_map = self.remote_code_auto_map()
        tensors = self.state_dict() if state_dict is None else state_dict
        limit = convert_file_size_to_int(max_shard_size)
        split = {
            key: tensor for key, tensor in tensors.items()
            if key.endswith(TABLE_KEY) and tensor.numel() * tensor.element_size() > limit
        }
        if split:  # transformers saves the rest; without split tables it saves as it would (state_dict as given)
            if kwargs.get("push_to_hub"):
                raise ValueError(
                    "Tables larger than max_shard_size are saved as row slices, which push_to_hub would not upload: "
                    "save to a folder, then upload it (`engram-hf publish FOLDER REPO`)."
                )
            state_dict = {key: tensor for key, tensor in tensors.items() if key not in split}
        super().save_pretrained(save_directory, *args, state_dict=state_dict, max_shard_size=max_shard_size, **kwargs)
        if split and kwargs.get("is_main_process", True):
            save_table_parts(Path(save_directory), split, limit)
        copy_remote_code(save_directory)


class EngramModelMixin:
    """Mixed before the family's base model: swaps in Engram decoder layers and hashes once at forward entry."""

    decoder_layer_class: type

    def __init__(self, config):
        check_cache_argument(super().forward, super(EngramDecoderLayerMixin, self.decoder_layer_class).forward)
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

    def prepare_engram_cache(self, cache: Cache) -> None:
        """Give every Engram layer that keeps a state (the ShortConv history; for the first, also the id history) a
        cache layer that can hold it."""
        add_state_layers(cache, self.engram_cache_states)

    def _engram_window(self, compressed: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Push `[B, T]` compressed ids into the cache; return them after the N-1 ids before them, `[B, N-1+T]`."""
        hasher, seq, first = self.engram_hasher, compressed.shape[1], self.engram_layer_ids[0]
        self.prepare_engram_cache(cache)
        if get_conv_state(cache, first, self.engram_id_state) is None:  # before the start: the pad id
            compressed = torch.cat([hasher.pad_context(compressed.shape[0]), compressed], dim=1)
        window = cache.update_conv_state(
            compressed, first, state_idx=self.engram_id_state, conv_kernel_size=hasher.context_size
        )
        return window[:, -(hasher.context_size + seq) :]

    def engram_hash(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor:
        """`[B, T, L, (N-1)*K]` row ids (before offsets) of new raw `[B, T]` ids, which join the id history."""
        hasher = self.engram_hasher
        compressed = hasher.compress(input_ids, attention_mask)  # [B, T]
        if cache is None:
            return hasher.hash_compressed(compressed)
        return hasher.hash_window(self._engram_window(compressed, cache))

    def engram_memory(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
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
            engram_hash_ids = self.engram_hash(input_ids, attention_mask, cache)  # [B, T, L, (N-1)*K]
        else:
            expected = (len(self.engram_layer_ids), hasher.moduli.shape[1])  # (L, (N-1)*K)
            ids_shape = tuple(input_ids.shape) if input_ids is not None else tuple(engram_hash_ids.shape[:2])
            if engram_hash_ids.dim() != 4 or tuple(engram_hash_ids.shape) != (*ids_shape, *expected):
                raise ValueError(
                    f"engram_hash_ids must have shape (batch, sequence, {expected[0]} Engram layers, {expected[1]} "
                    f"heads) = {(*ids_shape, *expected)}, got {tuple(engram_hash_ids.shape)}."
                )
            if cache is not None and input_ids is not None:
                self._engram_window(hasher.compress(input_ids, attention_mask), cache)
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
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        engram_hash_ids: torch.LongTensor | None = None,
        engram_padding_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""
        engram_hash_ids (`torch.LongTensor` of shape `(batch_size, sequence_length, num_engram_layers, (N-1)*K)`, *optional*):
            Per-head row ids precomputed by `NgramHasher.hash_compressed` (e.g. in a data collator); by default they
            are computed here from `input_ids` and `attention_mask`.
        engram_padding_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Which new positions are real (1) or padding (0), where `attention_mask` is not a 2-D padding mask (a
            static cache's 4-D mask); by default a 2-D `attention_mask` says so.
        """
        kwargs["cache"] = cache
        cache = pop_cache(kwargs)  # taken as `cache` or `past_key_values`, whatever the version
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        padding_mask = engram_padding_mask
        if padding_mask is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            padding_mask = attention_mask
        memory = self.engram_memory(input_ids, padding_mask, cache, engram_hash_ids)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            engram_memory=memory,
            engram_padding_mask=padding_mask,
            **{CACHE_KWARG: cache},
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

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, *args, attention_mask=None, **kwargs) -> dict:
        """The family's inputs, plus the new tokens' `[B, T]` padding mask for the Engram layers.

        With a fixed-size (static) cache `generate` turns the attention mask into a 4-D one, which no longer says which
        positions are padding. A single decode token is never padding, so decode steps get none (and a compiled step
        keeps the growing mask out of its graph).
        """
        inputs = super().prepare_inputs_for_generation(input_ids, *args, attention_mask=attention_mask, **kwargs)
        new = inputs.get("input_ids")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and new is not None and new.shape[1] > 1:
            inputs["engram_padding_mask"] = attention_mask[:, -new.shape[1] :]
        return inputs
