"""`hotswap` command line: generate, adapters, info. Human-readable tables by
default, `--json` for scripts. Exit status 1 on an error status, with the code
and the server's message on stderr.

The table printer is a few lines here rather than rich, so the SDK keeps its
promise of depending on grpcio and protobuf only."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import datetime
from typing import Sequence

from .errors import HotswapError
from .sync import Client

ADAPTER_COLUMNS = ("id", "peft_type", "rank", "num_virtual_tokens", "size_bytes", "residency", "pinned", "created_at")


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def _cell(v) -> str:
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, bool):
        return "yes" if v else ""
    return str(v)


def print_table(rows: Sequence, columns: Sequence[str], out=sys.stdout) -> None:
    cells = [[_cell(getattr(r, c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def print_record(obj, out=sys.stdout) -> None:
    data = _jsonable(obj)
    width = max(len(k) for k in data)
    for k, v in data.items():
        print(f"{k.ljust(width)}  {', '.join(map(str, v)) if isinstance(v, list) else v}", file=out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hotswap", description="Client for a hotswap server.")
    ap.add_argument("--target", default=os.environ.get("HOTSWAP_TARGET", "localhost:50051"),
                    help="server address (env HOTSWAP_TARGET; default localhost:50051)")
    ap.add_argument("--token", default=os.environ.get("HOTSWAP_TOKEN"), help="bearer token (env HOTSWAP_TOKEN)")
    ap.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    ap.add_argument("--ca-cert", help="PEM CA that signed the server certificate (implies --tls)")
    ap.add_argument("--client-cert", help="PEM client certificate for mutual TLS")
    ap.add_argument("--client-key", help="PEM key of the client certificate")
    ap.add_argument("--timeout", type=float, default=300.0, help="deadline of each call, seconds (default 300)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streams to the terminal)")
    g.add_argument("prompt", help="the prompt; with --chat, the user message")
    g.add_argument("--adapter", "-a", default="", help="adapter id (name or name@version); default: the base model")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (model's chat template)")
    g.add_argument("--system", help="with --chat: a system message first")
    g.add_argument("--max-new-tokens", "-n", type=int, default=64)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-stream", action="store_true", help="wait for the whole text")

    sub.add_parser("info", help="the server's base model and limits")

    ad = sub.add_parser("adapters", help="manage registered adapters").add_subparsers(dest="action", required=True)
    ls = ad.add_parser("list", help="registered adapters")
    ls.add_argument("--name", default="", help="only versions of this name")
    ad.add_parser("get", help="one adapter").add_argument("adapter_id")
    reg = ad.add_parser("register", help="register a PEFT adapter folder or fsspec URL as the next version of NAME")
    reg.add_argument("name")
    reg.add_argument("source_uri")
    reg.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    load = ad.add_parser("load", help="load onto the device now")
    load.add_argument("adapter_id")
    load.add_argument("--pin", action="store_true", help="keep it on the device until unloaded")
    ad.add_parser("unload", help="unpin and drop from the caches").add_argument("adapter_id")
    ad.add_parser("delete", help="unregister one version (name@v) or all (name)").add_argument("adapter_id")
    return ap


def _client(args: argparse.Namespace) -> Client:
    read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
    return Client(args.target, token=args.token, tls=args.tls or bool(args.ca_cert), ca_cert=read(args.ca_cert),
                  client_cert=read(args.client_cert), client_key=read(args.client_key), timeout=args.timeout)


def _generate(c: Client, args: argparse.Namespace) -> None:
    kw = dict(adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        kw["messages"] = msgs
    else:
        kw["prompt"] = args.prompt
    if args.json or args.no_stream:
        g = c.generate(**kw)
        print(json.dumps(_jsonable(g))) if args.json else print(g.text)
        return
    last = None
    for chunk in c.stream(**kw):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None and last.timing is not None:
        print(f"[{last.generated_tokens} tokens, {last.finish_reason}, first token {last.timing.time_to_first_token_seconds:.2f}s, "
              f"total {last.timing.total_seconds:.2f}s{', adapter ' + last.adapter_id if last.adapter_id else ''}]", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    with _client(args) as c:
        if args.command == "generate":
            return _generate(c, args)
        if args.command == "info":
            result = c.model_info()
        elif args.action == "list":
            result = c.list_adapters(name=args.name)
            if not args.json:
                return print_table(result, ADAPTER_COLUMNS)
        elif args.action == "get":
            result = c.get_adapter(args.adapter_id)
        elif args.action == "register":
            labels = dict(kv.split("=", 1) for kv in args.label if "=" in kv)
            result = c.register_adapter(args.name, args.source_uri, labels)
        elif args.action == "load":
            result = c.load_adapter(args.adapter_id, pin=args.pin)
        elif args.action == "unload":
            result = c.unload_adapter(args.adapter_id)
        else:
            result = {"deleted": c.delete_adapter(args.adapter_id)}
        if args.json:
            print(json.dumps(_jsonable(result)))
        elif isinstance(result, dict):
            print("deleted " + ", ".join(result["deleted"]))
        else:
            print_record(result)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except HotswapError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
