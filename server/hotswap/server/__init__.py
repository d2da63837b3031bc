"""hotswap serving process: model loading, adapters, the continuous-batching engine."""
import logging


class _NoHubKernelHint(logging.Filter):
    """bitsandbytes (imported by PEFT) tries, on CPUs with AVX-512 BF16, to fetch a 4-bit GEMM from the Hugging Face
    hub through the optional `kernels` package, and on failure logs a warning telling the user to `pip install
    kernels`. hotswap never fetches code at run time, and bitsandbytes falls back to its own kernel, so the hint
    would only mislead: it is dropped, and nothing else bitsandbytes logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelHint())
