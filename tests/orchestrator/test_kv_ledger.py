"""The KV ledger as a unit: grants per request and tier, released exactly once, never over
capacity."""
from __future__ import annotations

import pytest

from orchestrator.kv_ledger import KVLedger, LedgerError


def test_grants_add_up_and_release_per_tier_or_all_at_once():
    ledger = KVLedger({"cuda:0": 10, "host": 20})
    ledger.reserve("a", "cuda:0", 4)
    ledger.reserve("a", "cuda:0", 2)
    ledger.reserve("a", "host", 5)
    ledger.reserve("b", "cuda:0", 3)
    assert ledger.holds("a") == {"cuda:0": 6, "host": 5} and ledger.free("cuda:0") == 1
    assert not ledger.can_reserve("cuda:0", 2) and ledger.can_reserve("host", 15)
    assert ledger.release("a", "cuda:0") == 6 and ledger.holds("a") == {"host": 5}
    assert ledger.release("a") == 5 and ledger.release("a") == 0  # a second release finds nothing
    assert ledger.holders == 1 and ledger.used("cuda:0") == 3
    ledger.check()


@pytest.mark.parametrize("tier, blocks, words", [
    ("cuda:1", 1, "unknown KV tier 'cuda:1'"),
    ("cuda:0", 11, "cannot reserve 11 blocks in cuda:0: 10 free"),
    ("cuda:0", -1, "cannot reserve -1 blocks"),
])
def test_an_overdraft_or_an_unknown_tier_raises_and_changes_nothing(tier, blocks, words):
    ledger = KVLedger({"cuda:0": 10})
    with pytest.raises(LedgerError, match=words):
        ledger.reserve("a", tier, blocks)
    assert ledger.used("cuda:0") == 0 and ledger.holders == 0


def test_check_catches_books_that_do_not_balance():
    ledger = KVLedger({"cuda:0": 10})
    ledger.reserve("a", "cuda:0", 4)
    ledger._used["cuda:0"] = 3  # what a bug that bypassed reserve/release would leave
    with pytest.raises(LedgerError, match="used=3 grants=4"):
        ledger.check()
