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

JOB_COLUMNS = ("id", "adapter_name", "method", "state", "progress", "adapter_id", "created_at")
ADAPTER_COLUMNS = ("id", "peft_type", "rank", "num_virtual_tokens", "size_bytes", "residency", "pinned", "created_at")
HEADERS = {"num_virtual_tokens": "virtual", "size_bytes": "size", "created_at": "created", "adapter_name": "name",
           "adapter_id": "adapter", "progress": "step"}
"""Short headers, so a table's header is never what keeps it from fitting a terminal."""
COMPUTED = {"progress": lambda job: f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step)}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


FORMATS = {"size_bytes": _size}


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
        return v.strftime("%Y-%m-%d %H:%M")
    if isinstance(v, bool):
        return "yes" if v else ""
    return str(v)


def _terminal_width(out) -> int | None:
    """The terminal's width ($COLUMNS first); None when writing to a pipe or a file, whose
    reader may want every character (some libraries export COLUMNS into every child)."""
    try:
        if not out.isatty():
            return None
        if os.environ.get("COLUMNS", "").isdigit():
            return int(os.environ["COLUMNS"])
        return os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


def _fit(widths: list[int], floors: list[int], room: int) -> list[int]:
    """Narrow the widest columns (never below their floor) until the row fits `room`."""
    widths = list(widths)
    while sum(widths) + 2 * (len(widths) - 1) > room:
        i = max(range(len(widths)), key=lambda k: widths[k] - floors[k])
        if widths[i] <= floors[i]:
            break
        widths[i] -= 1
    return widths


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def print_table(rows: Sequence, columns: Sequence[str], out=None) -> None:
    """Columns as wide as their longest cell; on a terminal narrower than that, the widest
    columns are cut (ending in …) so each row stays on one line. --json has every value whole."""
    out = out or sys.stdout
    def value(r, c: str) -> str:
        v = COMPUTED[c](r) if c in COMPUTED else getattr(r, c)
        return FORMATS[c](v) if c in FORMATS else _cell(v)

    headers = [HEADERS.get(c, c).upper() for c in columns]
    cells = [[value(r, c) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    room = _terminal_width(out)
    if room is not None:
        # the first column (the id) is what a reader needs whole most: it gives way last
        floors = [min(w, 24 if i == 0 else max(len(h), 4)) for i, (w, h) in enumerate(zip(widths, headers))]
        widths = _fit(widths, floors, room)
    line = lambda values: "  ".join(_clip(v, w).ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    print(line(headers), file=out)
    for row in cells:
        print(line(row), file=out)


def print_record(obj, out=None) -> None:
    out = out or sys.stdout
    data = _jsonable(obj)
    width = max(len(k) for k in data)
    for k, v in data.items():
        print(f"{k.ljust(width)}  {', '.join(map(str, v)) if isinstance(v, list) else v}", file=out)


def _add_globals(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command shares. The top-level parser holds the defaults; each
    subcommand accepts them too (after its name, as people type them) without a default
    of its own, so a value given on either side wins and none is reset."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--target", default=d(os.environ.get("HOTSWAP_TARGET", "localhost:50051")),
                   help="server address (env HOTSWAP_TARGET; default localhost:50051)")
    g.add_argument("--token", default=d(os.environ.get("HOTSWAP_TOKEN")), help="bearer token (env HOTSWAP_TOKEN)")
    g.add_argument("--tls", action="store_true", default=d(False), help="use TLS with the system's root certificates")
    g.add_argument("--ca-cert", default=d(None), help="PEM CA that signed the server certificate (implies --tls)")
    g.add_argument("--client-cert", default=d(None), help="PEM client certificate for mutual TLS")
    g.add_argument("--client-key", default=d(None), help="PEM key of the client certificate")
    g.add_argument("--timeout", type=float, default=d(300.0), help="deadline of each call, seconds (default 300)")
    g.add_argument("--json", action="store_true", default=d(False), help="machine-readable output")


def _accept_globals_everywhere(p: argparse.ArgumentParser) -> None:
    for action in p._actions:  # argparse has no public walk over subcommands
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_globals(sub, defaults=False)
                _accept_globals_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hotswap", description="Client for a hotswap server.")
    _add_globals(ap, defaults=True)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streams to the terminal)")
    g.add_argument("prompt", help="the prompt; with --chat, the user message")
    g.add_argument("--adapter", "-a", default="", help="adapter id (name or name@version); default: the base model")
    form = g.add_mutually_exclusive_group()
    form.add_argument("--chat", action="store_true",
                      help="send the prompt as a user chat message, rendered with the model's chat template "
                           "(the default when the model has one)")
    form.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--system", help="a system message before the prompt (chat only)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=64)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-stream", action="store_true", help="wait for the whole text")

    cl = sub.add_parser("classify", help="label a text with a sequence-classification adapter")
    cl.add_argument("text", help="the text; with --chat, the user message")
    cl.add_argument("--adapter", "-a", required=True, help="a SEQ_CLS adapter id (name or name@version)")
    cl.add_argument("--chat", action="store_true", help="send the text as a user chat message (model's chat template)")
    cl.add_argument("--system", help="with --chat: a system message first")

    sc = sub.add_parser("score", help="log-likelihood of each candidate completion of a prompt")
    sc.add_argument("prompt")
    sc.add_argument("candidates", nargs="+", help="completions, each tokenized on its own after the prompt")
    sc.add_argument("--adapter", "-a", default="", help="adapter id (name or name@version); default: the base model")

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

    tr = sub.add_parser("train", help="queue a training job (the adapter is registered when it succeeds)")
    tr.add_argument("name", help="adapter name; an existing name gets a new version")
    tr.add_argument("--method", "-m", default="lora", choices=("lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning", "classification"))
    data = tr.add_mutually_exclusive_group(required=True)
    data.add_argument("--examples", help="local JSONL file, sent inline with the request")
    data.add_argument("--data", help="JSONL/CSV/Parquet path or URL the tuner worker reads")
    data.add_argument("--upload", help="local JSONL/CSV/Parquet file, streamed to the server first")
    val = tr.add_mutually_exclusive_group()
    val.add_argument("--validation-examples", help="local JSONL validation file, sent inline")
    val.add_argument("--validation-data", help="validation path or URL the worker reads")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="hyperparameter, e.g. lora_r=8, epochs=5, learning_rate=1e-3, target_modules=q_proj,v_proj")
    tr.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--watch", "-w", action="store_true", help="then follow it until it ends")

    jobs = sub.add_parser("jobs", help="training jobs").add_subparsers(dest="action", required=True)
    jl = jobs.add_parser("list", help="jobs, newest first")
    jl.add_argument("--state", default="", choices=("", "queued", "validating", "running", "succeeded", "failed", "cancelled"))
    jobs.add_parser("get", help="one job's fields").add_argument("job_id")
    jobs.add_parser("show", help="one job: its hyperparameters (which were automatic), quality report and samples").add_argument("job_id")
    jobs.add_parser("watch", help="follow a job with a progress bar until it ends").add_argument("job_id")
    jobs.add_parser("cancel", help="stop a job (nothing is registered)").add_argument("job_id")
    _accept_globals_everywhere(ap)
    return ap


