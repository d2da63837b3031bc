"""What the rotary kernel (engine/fused_rotary.py: transformers' apply_rotary_pos_emb as one
native call a layer) does to a whole engine step, on the default model in bf16: two engines in
one process — the eager function, the kernel — take turns over the same 64-row batch (its
prefill step, then 32 decode steps), so drifts of this shared machine hit both alike.

    python bench/fused_rotary.py [--rounds 6]

Prints the median prefill-step and decode-step time of each (and the best decode step)."""
from __future__ import annotations

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import runner
from hotswap.server.engine.engine import Engine
from hotswap.server.model.loader import load_base_model

from bench_engine import prompts
from engine_turns import parse_rounds, take_turns
from machine import cpu_name


def main() -> None:
    rounds = parse_rounds(__doc__)
    engines = {}
    fuse = runner.fuse_rotary
    for name, fused in (("eager apply_rotary_pos_emb", False), ("rotary kernel (the engine's)", True)):
        runner.fuse_rotary = fuse if fused else (lambda *a: 0)  # read when the runner is built
        loaded = load_base_model(ModelConfig(quantization="none"))
        engines[name] = Engine(loaded, EngineConfig(max_batch_size=64, kv_cache_bytes=2**29))
        assert bool(engines[name].runner.fused_rotary) == fused
    runner.fuse_rotary = fuse
    table = take_turns(engines, prompts(loaded.tokenizer, 64), rounds, "rotary")
    print(f"`python bench/fused_rotary.py --rounds {rounds}` on {cpu_name()}, {loaded.dtype}, 64 rows\n")
    print(table)


if __name__ == "__main__":
    main()
