"""Prefix reuse through the real server: a 3-turn conversation of ~4K tokens, each turn resending the whole
history as a coding agent does, streamed through the official openai client. Prints each turn's time to first
token, its ratio to turn 1's (turn 1 prefills everything; later turns only their new tokens) and the
cached_tokens the server reported.

    python benchmarks/prefix_reuse.py [--work /tmp/hybrid-prefix] [--tokens 4000] [--hidden 1024] [--json out.json]

The model: a synthetic K2-layout checkpoint (hybrid/read/tiny.py) wider than the test one (hidden 1024 by
default), so that prefilling 4K tokens takes long enough for the difference to show above the HTTP and decode
overheads. Its weights are random: the replies are noise, the timings are real. The server runs in this
process (uvicorn in a thread on a loopback port) with the planner's plan for this machine, as `hybrid serve`.
"""

import argparse
import json
import random
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hybrid.read.tiny import TinySpec, make_tiny
from hybrid.server.app import create_app
from hybrid.server.service import load_service

KEY = "bench"
WORDS = "the a cache slot token prefix agent turn model reply tool file line test patch diff error".split()
TARGET_RATIO = 0.15  # a later turn's TTFT over turn 1's: what issue 17 asks of prefix reuse


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def checkpoint(work: Path, hidden: int, context: int) -> Path:
    spec = TinySpec(layers=3, dense_layers=1, experts=16, top_k=4, hidden=hidden, heads=8,
                    max_position_embeddings=context, seed=3)
    folder = work / f"k2-h{hidden}-ctx{context}"
    if not (folder / "config.json").exists():
        make_tiny(folder, spec, overwrite=True)
    return folder


def serve(service):
    """uvicorn in a daemon thread on a free loopback port; returns (server, url)."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=KEY), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{port}"


def system_prompt(service, n_tokens: int) -> str:
    """Random words whose rendered conversation is about n_tokens long (the tokenizer decides how many)."""
    n_words = n_tokens // 4
    for _ in range(8):
        ids = service.prompt([{"role": "system", "content": words(1, n_words)}])
        n_words = max(1, round(n_words * n_tokens / len(ids)))
    return words(1, n_words)


def turn(client, messages, max_tokens: int) -> dict:
    """One streamed turn: time to the first chunk (the server starts its response only once the first token
    exists, so this is prefill + first token + HTTP), the reply and the usage."""
    t0 = time.perf_counter()
    ttft, reply, usage = None, "", None
    for chunk in client.chat.completions.create(model="bench", messages=messages, temperature=0,
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        if chunk.choices:
            reply += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    return {"ttft_s": ttft, "reply": reply, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def conversation(client, system: str, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": words(2, 40)}]
    rows = []
    for i in range(3):
        rows.append(turn(client, messages, max_tokens))
        messages += [{"role": "assistant", "content": rows[-1]["reply"]},
                     {"role": "user", "content": words(10 + i, 40)}]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/hybrid-prefix", help="where the synthetic checkpoint is written")
    ap.add_argument("--tokens", type=int, default=4000, help="turn 1's prompt length, about")
    ap.add_argument("--hidden", type=int, default=1024, help="the synthetic model's hidden width")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from openai import OpenAI

    context = 8192
    folder = checkpoint(Path(args.work), args.hidden, context)
    service = load_service(folder, names=("bench",), max_concurrency=4, max_context=context)
    server, url = serve(service)
    try:
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        turn(client, [{"role": "user", "content": words(99, 200)}], 4)  # warm-up: first-call costs, not prefill
        rows = conversation(client, system_prompt(service, args.tokens), args.max_tokens)
    finally:
        server.should_exit = True
        service.close()
    table = Table(title=f"Prefix reuse: 3-turn conversation, hidden {args.hidden}, streamed (openai client)")
    for col in ("turn", "prompt tokens", "cached tokens", "prefilled", "TTFT s", "TTFT / turn 1"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows):
        ratio = r["ttft_s"] / rows[0]["ttft_s"]
        mark = "" if i == 0 else (" ok" if ratio <= TARGET_RATIO else " over target")
        table.add_row(str(i + 1), str(r["prompt_tokens"]), str(r["cached_tokens"]),
                      str(r["prompt_tokens"] - r["cached_tokens"]), f"{r['ttft_s']:.3f}", f"{ratio:.3f}{mark}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
