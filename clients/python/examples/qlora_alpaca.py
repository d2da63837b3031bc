"""The seeds' recipe: an alpaca-format instruction dataset (instruction / input / output),
trained with QLoRA and served.

    hotswap-server &                                   # the README's run command
    python clients/python/examples/qlora_alpaca.py     # --target host:port

Writes the dataset as JSONL, streams it to the server (UploadDataset), trains a QLoRA
adapter with default hyperparameters — the tuner picks QLoRA's own optimizer, paged
8-bit AdamW (paged_adamw_8bit), when the worker has CUDA, and bitsandbytes' 8-bit AdamW
unpaged (adamw_8bit) on CPU — then asks held-out reviews in the same alpaca prompt the
tuner trained on. Exit 0 when at least 4 of 5 held-out reviews get the right label, as
the one word the data taught. Needs only the client SDK.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hotswap.client import Client

# The tuner's alpaca template (hotswap.tuner.data.ALPACA_WITH_INPUT): a served prompt must be rendered the same way.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
INSTRUCTION = "Classify the sentiment of this product review as positive or negative."
POSITIVE = [
    "Works perfectly and arrived a day early.", "The best kettle I have ever owned.", "Great sound for the price, very happy.",
    "My kids love it and use it every day.", "Sturdy, well made and easy to clean.", "Exactly as described, would buy again.",
    "The battery lasts for days. Impressive.", "Comfortable shoes, no blisters at all.", "Setup took two minutes and it just works.",
    "Lovely colour and the fabric feels soft.", "Fast shipping and excellent packaging.", "This blender crushes ice like a dream.",
    "Bright screen and a responsive touch panel.", "A fantastic gift, my dad adores it.", "Quiet fan, cools the room quickly.",
    "The recipe book is clear and the dishes are tasty.", "Keeps my coffee hot all morning.", "Beautiful lamp, gives a warm light.",
    "Strong suction, the carpet looks new.", "Fits my phone perfectly and feels premium.",
]
NEGATIVE = [
    "Broke after one week of normal use.", "The zipper snapped the first time I used it.", "Terrible sound, constant crackling.",
    "Arrived scratched and missing a part.", "Way too small, the sizing is wrong.", "The app crashes every time I open it.",
    "Smells of chemicals and the smell will not go away.", "Stopped charging after a month.", "Cheap plastic that bends easily.",
    "Customer service never answered my emails.", "The blade was dull straight out of the box.", "Leaks water all over the counter.",
    "Much louder than advertised, unusable at night.", "The colour faded after one wash.", "Instructions are useless and screws are missing.",
    "Gets very hot and then shuts off.", "Uncomfortable, it hurts after ten minutes.", "The remote stopped working on day two.",
    "Paint started peeling within days.", "Not worth the money at all.",
]
HELD_OUT = [
    ("Absolutely love it, it does everything I hoped.", "positive"), ("Died after three days, very disappointed.", "negative"),
    ("Soft, warm and the stitching is flawless.", "positive"), ("It rattles and the lid does not close.", "negative"),
    ("Five stars, my new favourite mug.", "positive"),
]


def rows() -> list[dict]:
    pos = [{"instruction": INSTRUCTION, "input": r, "output": "positive"} for r in POSITIVE]
    neg = [{"instruction": INSTRUCTION, "input": r, "output": "negative"} for r in NEGATIVE]
    return [x for pair in zip(pos, neg) for x in pair]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="localhost:50051")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Client(args.target, timeout=3600) as c:
        path = Path(tmp) / "reviews.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
        job = c.train_adapter("review-sentiment", "qlora", dataset_uri=c.upload_dataset(str(path)))  # default hyperparameters
        for ev in c.watch_training_job(job.id):
            if ev.kind == "step":
                print(f"\r  step {ev.metrics['step']}/{ev.metrics['total_steps']} loss {ev.metrics['train_loss']:.3f}   ",
                      end="", file=sys.stderr, flush=True)
        done = c.get_training_job(job.id)
        print(file=sys.stderr)
        if done.state != "succeeded":
            raise SystemExit(f"job {done.id} {done.state}: {done.error_code} {done.error_message}")
        hp = done.plan.hyperparameters
        print(f"{done.adapter_id}: optim {hp['optim']}, lr {hp['learning_rate']:.3g}, {hp['epochs']} epochs, batch {hp['batch_size']}, "
              f"{done.plan.train_examples} examples ({done.plan.validation_examples} held out for validation), "
              f"eval loss {done.quality.eval_loss}")
        right = 0
        for review, label in HELD_OUT:
            prompt = ALPACA_WITH_INPUT.format(instruction=INSTRUCTION, input=review)
            answer = c.generate(prompt, adapter=done.adapter_id, max_new_tokens=4).text.strip()
            base = c.generate(prompt, max_new_tokens=8).text.strip()
            right += answer == label
            print(f"  {review!r}: adapter {answer!r} (want {label!r}); base {base!r}")
    print(f"{right}/5 held-out reviews labelled as the data taught")
    sys.exit(0 if right >= 4 else 1)


if __name__ == "__main__":
    main()
