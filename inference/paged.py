"""A paged KV cache: one pool of fixed-size blocks per layer, and a block table per row
(vLLM's PagedAttention, Kwon et al. 2023), for the serving engine (`inference/engine.py`).

Axis letters: B rows (serving slots), P blocks in the pool, Z positions per block (block
size), M blocks per row (the block table's width), K kv heads, H head dim, C and R MLA's
latent and rotary-key widths, L layers.

A contiguous cache preallocates every slot for the longest sequence it may ever hold,
[B, S, K, H] per layer, whatever the requests actually need. A paged cache holds

    per layer:  key_pages, value_pages   [P, Z, K, H]   (MLA: latent_pages [P, Z, C],
                                                          key_rope_pages [P, Z, R])
    per call:   block_table              [B, M]         int32

and position s of row b lives in block table[b, s // Z] at offset s % Z. A quantized cache
(`BlockConfig.kv_cache_quant`) pools its scales the same way: `key_scale_pages`,
`value_scale_pages` [P, Z, K] (MLA: `latent_scale_pages`, `key_rope_scale_pages` [P, Z]). Blocks are handed
out when a row reaches them and returned when its request leaves (`BlockAllocator`), so
the pool is sized for the tokens actually in flight, not for B * S. Block 0 is never
handed out: unallocated table entries point at it, so the writes of idle slots and of
prompt padding land there and nothing reads them (they sit past every row's position,
under the causal mask).

The block table travels inside the `cache` collection (`with_block_table`), where the
attention layers look for it (`models/layers/multihead.py`, `mla.py`): each layer gets
its own copy ([L, B, M] under `scan_layers`), a few bytes per row, which avoids adding an
argument to every layer. Attention gathers each row's blocks into a contiguous view
(`models.layers.attention.gather_pages`) and then runs exactly as over a contiguous cache,
so paged and contiguous outputs are equal; a real serving kernel reads the blocks in place.

Memory, as measured by tests/inference/test_engine.py (tiny LLaMA, float32): 4 slots of
64 positions preallocated contiguously take 64 KiB; a pool of 16 blocks of 8 positions,
32 KiB, serves the same six requests with the same outputs, and at most 6 blocks (12 KiB,
19% of the contiguous cache) were ever in use at once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from inference.kv_cache import cache_shapes, kv_cache_bytes
from models.gpt import GPT, GPTConfig
from models.layers.kv_cache import PAGE_SUFFIX, SCALE_SUFFIX

NULL_BLOCK = 0  # never allocated; unallocated table entries point here


def batch_axis(model: GPT) -> int:
    """Cache leaves are [B, ...], or [L, B, ...] when the layers are scanned."""
    return 1 if model.config.scan_layers else 0


def init_paged_cache(model: GPT, num_blocks: int, block_size: int) -> dict:
    """Zero block pools for every attention layer (no block tables: see `with_block_table`).

    Args:
      model: a decoder-only `GPT`.
      num_blocks: P, blocks per layer, block 0 (`NULL_BLOCK`) included.
      block_size: Z, positions per block.

    Returns:
      The cache collection with each layer's buffers renamed `<name>_pages` and shaped
      [P, Z, ...] ([L, P, Z, ...] under `scan_layers`).
    """
    if num_blocks < 2:
        raise ValueError(f"num_blocks={num_blocks} must be >= 2: block 0 is reserved as the null block")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    axis = batch_axis(model)

    def pages(tree):
        out = {}
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                out[name] = pages(leaf)
            else:  # [.., 1, Z, ...] -> [.., P, Z, ...]
                shape = (*leaf.shape[:axis], num_blocks, *leaf.shape[axis + 1:])
                out[name + PAGE_SUFFIX] = jnp.zeros(shape, leaf.dtype)
        return out

    return pages(cache_shapes(model, 1, block_size))


def paged_cache_bytes(config: GPTConfig, num_blocks: int, block_size: int) -> int:
    """The pools' size by formula, in bytes: P blocks of Z positions hold what a contiguous
    cache of P rows of Z positions holds (`kv_cache_bytes`, quantized codes and scales
    included); the block tables travel with each call and are not counted."""
    return kv_cache_bytes(config, num_blocks, block_size)


def with_block_table(pages: dict, block_table_BM: jax.Array) -> dict:
    """The pools plus `block_table` [B, M] beside each layer's pages (broadcast over L)."""
    out = {}
    for name, value in pages.items():
        if isinstance(value, dict):
            out[name] = with_block_table(value, block_table_BM)
        else:
            out[name] = value
            if name.endswith(PAGE_SUFFIX):
                leading = value.shape[: value.ndim - _page_rank(name)]
                out["block_table"] = jnp.broadcast_to(block_table_BM, (*leading, *block_table_BM.shape))
    return out


_PAGE_RANKS = {"key": 4, "value": 4, "latent": 3, "key_rope": 3}


def _page_rank(name: str) -> int:
    """Rank of one layer's pool: [P, Z, K, H] for keys and values, [P, Z, C] for MLA's latents,
    one less for their scales ([P, Z, K], [P, Z]) when the cache is quantized."""
    buffer = name.removesuffix(PAGE_SUFFIX)
    if buffer.endswith(SCALE_SUFFIX):
        return _PAGE_RANKS[buffer.removesuffix(SCALE_SUFFIX)] - 1
    return _PAGE_RANKS[buffer]


def without_block_table(cache: dict) -> dict:
    """The pools alone (drops the `block_table` entries a call carried)."""
    return {name: without_block_table(v) if isinstance(v, dict) else v
            for name, v in cache.items() if name != "block_table"}


def blocks_for(num_positions: int, block_size: int) -> int:
    """Blocks that hold `num_positions` positions."""
    return math.ceil(num_positions / block_size)


class BlockAllocator:
    """Hands out pool blocks on demand and takes them back when a request leaves.

    Admission reserves a request's worst case (prompt + max_new_tokens positions) so
    that a running request never finds the pool empty; the blocks themselves are taken
    only when a row reaches them, and a request that stops early (a stop token) returns
    its unused reservation with its blocks. (vLLM instead admits optimistically and
    preempts a request when the pool runs dry; reservation is simpler and never
    recomputes.)
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out 1, 2, ...
        self._owned: dict[int, list[int]] = {}
        self._reserved: dict[int, int] = {}
        self.peak_in_use = 0

    @property
    def usable(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def in_use(self) -> int:
        return self.usable - len(self._free)

    def available(self) -> int:
        """Free blocks not promised to a running request."""
        promised = sum(n - len(self._owned[owner]) for owner, n in self._reserved.items())
        return len(self._free) - promised

    def reserve(self, owner: int, num_blocks: int) -> bool:
        """Promises `num_blocks` to `owner` if they are available; returns whether it did."""
        if num_blocks > self.available():
            return False
        self._reserved[owner] = num_blocks
        self._owned[owner] = []
        return True

    def allocate(self, owner: int) -> int:
        """One more block for `owner`, within its reservation."""
        if len(self._owned[owner]) >= self._reserved[owner]:
            raise RuntimeError(f"request {owner} needs more than its {self._reserved[owner]} reserved blocks")
        block = self._free.pop()
        self._owned[owner].append(block)
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return block

    def release(self, owner: int) -> None:
        """Returns `owner`'s blocks and the rest of its reservation."""
        self._free.extend(reversed(self._owned.pop(owner)))
        del self._reserved[owner]
