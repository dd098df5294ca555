"""The KV blocks a request fills, as Dynamo's "stored" and "removed" events.

Dynamo's KV router indexes each worker's cache by the token content of its blocks (it hashes
the tokens it is sent); the block hashes a worker publishes are only the names it later removes
them by. A request's KV holds its prompt and every generated token but the newest (whose KV the
next decode step writes), so after n generated tokens its full blocks are
`(prompt_len + n - 1) // block_size`; each newly full block is published as stored, and all of
them as removed when the request finishes (however it ends: its KV is freed then). Parked
requests keep their blocks (in the host pool, still this worker's).

The torch engine has no prefix cache: two requests with the same prompt hold two copies. So each
request's blocks get names of their own (the request's key and the block's index), and what the
router sees on a worker is the KV of the requests in flight there.
"""
from __future__ import annotations

import hashlib
from typing import Protocol, Sequence


class Publisher(Protocol):
    """The part of `dynamo.llm.KvEventPublisher` used here."""

    def publish_stored(self, token_ids: list[int], num_block_tokens: list[int], block_hashes: list[int],
                       parent_hash: int | None = None) -> None: ...

    def publish_removed(self, block_hashes: list[int]) -> None: ...


def block_name(key: str, index: int) -> int:
    """A signed 64-bit name for block `index` of the request `key` (Dynamo's hashes are i64)."""
    digest = hashlib.blake2b(f"{key}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class RequestBlocks:
    """One request's published blocks: call `advance` with each token count, `release` at the end."""

    def __init__(self, key: str, prompt_ids: Sequence[int], block_size: int, publisher: Publisher | None):
        self.key = key
        self.tokens = list(prompt_ids)
        self.block_size = block_size
        self.publisher = publisher
        self.names: list[int] = []

    def advance(self, new_tokens: Sequence[int]) -> None:
        """`new_tokens` were generated: publish the blocks that are now full of KV."""
        self.tokens.extend(new_tokens)
        full = max(len(self.tokens) - 1, 0) // self.block_size
        if full <= len(self.names) or self.publisher is None:
            return
        first = len(self.names)
        names = [block_name(self.key, i) for i in range(first, full)]
        tokens = self.tokens[first * self.block_size:full * self.block_size]
        self.publisher.publish_stored(token_ids=tokens, num_block_tokens=[self.block_size] * len(names),
                                      block_hashes=names, parent_hash=self.names[-1] if self.names else None)
        self.names.extend(names)

    def release(self) -> None:
        """The request finished and its KV is freed: remove every block published."""
        if self.names and self.publisher is not None:
            self.publisher.publish_removed(block_hashes=list(self.names))
        self.names = []