HYPER_TYPES = {"lora_r": int, "num_virtual_tokens": int, "epochs": int, "batch_size": int, "gradient_accumulation_steps": int,
               "max_seq_len": int, "seed": int, "early_stopping_patience": int, "lora_alpha": float, "lora_dropout": float,
               "learning_rate": float, "warmup_ratio": float, "train_on_prompt": lambda v: v.lower() in ("1", "true", "yes"),
               "target_modules": lambda v: [t for t in v.split(",") if t], "virtual_tokens_init": str, "prompt_tuning_init_text": str,
               "base_protection": str, "replay_ratio": float, "kl_weight": float, "validation_fraction": float, "optim": str,
               "classifier_adapter": str, "best_metric": str, "label_names": lambda v: [t for t in v.split(",") if t],
               "class_weights": lambda v: [float(t) for t in v.split(",") if t]}


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path} line {n} is not valid JSON: {e.msg}") from None
    return out


def _train(c: Client, args: argparse.Namespace):
    hyper = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in HYPER_TYPES:
            raise SystemExit(f"error: unknown hyperparameter {key!r}; known: {', '.join(HYPER_TYPES)}")
        hyper[key] = HYPER_TYPES[key](value)
    job = c.train_adapter(
        args.name, args.method,
        examples=_read_jsonl(args.examples) if args.examples else None,
        dataset_uri=c.upload_dataset(args.upload) if args.upload else args.data,
        validation_examples=_read_jsonl(args.validation_examples) if args.validation_examples else None,
        validation_uri=args.validation_data, labels=dict(kv.split("=", 1) for kv in args.label if "=" in kv), **hyper,
    )
    if args.watch:
        return _watch(c, job.id, args.json)
    return job


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _watch(c: Client, job_id: str, as_json: bool):
    job = None
    for ev in c.watch_training_job(job_id):
        job = ev.job
        if as_json:
            print(json.dumps(_jsonable(ev)), flush=True)
            continue
        if ev.kind == "step":
            m = ev.metrics
            eta = ""
            if job.estimated_finish_at is not None:
                eta = f" eta {max(0, (job.estimated_finish_at - ev.time).total_seconds()):.0f}s"
            sys.stderr.write(f"\r{_bar(m['step'], m['total_steps'])} step {m['step']}/{m['total_steps']} loss {m['train_loss']:.4f} "
                             f"lr {m['learning_rate']:.2e} {m['tokens_per_second']:.0f} tok/s{eta}   ")
            sys.stderr.flush()
        elif ev.kind == "state":
            sys.stderr.write(f"\n{job_id}: {ev.state}\n")
        elif ev.kind == "eval":
            scores = "".join(f", {k} {ev.metrics[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1") if k in ev.metrics)
            sys.stderr.write(f"\n  eval loss {ev.metrics['eval_loss']:.4f}{scores} at step {ev.metrics['step']}\n")
        elif ev.kind == "warning":
            sys.stderr.write(f"\n  warning: {ev.message}\n")
        elif ev.kind == "samples" and ev.message == "after":
            sys.stderr.write("\n" + "".join(_sample_lines(ev.samples, 2)))
        elif ev.kind == "report":
            sys.stderr.write("\n" + "".join(_report_lines(ev.report)))
    if job is not None and job.state == "failed":
        print(f"error: {job.error_code}: {job.error_message}", file=sys.stderr)
        sys.exit(1)
    if job is not None and not as_json:
        print(f"{job.id} {job.state}" + (f": adapter {job.adapter_id}" if job.adapter_id else ""))
    return None


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _sample_lines(samples, per_kind: int | None = None) -> list[str]:
    out, shown = [], {}
    for s in samples:
        shown[s.kind] = shown.get(s.kind, 0) + 1
        if per_kind is not None and shown[s.kind] > per_kind:
            continue
        out.append(f"  [{s.kind}] {_short(s.prompt, 80)}\n")
        if s.reference:
            out.append(f"      expected: {_short(s.reference)}\n")
        out.append(f"      before:   {_short(s.before)}\n")
        if s.after or s.kind != "control":
            out.append(f"      after:    {_short(s.after)}{'' if s.after != s.before else '   (unchanged)'}\n")
    return out


