"""The KV blocks a request fills, as Dynamo's stored / removed events (serving/cluster/kv_events.py)."""
from __future__ import annotations

from serving.cluster.kv_events import RequestBlocks, block_name


class Recorder:
    """Records the calls the worker makes on Dynamo's KvEventPublisher (same keyword arguments)."""

    def __init__(self):
        self.stored, self.removed = [], []

    def publish_stored(self, token_ids, num_block_tokens, block_hashes, parent_hash=None):
        assert len(token_ids) == sum(num_block_tokens) and len(num_block_tokens) == len(block_hashes)
        self.stored.append((list(token_ids), list(block_hashes), parent_hash))

    def publish_removed(self, block_hashes):
        self.removed.append(list(block_hashes))


def test_a_block_is_stored_once_its_kv_is_written_and_all_are_removed_at_the_end():
    rec = Recorder()
    blocks = RequestBlocks("req-1", list(range(10)), block_size=4, publisher=rec)
    blocks.advance([100])  # 11 tokens, KV of 10 (the newest token's KV comes with the next step): 2 full blocks
    assert [s[0] for s in rec.stored] == [list(range(8))] and rec.stored[0][2] is None
    blocks.advance([101])  # KV of 11: still 2
    assert len(rec.stored) == 1
    blocks.advance([102, 103])  # KV of 13: block 3 (tokens 8..11) is full
    assert rec.stored[1][0] == [8, 9, 100, 101] and rec.stored[1][2] == rec.stored[0][1][-1]  # chained
    names = [n for s in rec.stored for n in s[1]]
    assert len(set(names)) == 3
    blocks.release()
    assert rec.removed == [names]
    blocks.release()  # a second release removes nothing more
    assert len(rec.removed) == 1


def test_names_are_per_request_and_signed_64_bit():
    a, b = block_name("req-1", 0), block_name("req-2", 0)
    assert a != b and block_name("req-1", 0) == a
    assert all(-2**63 <= x < 2**63 for x in (a, b))


def test_short_prompt_publishes_nothing_until_a_block_fills():
    rec = Recorder()
    blocks = RequestBlocks("r", [1, 2], block_size=16, publisher=rec)
    blocks.advance([3])
    blocks.release()
    assert rec.stored == [] and rec.removed == []
