"""hotswap tuner: trains adapters on request and registers them with the server's store."""
import hotswap.server  # noqa: F401  (first: its logging filter must be in place before PEFT imports bitsandbytes)
