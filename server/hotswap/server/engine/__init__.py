"""The continuous-batching engine: scheduler (no tensors) → runner (one forward) → sampler."""
