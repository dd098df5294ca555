"""A representative part of bench/malformed_inputs.py's sweep against a real server: each case
gets the class of answer the README documents (a 4xx or gRPC error naming the field where the
project sees the request; Triton's front-end 500 where Triton refuses it first)."""
from __future__ import annotations

import pytest

from bench.malformed_inputs import NAMED, OK, OTHER, T500U, cases, run, start_server

pytestmark = pytest.mark.integration

SUBSET = {  # (protocol, case): one or more of each class, over each protocol aligned_llm speaks
    ("http-generate", 'max_tokens: "abc"'), ("http-generate", "text_input: 123"), ("http-generate", "seed: -1"),
    ("http-generate", "body not JSON"), ("http-generate", "seed: 2**63 (UINT64, accepted)"),
    ("http-generate", "seed: 2**64-1 (UINT64, accepted)"),
    ("http-generate", "max_tokens: 2147483648 (wraps to INT32 min)"), ("http-generate", "max_tokens: 0"),
    ("http-generate", "text_input empty"), ("http-generate", "text_input oversize (2 MB)"),
    ("http-generate", "top_p: 2"), ("http-generate", "unknown field \"foo\""),
    ("http-generate", "stream: true on /generate"), ("http-generate_stream", "temperature: -1"),
    ("grpc-stream", "seed: 2**64-1 (UINT64, accepted)"), ("grpc-stream", "text_input bad UTF-8"),
    ("grpc-stream", "unknown input \"foo\""), ("grpc-stream", "top_k: -1"),
    ("openai-completions", "max_tokens: \"abc\""), ("openai-completions", "body nested 20000 deep"),
    ("openai-completions", "a lone surrogate (\\ud800) in the prompt"), ("openai-completions", "top_k: 2**64"),
    ("openai-chat", "role: \"wizard\""), ("openai-chat", "temperature: 1e400 (a 400-digit integer)"),
    ("openai-chat", "messages over max_prompt_bytes (3 kB)"),
}


def test_a_subset_of_the_malformed_input_sweep_is_answered_as_documented(demo_engine_dir, tmp_path):
    selected = [c for c in cases() if (c.protocol, c.name) in SUBSET and c.model == "aligned_llm"]
    assert len(selected) == len(SUBSET), "a case of SUBSET is no longer in bench.malformed_inputs"
    srv, target = start_server(demo_engine_dir, tmp_path / "server.log", models=("aligned_llm",))
    try:
        results = run(target, selected)
    finally:
        srv.stop()
    wrong = [(r.protocol, r.case, r.status, r.cls, r.message) for r in results if not r.as_expected]
    assert not wrong, wrong
    assert {r.cls for r in results} == {NAMED, T500U, OK, OTHER}
    # The project's refusals are 4xx (gRPC: an error) that start with the field's name.
    for r in results:
        if r.cls == NAMED and r.source == "project" and not r.protocol.startswith("openai"):
            assert r.message.startswith(f"{r.field}: "), r
