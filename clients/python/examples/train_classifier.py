"""A multiple-choice classifier, ReClor-shaped: a short passage, a question, options A-D,
and the answer's letter as the label — trained with the tuner's classification method.

    hotswap-server &                                        # the README's run command
    python clients/python/examples/train_classifier.py      # --target host:port --adapter lora|prompt_tuning|prefix_tuning

The set below is written for this example: 16 items, each asked four times with its options
rotated so the answer sits once under every letter (balanced labels, and a classifier cannot
win by always answering "A"). 12 items train, 4 (16 rows) validate. The job's eval events
give accuracy / precision / recall / F1 per epoch; the registered checkpoint is the best by
macro F1. Where the server has the Classify RPC, the held-out rows are then classified with
the new adapter. Needs only the client SDK. A 135M model does not reason its way through
these; expect the validation scores to show how far a small model gets, not a solved task.
"""
from __future__ import annotations

import argparse
import sys

from hotswap.client import Client

ITEMS = [  # (passage, question, correct option, three wrong options)
    ("Every bird in the aviary has a ring on its leg. Pip is in the aviary.", "What follows?", "Pip has a ring on its leg.",
     ["Pip cannot fly.", "Every bird with a ring is in the aviary.", "Pip is not a bird."]),
    ("The museum opens only on days when it does not rain. Today the museum is open.", "What follows?", "It is not raining today.",
     ["It rained yesterday.", "The museum is always open.", "It will rain tomorrow."]),
    ("All of Maria's books are novels. Some novels are long.", "Which must be true?", "Every book Maria owns is a novel.",
     ["Some of Maria's books are long.", "All novels belong to Maria.", "Maria owns no short books."]),
    ("Sales rose after the shop moved next to the station, though prices did not change.", "What most likely explains the rise?",
     "More people walk past the shop now.", ["Prices fell.", "The shop closed.", "The station moved away."]),
    ("If the alarm rings, Tom wakes up. Tom did not wake up.", "What follows?", "The alarm did not ring.",
     ["The alarm rang.", "Tom was tired.", "Tom always wakes up."]),
    ("No reptile in the zoo is warm-blooded. The zoo's iguana is a reptile.", "What follows?", "The iguana is not warm-blooded.",
     ["The iguana is warm-blooded.", "All animals in the zoo are reptiles.", "The zoo has no iguana."]),
    ("A plant given more light grew taller than an identical plant kept in shade, all else equal.", "What does this suggest?",
     "Light helped the plant grow.", ["Shade helps growth.", "Water made no difference to anything.", "The plants were different species."]),
    ("Only members may use the pool. Lena used the pool today.", "What follows?", "Lena is a member.",
     ["Lena is not a member.", "Every member used the pool.", "The pool was closed."]),
    ("The bridge is closed whenever the wind is above 80 km/h. The bridge is open.", "What follows?", "The wind is not above 80 km/h.",
     ["The wind is above 80 km/h.", "The bridge is never closed.", "There is no wind at all."]),
    ("Every engineer at the firm speaks German. Paul does not speak German.", "What follows?", "Paul is not an engineer at the firm.",
     ["Paul is an engineer at the firm.", "Paul speaks French.", "Nobody at the firm speaks German."]),
    ("The town's crime fell after street lights were added, while nearby towns saw no change.", "What does this support?",
     "The lights may have reduced crime.", ["Crime rose everywhere.", "Nearby towns added lights.", "Lights cause crime."]),
    ("All the cakes in the window contain nuts. Sam is allergic to nuts.", "What should Sam avoid?", "The cakes in the window.",
     ["The bread on the shelf.", "Nothing in the shop.", "Only the biggest cake."]),
    ("If a shape is a square, it has four sides. This shape has three sides.", "What follows?", "This shape is not a square.",
     ["This shape is a square.", "All shapes have four sides.", "The shape has no sides."]),
    ("Anyone who finished the race got a medal. Ava did not get a medal.", "What follows?", "Ava did not finish the race.",
     ["Ava won the race.", "Ava got two medals.", "Nobody finished the race."]),
    ("The library fines late returns. Ben returned his book on time.", "What follows?", "Ben is not fined for lateness.",
     ["Ben is fined.", "The library has no books.", "Ben returned it late."]),
    ("Whenever the cat is fed, it sleeps. The cat is awake and hungry.", "What most likely follows?", "The cat has not been fed.",
     ["The cat was just fed.", "The cat never sleeps.", "The cat is a dog."]),
]
LETTERS = "ABCD"


def rows(items) -> list[dict]:
    """Each item four times, its options rotated so the answer is under each letter once."""
    out = []
    for passage, question, right, wrong in items:
        for k in range(4):
            options = wrong[:k] + [right] + wrong[k:]
            text = f"Passage: {passage}\nQuestion: {question}\n" + "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options)) + "\nAnswer:"
            out.append({"text": text, "label": LETTERS[k]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--adapter", default="lora", choices=("lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning"))
    ap.add_argument("--name", default="mc-classifier")
    args = ap.parse_args()
    train, valid = rows(ITEMS[:12]), rows(ITEMS[12:])
    with Client(args.target) as c:
        job = c.train_adapter(args.name, "classification", examples=train, validation_examples=valid, classifier_adapter=args.adapter,
                              label_names=list(LETTERS), best_metric="f1")
        print(f"job {job.id}: {len(train)} training rows, {len(valid)} validation rows")
        for ev in c.watch_training_job(job.id):
            if ev.kind == "eval":
                m = ev.metrics
                print(f"epoch {m['epoch']:.0f}: eval loss {m['eval_loss']:.3f}, accuracy {m['accuracy']:.3f}, "
                      f"precision {m['precision']:.3f}, recall {m['recall']:.3f}, f1 {m['f1']:.3f}")
            elif ev.kind == "warning":
                print(f"warning: {ev.message}")
        done = c.get_training_job(job.id)
        if done.state != "succeeded":
            print(f"{done.state}: {done.error_code} {done.error_message}", file=sys.stderr)
            return 1
        r = done.quality.classification
        print(f"registered {done.adapter_id}; on the {r.split} set: accuracy {r.accuracy:.3f}, macro f1 {r.f1:.3f}")
        print("confusion (rows true A-D, columns predicted):", r.confusion)
        if hasattr(c, "classify"):  # the Classify RPC (issue 14, item 1)
            right = 0
            for row in valid:
                out = c.classify(row["text"], adapter=done.adapter_id)
                right += out.labels[max(range(len(out.labels)), key=lambda i: out.probabilities[i])] == row["label"]
            print(f"Classify with {done.adapter_id}: {right}/{len(valid)} held-out rows right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