def _report_lines(q) -> list[str]:
    losses = f"train loss {q.train_loss:.4f}" + (f", eval loss {q.eval_loss:.4f}" if q.eval_loss is not None else "")
    if q.classification is not None:  # a classifier generates nothing: no control prompts
        return [f"quality: {losses}\n"] + _classification_lines(q.classification)
    return [f"quality: {losses}; control prompts changed {q.control_changed:.0%} of {q.control_prompts}, "
            f"agreement with the base {q.control_agreement:.1%}\n"] + _classification_lines(q.classification)


def _classification_lines(c) -> list[str]:
    """A classifier's report: macro scores, per-label scores and the confusion matrix (rows: true labels)."""
    if c is None:
        return []
    out = [f"classification ({c.split}): accuracy {c.accuracy:.3f}, macro precision {c.precision:.3f}, recall {c.recall:.3f}, f1 {c.f1:.3f}\n"]
    width = max(len(n) for n in c.label_names)
    out += [f"  {x.label.ljust(width)}  precision {x.precision:.3f}  recall {x.recall:.3f}  f1 {x.f1:.3f}  support {x.support}\n"
            for x in c.per_label]
    out.append("  confusion (rows true, columns predicted): " + " | ".join(" ".join(map(str, r)) for r in c.confusion) + "\n")
    return out


