"""`make chat`: talk to a running server in the terminal, through its OpenAI-compatible API.

    python -m serving.chat [--url http://127.0.0.1:8080/v1] [--system "..."] [--temperature 0.7]

Each answer streams in as it is generated; the conversation is kept across turns and sent whole
each time (the server keeps no session). Commands: /reset starts over, /exit (or Ctrl-D) leaves;
Ctrl-C while an answer streams stops that answer (closing the stream cancels it on the server)
and keeps the part already shown. Standard library only, so it runs from any Python.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Iterator, TextIO

DEFAULT_URL = "http://127.0.0.1:8080/v1"
HELP = "/reset starts a new conversation, /exit leaves; Ctrl-C stops an answer"


class ChatError(RuntimeError):
    """The server could not be reached or refused the request; the message says what to do."""


def _request(url: str, body: dict | None = None, timeout: float = 600.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise ChatError(f"the server refused the request ({e.code}): {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ChatError(f"no server answers at {url} ({getattr(e, 'reason', e)}); start one with `make serve`, "
                        "or point --url at it") from None


def served_model(base_url: str) -> str:
    """The first model the server lists."""
    with _request(f"{base_url}/models", timeout=10) as r:
        models = json.loads(r.read())["data"]
    if not models:
        raise ChatError(f"{base_url}/models lists no model")
    return models[0]["id"]


def stream_answer(base_url: str, model: str, messages: list[dict], options: dict) -> Iterator[str]:
    """The assistant's answer to `messages`, piece by piece as the server streams it."""
    body = {"model": model, "messages": messages, "stream": True, **options}
    with _request(f"{base_url}/chat/completions", body) as r:
        for raw in r:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ChatError(chunk["error"].get("message", "the server failed the request"))
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


def chat(base_url: str, options: dict, system: str | None = None,
         stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The conversation loop; returns the exit code."""
    model = served_model(base_url)
    print(f"chatting with {model} at {base_url} ({HELP})", file=stdout, flush=True)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    turns = list(history)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            turns = list(history)
            print("(a new conversation)", file=stdout, flush=True)
            continue
        turns.append({"role": "user", "content": text})
        print(f"{model}> ", end="", file=stdout, flush=True)
        answer = []
        stream = stream_answer(base_url, model, turns, options)
        try:
            for piece in stream:
                answer.append(piece)
                print(piece, end="", file=stdout, flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="", file=stdout)
        finally:
            stream.close()  # closes the connection now: the server cancels the rest of the answer
        print(file=stdout, flush=True)
        turns.append({"role": "assistant", "content": "".join(answer)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server's OpenAI base URL (default {DEFAULT_URL})")
    p.add_argument("--system", default=None, help="a system message that opens every conversation")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens of one answer")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    options = {"temperature": a.temperature, "max_tokens": a.max_tokens}
    if a.seed is not None:
        options["seed"] = a.seed
    try:
        return chat(a.url.rstrip("/"), options, a.system)
    except ChatError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 0


if __name__ == "__main__":
    sys.exit(main())
