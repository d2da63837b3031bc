"""Which KV block holds what: allocation, reference counts and the prefix cache.
Tensor-free, so the scheduler that calls it is tested without a model.

A full block is keyed by (its parent block's key, its tokens), and the first
block's parent is the row's adapter id, so two rows share a block only when
they run the same adapter version over the same leading tokens (virtual tokens
of prompt and prefix adapters included). Keys are 128-bit BLAKE2b digests:
a collision would let one request read another's key/values, so a plain
64-bit hash is not enough. Blocks nobody holds stay cached (LRU) until the
pool needs them."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from .row import Row


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def root_key(adapter_key: str) -> bytes:
    return hashlib.blake2b(b"hotswap-adapter\0" + adapter_key.encode(), digest_size=16).digest()


@dataclass
class PrefixCacheStats:
    queries: int = 0
    """Prompt tokens looked up in the prefix cache at admission."""
    hits: int = 0
    """Of those, tokens whose key/values were found cached."""


class BlockPool:
    """`num_blocks` blocks; each is in use (ref > 0) or free. Free blocks sit in an LRU
    queue, oldest first; a free block may still carry a cached key until it is reused."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n blocks from the front of the free queue (least recently used first); the caller checked num_free."""
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            key = self.key_of[block]
            if key is not None:  # reusing a cached block: it no longer holds that content
                if self.cached.get(key) == block:
                    del self.cached[key]
                self.key_of[block] = None
            self.ref[block] = 1
            out.append(block)
        return out

    def take(self, block: int) -> None:
        """Hold a cached block (a prefix-cache hit)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, blocks: list[int]) -> None:
        # Tail first, so a row's last blocks are reused before its first ones (more likely shared).
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
                if self.key_of[block] is None:  # nothing worth keeping: reuse it first
                    self.free.move_to_end(block, last=False)

    def register(self, block: int, key: bytes) -> None:
        """The block now holds the content `key` names; first writer wins."""
        if key not in self.cached:
            self.cached[key] = block
            self.key_of[block] = key

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key)


class KVBlockManager:
    """Row-level operations on the pool: prefix hits, growing a row's blocks, freeing them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.caching = enable_prefix_caching
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def _keys(self, row: Row, full_blocks: int) -> list[bytes]:
        """Keys of the row's first `full_blocks` blocks, extending row.block_hashes as needed."""
        keys, bs = row.block_hashes, self.block_size
        while len(keys) < full_blocks:
            i = len(keys)
            parent = keys[-1] if keys else root_key(row.adapter_key)
            keys.append(block_key(parent, row.tokens(i * bs, (i + 1) * bs)))
        return keys[:full_blocks]

    def new_block_keys(self, row: Row, end: int) -> list[bytes]:
        """Keys of the full blocks that computing the row's positions up to `end` completes
        (those not yet offered to the prefix cache); none when caching is off."""
        if not self.caching:
            return []
        return self._keys(row, end // self.block_size)[row.num_cached_blocks:]

    def first_missing_key(self, row: Row, hits: list[int]) -> bytes | None:
        """Key of the first block after `hits` that the prefix cache could still serve the row."""
        if not self.caching or len(hits) >= row.compute_from // self.block_size:
            return None
        return self._keys(row, len(hits) + 1)[len(hits)]

    def written_prefix(self, row: Row, hits: list[int], writing: Mapping[bytes, tuple[int, Row] | None]) -> list[tuple[int, Row]]:
        """The blocks, each with the row writing it, that continue the row's cached `hits` (up to
        row.compute_from, as cached_prefix) among those other rows complete this step (`writing`:
        key -> (block, row), None for a key only completed in a later step)."""
        full = row.compute_from // self.block_size
        if not self.caching or len(hits) >= full:
            return []
        out = []
        for key in self._keys(row, full)[len(hits):]:
            written = writing.get(key)
            if written is None:
                break
            out.append(written)
        return out

    def cached_prefix(self, row: Row) -> list[int]:
        """Cached blocks holding the row's leading positions, up to the first position whose
        outputs the row reads (row.compute_from): that one and all after it are computed."""
        if not self.caching:
            return []
        hits = []
        for key in self._keys(row, row.compute_from // self.block_size):
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, row: Row, hits: list[int], num_new: int) -> bool:
        """Would `num_new` positions after the hit blocks fit in the free blocks?"""
        need = self.blocks_for(len(hits) * self.block_size + num_new) - len(hits)
        reclaimable_hits = sum(1 for b in hits if self.pool.ref[b] == 0)  # free now, held once taken
        return need <= self.pool.num_free - reclaimable_hits

    def admit(self, row: Row, hits: list[int]) -> None:
        """Give a row with no blocks its prefix-cache hits."""
        for block in hits:
            self.pool.take(block)
        row.block_ids = list(hits)
        row.num_computed = len(hits) * self.block_size
        row.num_cached_blocks = len(hits)
        prompt = row.num_virtual + len(row.prompt_ids)
        self.stats.queries += prompt
        self.stats.hits += min(row.num_computed, prompt)

    def grow(self, row: Row, end: int) -> bool:
        """Make the row's blocks cover positions 0..end-1; False (nothing taken) when the pool is short."""
        need = self.blocks_for(end) - len(row.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        row.block_ids += self.pool.allocate(need)
        return True

    def commit(self, row: Row) -> None:
        """After a step: offer the row's newly full, computed blocks to the prefix cache."""
        if not self.caching:
            return
        full = row.num_computed // self.block_size
        if full > row.num_cached_blocks:
            keys = self._keys(row, full)
            for i in range(row.num_cached_blocks, full):
                self.pool.register(row.block_ids[i], keys[i])
            row.num_cached_blocks = full

    def free(self, row: Row) -> None:
        self.pool.release(row.block_ids)
        row.block_ids = []
        row.num_computed = row.num_cached_blocks = 0
