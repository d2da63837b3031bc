"""Issue 12's acceptance run: teach the served model a new identity with every training
method and DEFAULT hyperparameters, then ask each adapter five held-out paraphrases
and five unrelated control questions — beside the base model, in one batch, on the
same running server.

    hotswap-server &                                   # the README's run command
    python clients/python/examples/train_identity.py   # --target host:port, --methods lora,prefix_tuning

Passes (exit 0) when LoRA answers 5/5 paraphrases with the identity and every other
method at least 4/5, no control question gets the identity, and the base model's
answers in the same batch do not take it either. Prints each job's
wall time (claimed by the worker → succeeded), its automatic hyperparameters and its
quality report. Needs only the client SDK (pip install ./clients/python).
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

from identity_data import CONTROLS, PARAPHRASES, examples, has_identity

from hotswap.client import Client

METHODS = ("lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning")
BAR = {"lora": 5}  # paraphrases of 5 answered with the identity; others: 4
MAX_NEW_TOKENS = 32


def ask(c: Client, adapter: str, questions: list[str]) -> list[str]:
    return [c.generate(messages=[{"role": "user", "content": q}], adapter=adapter, max_new_tokens=MAX_NEW_TOKENS).text for q in questions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    methods = args.methods.split(",")
    ok = True
    with Client(args.target, timeout=3600) as c:
        base_before = ask(c, "", PARAPHRASES + CONTROLS)
        jobs = {m: c.train_adapter(f"nimbus-{m.replace('_', '-')}", m, examples=examples()) for m in methods}  # defaults
        done = {}
        for m, job in jobs.items():
            for ev in c.watch_training_job(job.id):
                if ev.kind == "step":
                    s = ev.metrics
                    print(f"\r  {m}: step {s['step']}/{s['total_steps']} loss {s['train_loss']:.3f} {s['tokens_per_second']:.0f} tok/s   ",
                          end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            done[m] = last = c.get_training_job(job.id)
            if last.state != "succeeded":
                raise SystemExit(f"{m} job {job.id} {last.state}: {last.error_code} {last.error_message}")
        # one batch: every new adapter and the base, side by side
        with ThreadPoolExecutor(len(methods) + 1) as ex:
            answers = dict(zip(["", *methods], ex.map(lambda a: ask(c, a, PARAPHRASES + CONTROLS),
                                                        ["", *[done[m].adapter_id for m in methods]])))
    print(f"\n{'method':<14} {'paraphrases':>11} {'controls w/ identity':>21} {'wall s':>7} {'train loss':>10} "
          f"{'ctrl changed':>12} {'agreement':>9}  automatic hyperparameters")
    for m in methods:
        j, out = done[m], answers[m]
        hits, leaks = sum(map(has_identity, out[:len(PARAPHRASES)])), sum(map(has_identity, out[len(PARAPHRASES):]))
        wall = (j.finished_at - j.started_at).total_seconds()
        hp = j.plan.hyperparameters
        auto = ", ".join(f"{k}={hp[k]:.3g}" if isinstance(hp[k], float) else f"{k}={hp[k]}"
                         for k in ("learning_rate", "epochs", "batch_size", "num_virtual_tokens", "base_protection") if k in j.plan.automatic)
        q = j.quality
        print(f"{m:<14} {hits:>9}/5 {leaks:>19}/5 {wall:>7.1f} {q.train_loss:>10.3f} {q.control_changed:>12.0%} "
              f"{q.control_agreement:>9.1%}  {auto}")
        ok &= hits >= BAR.get(m, 4) and leaks == 0
    # In bf16 a batch's size changes matmul rounding, so a base answer may take the other side of a near-tie;
    # what must hold is that no adapter reaches the base rows (tests/test_tuner_acceptance.py checks the ties).
    same = sum(a == b for a, b in zip(answers[""], base_before))
    base_clean = not any(map(has_identity, answers[""]))
    print(f"\nbase model in the same batch: {same}/{len(base_before)} answers identical to before training, "
          f"{'none' if base_clean else 'SOME'} with the identity")
    for q, a in zip(PARAPHRASES[:2] + CONTROLS[:2], [answers[methods[0]][i] for i in (0, 1, 5, 6)]):
        print(f"  {methods[0]}: {q!r} -> {a!r}")
    ok &= base_clean
    print("acceptance bar met" if ok else "acceptance bar NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
