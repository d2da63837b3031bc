"""What running sibling linears as one matmul (engine/packed_linears.py: a layer's q/k/v, and
its gate/up) does to a whole engine step, on the default model in bf16: three engines in one
process — no siblings, q/k/v only, q/k/v and gate/up — take turns over the same 64-row batch
(its prefill step, then 32 decode steps), so drifts of this shared machine hit all three alike.

    python bench/sibling_linears.py [--rounds 6]

Prints the median prefill-step and decode-step time of each (and the best decode step)."""
from __future__ import annotations

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import packed_linears
from hotswap.server.engine.engine import Engine
from hotswap.server.model.loader import load_base_model

from bench_engine import prompts
from engine_turns import parse_rounds, take_turns
from machine import cpu_name

VARIANTS = {
    "each linear its own matmul": (),
    "q/k/v as one": (("q_proj", "k_proj", "v_proj"),),
    "q/k/v and gate/up as one (the engine's)": packed_linears.SIBLINGS,
}


def main() -> None:
    rounds = parse_rounds(__doc__)
    engines = {}
    for name, siblings in VARIANTS.items():
        packed_linears.SIBLINGS = siblings  # read when the engine packs its model: each variant loads its own
        loaded = load_base_model(ModelConfig(quantization="none"))
        engines[name] = Engine(loaded, EngineConfig(max_batch_size=64, kv_cache_bytes=2**29))
    packed_linears.SIBLINGS = VARIANTS["q/k/v and gate/up as one (the engine's)"]
    table = take_turns(engines, prompts(loaded.tokenizer, 64), rounds, "linears")
    print(f"`python bench/sibling_linears.py --rounds {rounds}` on {cpu_name()}, {loaded.dtype}, 64 rows\n")
    print(table)


if __name__ == "__main__":
    main()
