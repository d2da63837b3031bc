"""hotswap serving process: model loading, adapters, the continuous-batching engine."""
