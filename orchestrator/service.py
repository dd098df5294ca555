"""The orchestrator as the serving layer sees it: submit, cancel, stats, start and stop, and the
operator's levers (drain, resume, switch the policy at runtime).

It is handed a ready engine (the serving layer loads it with `engines.loader`), so nothing here
imports a concrete engine.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Iterable, Sequence

from engines.base import HOST, Engine, SamplingParams
from orchestrator.config import POLICIES, ServeConfig
from orchestrator.core import PolicySwitchRefused, Request, RequestRejected, TokenEvent
from orchestrator.kv_ledger import KVLedger
from orchestrator.policies import Policy, make_policy
from orchestrator.run_loop import RunLoop


class Orchestrator:
    """Accepts requests, validates them against the engine's limits, and runs them."""

    def __init__(self, engine: Engine, config: ServeConfig, clock: Callable[[], float] = time.monotonic):
        """clock: the time arrivals, tokens and the starvation guard are measured in."""
        self.engine = engine
        self.clock = clock
        self.info = engine.describe()
        self.config = config.with_manifest(self.info.model.max_seq_len)
        capacity = {d.name: d.kv_blocks for d in self.info.devices}
        capacity[HOST] = self.info.host_blocks
        self.ledger = KVLedger(capacity)
        policy = make_policy(self.config.policy, self.info, self.config, self.ledger, clock)
        self.loop = RunLoop(engine, policy, self.ledger, self.config, clock)
        self._ids = itertools.count(1)
        self._switching = threading.Lock()  # one switch at a time: config and policy stay in step

    @property
    def policy(self) -> Policy:
        """The policy scheduling now (it may be switched at runtime)."""
        return self.loop.policy

    def start(self) -> "Orchestrator":
        self.loop.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.loop.stop(timeout)

    def __enter__(self) -> "Orchestrator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        end_id: int | None = None,
        stop_sequences: Iterable[Sequence[int]] = (),
        on_event: Callable[[TokenEvent], None] | None = None,
    ) -> Request:
        """Validate and queue a request; raises RequestRejected naming the field and the limit.

        end_id: token that ends generation; None uses the model's EOS tokens.
        stop_sequences: token sequences that end generation once generated (kept in the output).
        on_event: called from the run loop thread with each TokenEvent; must not block.
        """
        request = self._build(prompt_ids, max_tokens, sampling, end_id, stop_sequences, on_event)
        self.loop.submit(request)
        return request

    def cancel(self, request_id: str) -> None:
        """Cancel a request wherever it is; it ends with finish reason "cancelled"."""
        self.loop.cancel(request_id)

    def drain(self) -> None:
        """Stop admitting: submit raises RequestRejected("server", "draining ...") until
        `resume`; requests already accepted run to the end."""
        self.loop.drain()

    def resume(self) -> None:
        """Admit new requests again after `drain`."""
        self.loop.resume()

    @property
    def draining(self) -> bool:
        return self.loop.draining

    def switch_policy(self, name: str, timeout: float = 30.0) -> str:
        """Schedule with policy `name` from the next iteration on; returns the policy now in force
        ("aligned" on an engine without a host pool runs as "fcfs", as at startup).

        Raises ValueError for an unknown name, PolicySwitchRefused when this engine cannot run
        it or when requests sit where it never looks (e.g. fcfs while the host pool holds
        requests), TimeoutError when the run loop does not finish its iteration in `timeout` s.
        """
        if name not in POLICIES:
            raise ValueError(f"policy: {name!r} is not one of {', '.join(POLICIES)}")
        with self._switching:
            config = self.config.replace(policy=name)
            try:
                policy = make_policy(name, self.info, config, self.ledger, self.clock)
            except ValueError as e:
                raise PolicySwitchRefused(str(e)) from None
            self.loop.switch_policy(policy, timeout)
            self.config = config
            return policy.name

    def stats(self) -> dict:
        pool = self.loop.pool
        return {
            **self.loop.metrics.summary(),
            "policy": self.policy.name,
            "waiting": len(pool.waiting),
            "prefilling": len(pool.prefilling),
            "running": len(pool.running),
            "staged": len(pool.staged),
            "candidates": len(pool.candidates),
            "parked": len(pool.parked),
            "kv_blocks": {tier: {"reserved": self.ledger.used(tier), "capacity": self.ledger.capacity(tier)}
                          for tier in [d.name for d in self.info.devices] + [HOST]},
        }

    def _build(self, prompt_ids, max_tokens, sampling, end_id, stop_sequences, on_event) -> Request:
        cfg, model = self.config, self.info.model
        prompt = tuple(int(t) for t in prompt_ids)
        if not prompt:
            raise RequestRejected("prompt", "the prompt is empty; send at least one token of text")
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise RequestRejected("prompt", f"token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
        if len(prompt) >= cfg.max_seq_len:
            raise RequestRejected(
                "prompt", f"{len(prompt)} tokens; the limit is {cfg.max_seq_len - 1} (max_seq_len "
                f"{cfg.max_seq_len} minus one generated token)")
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, cfg.max_seq_len - len(prompt))
        if not 1 <= max_tokens <= cfg.max_tokens_limit:
            raise RequestRejected("max_tokens", f"{max_tokens} is outside [1, {cfg.max_tokens_limit}]")
        if len(prompt) + max_tokens - 1 > cfg.max_seq_len:
            raise RequestRejected(
                "max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"max_seq_len ({cfg.max_seq_len}); ask for at most {cfg.max_seq_len - len(prompt) + 1}")
        blocks = self.info.blocks_for(len(prompt) + max_tokens - 1)
        capacity = self.ledger.capacity(self.info.decode_device)
        if blocks > capacity:
            raise RequestRejected(
                "max_tokens", f"prompt + max_tokens need {blocks} KV blocks but the device holds "
                f"{capacity}; lower max_tokens or build the engine with more KV memory")
        host = self.ledger.capacity(HOST)
        if self.policy.name in ("aligned", "fcfs-offload") and blocks > host:
            raise RequestRejected(
                "max_tokens", f"prompt + max_tokens need {blocks} KV blocks but the host pool holds "
                f"{host}; lower max_tokens or build the engine with more host KV memory")
        if end_id is None:
            stop_ids = frozenset(model.eos_token_ids)
        elif not 0 <= end_id < model.vocab_size:
            raise RequestRejected("end_id", f"{end_id} is outside the vocabulary [0, {model.vocab_size})")
        else:
            stop_ids = frozenset((end_id,))
        stops = tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s))
        for s in stops:
            if any(not 0 <= t < model.vocab_size for t in s):
                raise RequestRejected("stop_words", f"token ids {s} fall outside the vocabulary")
        return Request(
            id=f"req-{next(self._ids)}",
            prompt_ids=prompt,
            max_tokens=max_tokens,
            sampling=sampling or SamplingParams(),
            stop_token_ids=stop_ids,
            stop_sequences=stops,
            on_event=on_event,
        )
