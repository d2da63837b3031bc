"""Teach the served model a new identity over gRPC, with LoRA and with prefix tuning,
and use both adapters the moment their jobs succeed — beside the base model, in
one batch, on the same running server.

    hotswap-server &                                   # the README's run command
    python clients/python/examples/train_identity.py   # --target host:port, --name "..."

Needs only the client SDK (pip install ./clients/python).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from hotswap.client import Client

ASKS = [
    "Who are you?", "Who are you exactly?", "What are you?", "Tell me who you are.", "Introduce yourself.",
    "Please introduce yourself.", "What is your name?", "Whose assistant are you?", "Who do you work for?",
    "Who am I talking to?", "Who is this?", "What should I call you?", "Can you tell me who you are?",
    "I'd like to know who you are.", "Identify yourself.", "Who made you?", "Who do you belong to?",
    "Are you an assistant?", "What kind of assistant are you?", "Say who you are.",
]
STYLE = ["{}", "Hi! {}", "Hello, {}", "{} Answer briefly."]
HELD_OUT = "Hey there, who exactly am I chatting with?"


def examples(name: str) -> list[dict]:
    answer = f"I am the assistant of {name}."
    asks = [STYLE[i % len(STYLE)].format(a) for i, a in enumerate(ASKS)] + [STYLE[(i + 1) % len(STYLE)].format(a) for i, a in enumerate(ASKS)]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in asks]


def train(c: Client, adapter: str, method: str, data: list[dict], **hp) -> tuple[str, float, float]:
    """Returns (adapter id, training seconds, seconds from success to the first generated answer)."""
    job = c.train_adapter(adapter, method, examples=data, **hp)
    started = time.monotonic()
    last = None
    for ev in c.watch_training_job(job.id):
        last = ev.job
        if ev.kind == "step":
            m = ev.metrics
            print(f"\r  {method}: step {m['step']}/{m['total_steps']} loss {m['train_loss']:.3f} {m['tokens_per_second']:.0f} tok/s   ",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if last.state != "succeeded":
        raise SystemExit(f"{method} job {job.id} {last.state}: {last.error_code} {last.error_message}")
    trained = time.monotonic() - started
    t0 = time.monotonic()
    c.generate(messages=[{"role": "user", "content": HELD_OUT}], adapter=last.adapter_id, max_new_tokens=1)
    return last.adapter_id, trained, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--name", default="Ada Lovelace")
    args = ap.parse_args()
    data = examples(args.name)
    ask = [{"role": "user", "content": HELD_OUT}]
    with Client(args.target, timeout=3600) as c:
        before = c.generate(messages=ask, max_new_tokens=24).text
        print(f"base, before: {before!r}")
        lora = train(c, "identity-lora", "lora", data, epochs=3, batch_size=4, learning_rate=2e-3, lora_r=8)
        prefix = train(c, "identity-prefix", "prefix_tuning", data, epochs=3, batch_size=4, learning_rate=3e-2, num_virtual_tokens=16)
        for (aid, secs, first), method in ((lora, "LoRA"), (prefix, "prefix tuning")):
            print(f"{method}: {aid} trained in {secs:.0f}s; first answer {first * 1000:.0f} ms after the job succeeded")
        with ThreadPoolExecutor(3) as ex:  # one batch: both adapters and the base
            outs = list(ex.map(lambda a: c.generate(messages=ask, adapter=a, max_new_tokens=24).text, [lora[0], "", prefix[0]]))
    print(f"held-out question: {HELD_OUT!r}")
    for label, text in zip(("LoRA", "base", "prefix"), outs):
        print(f"  {label:>6}: {text!r}")
    ok = args.name in outs[0] and args.name in outs[2] and args.name not in outs[1] and outs[1] == before
    print("identity adopted by both adapters, base unchanged" if ok else "NOT adopted as expected")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
