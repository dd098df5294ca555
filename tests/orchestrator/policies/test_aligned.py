"""aligned (and fcfs-offload) as a unit: pool state in, plan out. Each pass of a decision (switch,
starvation guard, refill, admission, staging) sees the earlier passes' decisions on the Draft,
while the pool itself stays untouched (`PoolState.plan` checks that)."""
from __future__ import annotations

from orchestrator.run_loop import apply_plan


def test_a_fresh_prompt_joins_the_batch_when_it_fits_its_span_else_it_is_parked(state):
    running = state.running(100)
    near, far = state.waiting(105), state.waiting(500)
    plan = state.plan(state.policy("aligned"))
    assert state.ids(plan.prefill) == state.ids(plan.admit) == [near.id, far.id]
    assert state.ids(plan.park) == [far.id] and state.ids(plan.decode) == [running.id] and plan.prefill_on is None
    # the joiner books its longest KV on the device; the parked one its prompt where it is
    # prefilled (until it has moved) and on the host
    assert state.grants(plan) == {near.id: {"cuda:0": 8}, far.id: {"cuda:0": 32, "host": 32}}


def test_refills_take_the_nearest_parked_length_each_pick_seeing_the_last(make_state):
    state = make_state(device_blocks=400)
    members = [state.running(200) for _ in range(3)]
    short, near, long_ = state.parked(50), state.parked(210), state.parked(900)
    plan = state.plan(state.policy("aligned"))
    assert state.ids(plan.load) == state.ids([near, short, long_])  # nearest to the median 200, in turn
    assert plan.stage == () and plan.decode == tuple(members) and not plan.switch
    assert state.grants(plan) == {near.id: {"cuda:0": 15}, short.id: {"cuda:0": 5}, long_.id: {"cuda:0": 58}}


def test_a_dense_staged_batch_is_loaded_beside_a_misaligned_full_batch(make_state):
    state = make_state(device_blocks=4000, host_blocks=4000)
    running = [state.running(100 + 14 * i) for i in range(64)]  # a full batch, lengths 100..982
    parked = [state.parked(300) for _ in range(40)]
    plan = state.plan(state.policy("aligned"))
    assert state.ids(plan.stage) == state.ids(plan.load) == state.ids(parked)  # one length: the densest window
    assert all(state.grants(plan)[r.id] == {"cuda:0": 20} for r in parked)  # 300 + 16 - 1 tokens each
    assert state.ids(plan.decode) == state.ids(running) and not plan.switch and not plan.offload


def test_a_shrunk_batch_is_switched_for_the_staged_one(make_state):
    state = make_state(device_blocks=400)
    running = [state.running(40) for _ in range(3)]
    staged = [state.staged(400) for _ in range(10)]  # too long to join the running batch's span
    plan = state.plan(state.policy("aligned"))
    assert plan.switch and state.ids(plan.offload) == state.ids(running)
    assert state.ids(plan.promote) == state.ids(plan.decode) == state.ids(staged)
    assert {rid: g for rid, g in state.grants(plan).items() if rid in {r.id for r in running}} == {
        r.id: {"host": 3} for r in running}  # their KV (40 tokens) goes to the host pool


def test_the_starvation_guard_takes_the_one_open_place_for_an_overdue_request(make_state):
    state = make_state(device_blocks=400)
    state.now = 6.0
    state.running(200)
    overdue = state.parked(900, since=0.0)  # waited 6 s: over max_wait_s / 2
    near = state.parked(205, since=5.9)
    guarded = state.plan(state.policy("aligned", max_batch_size=2, max_wait_s=10))
    assert state.ids(guarded.load) == [overdue.id]
    unguarded = state.plan(state.policy("aligned", max_batch_size=2, max_wait_s=100))
    assert state.ids(unguarded.load) == [near.id]  # the nearest length, without the guard


def test_fcfs_offload_refills_in_the_order_requests_were_parked(make_state):
    state = make_state(device_blocks=400)
    state.running(200)
    first, near = state.parked(900, since=1.0), state.parked(205, since=2.0)
    plan = state.plan(state.policy("fcfs-offload", max_batch_size=2))
    assert state.ids(plan.load) == [first.id, near.id] and state.ids(plan.stage) == [near.id]  # the rest: staged
    assert state.ids(state.plan(state.policy("aligned", max_batch_size=2)).load) == [near.id]


def test_a_staged_window_is_sized_by_the_longest_kv_its_members_are_granted(make_state):
    state = make_state(device_blocks=2000, host_blocks=4000)
    [state.running(100 + 14 * i, max_tokens=16) for i in range(40)]  # misaligned: 100..646
    # 300 tokens now, up to 300 + 400: 44 blocks each on the device, not the 20 of their KV.
    parked = [state.parked(300, max_tokens=401) for _ in range(40)]
    policy = state.policy("aligned", kmin=4)  # Bmax = 800 blocks: 18 of them, not 40
    plan = state.plan(policy)
    assert len(plan.stage) == 18 and set(state.ids(plan.stage)) <= set(state.ids(parked))
    grants = state.grants(plan)
    assert sum(grants[r.id]["cuda:0"] for r in plan.stage) == 18 * 44 <= policy.bmax
    assert policy.decision.kind == "grouped" and "18 staged" in policy.decision.reason


def test_the_guard_spills_a_member_to_make_room_for_an_overdue_request(make_state):
    state = make_state(device_blocks=60)
    state.now = 6.0
    # 14 + 14 + 26 blocks at their longest KV: 6 free, and the overdue request needs 15.
    members = [state.running(200, arrival=5.9) for _ in range(2)] + [state.running(400, arrival=5.9)]
    state.parked(210, since=0.0)
    policy = state.policy("aligned", max_wait_s=10)
    plan = state.plan(policy)
    # The member farthest from the median length goes to the host; the overdue request loads
    # once its blocks are free (next iteration), and nobody else is spilled for it meanwhile.
    assert state.ids(plan.offload) == [members[2].id] and plan.load == ()
    assert policy.decision.kind == "preempted"
    assert state.grants(plan)[members[2].id] == {"host": 25}  # its KV, 400 tokens
    apply_plan(plan, state.pool, state.ledger, state.now, state.device)  # its move starts
    state.now = 6.1
    assert state.plan(policy).offload == ()  # room is on its way: nobody else is spilled for it
