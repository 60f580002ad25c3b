"""A static KV cache that smelt owns: each forward writes its keys and values at the slots it is given.

gpt-fast's `KVCache.update(input_pos, k, v)` is the design. transformers' `StaticCache` writes at
each layer's own running length and ignores the positions it is handed (transformers 5.23), so a
speculative loop that keeps fewer tokens than it wrote would have to steer that private counter.
Here the loop says where a forward writes (`at(slots)`), and nothing else moves a write pointer:
slots past the kept tokens hold stale keys that attention never reads (it reads slots at or before
the query's) and the next forward writes over.

The cache is a `transformers.cache_utils.Cache`, so a model's own attention calls `update` on it
and its mask builders size the mask from it: [batch, heads, max_len, head_dim] per layer, every
slot always present (static shapes for `torch.compile`); the query offset is the first slot written.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values [batch, kv_heads, max_len, head_dim], written in place at given slots.

    Allocated at the first write (the prefill, never compiled), so dtype, device and head shape come
    from the model's own key states, whatever its weight format."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.max_len, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.max_len, value_states.shape[-1])
        if not torch.compiler.is_compiling():  # fixed addresses: the compiled steps update them in place
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, slots: torch.Tensor):
        """key/value states [batch, kv_heads, n, head_dim] into slots [n]; the whole cache for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a SlotLayer is written through SlotCache.update, which knows the slots")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0  # attention sees every slot; the mask hides the ones after the query

    def get_seq_length(self) -> int:
        raise TypeError("a SlotCache has no running length: its owner says which slots each forward writes")

    def get_max_length(self) -> int:
        return self.max_len


class SlotCache(Cache):
    """Per-layer `SlotLayer`s and the slots [n] the next forward writes (set by its owner with `at`)."""

    def __init__(self, config, max_len: int):
        text = config.get_text_config(decoder=True)
        if odd := sorted(set(getattr(text, "layer_types", None) or []) - {"full_attention"}):
            raise ValueError(f"smelt's static cache holds full-attention layers only, not {odd}")
        super().__init__(layers=[SlotLayer(max_len) for _ in range(text.num_hidden_layers)])
        self.max_len = max_len
        self.slots = torch.zeros(1, dtype=torch.long)  # [n]

    def at(self, slots: torch.Tensor) -> SlotCache:
        """Make the next forward write its n tokens at slots [n] (consecutive); returns the cache."""
        self.slots = slots
        return self

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].write(key_states, value_states, self.slots)

    def get_query_offset(self, layer_idx: int = 0) -> torch.Tensor:
        """The mask's position of the first query: the first slot written (a tensor, so it never recompiles)."""
        return self.slots[0]

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        return self.slots[0]  # slots before this forward's: what transformers calls the cache's length

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