def _show(job) -> None:
    """`hotswap jobs show`: the job, the values it trained with (automatic ones marked), its report and samples."""
    print(f"{job.id}  {job.adapter_name}  {job.method}  {job.state}" + (f"  -> {job.adapter_id}" if job.adapter_id else ""))
    if job.error_message:
        print(f"error: {job.error_code}: {job.error_message}")
    print(f"step {job.step}/{job.total_steps}, {job.trained_tokens} tokens trained")
    p = job.plan
    if p is None:
        print("hyperparameters: chosen when the job starts (unset ones are automatic)")
    else:
        held = " (held out of the training data)" if p.validation_held_out else ""
        print(f"data: {p.train_examples} training examples, {p.validation_examples} validation{held}, "
              f"{p.replay_examples} replay rows of the base's own answers; {p.steps_per_epoch} steps an epoch")
        print("hyperparameters (* = chosen by the tuner):")
        hp = p.hyperparameters
        width = max(len(k) for k in hp)
        for k in sorted(hp):
            v = hp[k]
            v = ",".join(map(str, v)) if isinstance(v, list) else (f"{v:.6g}" if isinstance(v, float) else v)
            print(f"  {'*' if k in p.automatic else ' '} {k.ljust(width)}  {v}")
    if job.quality is not None:
        print("".join(_report_lines(job.quality)), end="")
        if job.quality.samples:
            print("samples (greedy; before = the base model, after = the adapter):")
            print("".join(_sample_lines(job.quality.samples)), end="")


def _client(args: argparse.Namespace) -> Client:
    read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
    return Client(args.target, token=args.token, tls=args.tls or bool(args.ca_cert), ca_cert=read(args.ca_cert),
                  client_cert=read(args.client_cert), client_key=read(args.client_key), timeout=args.timeout)


def _generate(c: Client, args: argparse.Namespace) -> None:
    kw = dict(adapter=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    if args.raw and args.system:
        raise SystemExit("error: --system needs the chat template; leave out --raw")
    # An instruct model given a bare prompt without its template often ends at once (EOS):
    # use the template whenever the model has one, unless asked not to.
    if args.chat or (not args.raw and c.model_info().has_chat_template):
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


def _classify(c: Client, args: argparse.Namespace) -> None:
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.text}]
        r = c.classify(messages=msgs, adapter=args.adapter)
    else:
        r = c.classify(args.text, adapter=args.adapter)
    if args.json:
        return print(json.dumps(_jsonable(r)))
    rows = sorted(zip(r.labels, r.probabilities, r.logits), key=lambda x: -x[1])
    width = max(len(label) for label in r.labels)
    for label, p, logit in rows:
        print(f"{label:<{width}}  {p:.4f}  (logit {logit:+.4f})")
    print(f"[{r.label}, {r.prompt_tokens} tokens, {r.timing.total_seconds:.2f}s, adapter {r.adapter_id}]", file=sys.stderr)


def _score(c: Client, args: argparse.Namespace) -> None:
    r = c.score(args.prompt, args.candidates, adapter=args.adapter)
    if args.json:
        return print(json.dumps(_jsonable(r)))
    best = r.best
    for cand in r.candidates:
        mark = "*" if cand is best else " "
        print(f"{mark} {cand.logprob:10.4f}  {len(cand.token_ids):3d} tokens{'  greedy' if cand.is_greedy else '        '}  {cand.text!r}")


def run(args: argparse.Namespace) -> None:
    with _client(args) as c:
        if args.command == "generate":
            return _generate(c, args)
        if args.command == "classify":
            return _classify(c, args)
        if args.command == "score":
            return _score(c, args)
        if args.command == "train":
            result = _train(c, args)
            if result is None:
                return None
        elif args.command == "jobs":
            if args.action == "watch":
                return _watch(c, args.job_id, args.json)
            if args.action == "list":
                result = c.list_training_jobs(state=args.state)
                if not args.json:
                    return print_table(result, JOB_COLUMNS)
            elif args.action == "get":
                result = c.get_training_job(args.job_id)
            elif args.action == "show":
                result = c.get_training_job(args.job_id)
                if not args.json:
                    return _show(result)
            else:
                result = c.cancel_training_job(args.job_id)
        elif args.command == "info":
            result = c.model_info()
        elif args.action == "list":
            result = c.list_adapters(name=args.name)
            if not args.json:
                return print_table(result, ADAPTER_COLUMNS)
        elif args.action == "get":
            result = c.get_adapter(args.adapter_id)
        elif args.action == "register":
            labels = dict(kv.split("=", 1) for kv in args.label if "=" in kv)
            # a folder named relative to the shell's directory: the server needs it absolute
            source = args.source_uri if "://" in args.source_uri or not os.path.exists(args.source_uri) else os.path.abspath(args.source_uri)
            result = c.register_adapter(args.name, source, labels)
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
