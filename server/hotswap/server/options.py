"""Server options: command-line flags, each with an environment variable
(HOTSWAP_<NAME>) and a key in an optional TOML config file.

Precedence: flag > environment > config file > default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .access import SourcePolicy, split_list
from .config import BACKENDS, DTYPES, QUANTIZATIONS, AdapterCacheConfig, EngineConfig, ModelConfig
from .errors import InvalidArgument


def _data_dir() -> str:
    return os.path.expanduser("~/.local/share/hotswap")


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerOptions:
    # network
    host: str = _opt("0.0.0.0", "address the gRPC server binds")
    port: int = _opt(50051, "gRPC port (0 picks a free one; the chosen port is printed)")
    metrics_host: str = _opt("0.0.0.0", "address of the Prometheus /metrics HTTP server")
    metrics_port: int = _opt(9400, "Prometheus /metrics port; -1 disables it")
    http_port: int = _opt(0, "OpenAI-compatible HTTP API port (/v1/chat/completions, /v1/completions, /v1/models) on --host; 0 = off")
    served_model_name: str = _opt("", "the base model's name in the HTTP API's `model` field and /v1/models (default: the model's own name)")
    # model
    model: str = _opt("default", "base model: a local HF folder, a hub id in the local HF cache, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    quantization: str = _opt("auto", "bitsandbytes quantization of the base; auto = nf4 when the model runs on CUDA, none on CPU "
                                     "(bitsandbytes' 4-bit kernels are slow there)", choices=("auto", *QUANTIZATIONS))
    dtype: str = _opt("auto", "weights/compute dtype; auto = bf16 on CUDA and bf16-capable CPUs, else fp32", choices=DTYPES)
    device: str = _opt("auto", "auto (CUDA when present), cpu or cuda[:N]")
    double_quant: bool = _opt(True, "nf4: also quantize the quantization constants")
    model_cache_dir: str = _opt(os.path.expanduser("~/.cache/hotswap"), "where GGUF models are converted once to safetensors")
    # engine
    max_batch_size: int = _opt(64, "rows decoded together in one step")
    max_tokens_per_step: int = _opt(2048, "token budget of one step: one per decoding row, the rest for prompt chunks (long prompts are spread over steps)")
    max_decode_slowdown: float = _opt(2.5, "while rows decode, a step carrying prompt chunks may take at most this many times a decode-only step (chunks sized from measured step times), unless more rows wait for their first token than decode; 0 = off")
    max_queue: int = _opt(1024, "requests waiting for a row; more get RESOURCE_EXHAUSTED")
    max_seq_len: int = _opt(0, "longest row (virtual tokens + prompt + generated); 0 = the model's context length; longer requests get INVALID_ARGUMENT")
    kv_cache_mb: int = _opt(0, "paged KV cache budget, MiB; 0 = automatic (CUDA: 0.85 × the memory free after loading the weights; CPU: 0.1 × physical RAM)")
    enable_prefix_caching: bool = _opt(True, "reuse cached KV blocks of prompts that start the same way (per adapter version)")
    max_loras: int = _opt(64, "LoRA adapters usable in one batch (device slots); requests for more wait for a slot")
    max_expert_loras: int = _opt(4, "of those slots, how many may hold an adapter with LoRA on MoE expert / router weights (each holds every expert's A and B; on a MoE model the default CUDA KV budget leaves room for them at rank 16)")
    attention_backend: str = _opt("auto", "auto (native kernels on CPU when they build, Triton on CUDA when it imports, else torch), native, triton, or torch (the reference path)", choices=BACKENDS)
    prepack_linears: bool = _opt(True, "bf16 on CPU: also keep each linear's weight in oneDNN's blocked layout (packed once, not on every call: "
                                       "faster matmuls for about the linears' weight size in extra memory)")
    decode_graphs: bool = _opt(False, "decode-only steps from fixed buffers padded to bucket sizes, captured as CUDA graphs and replayed on CUDA")
    # adapters
    data_dir: str = _opt(_data_dir(), "holds the registry database and the adapter store unless those are set")
    registry_db: str = _opt("", "adapter registry: a SQLite file, or a postgresql:// URL when several nodes write (default: DATA_DIR/registry.sqlite)")
    adapter_store: str = _opt("", "registered adapter files: a folder, or an fsspec URL such as s3://bucket/adapters shared by several nodes (default: DATA_DIR/adapters)")
    adapter_cache_dir: str = _opt("", "node-local copy of a remote adapter store (default: DATA_DIR/adapter-cache)")
    adapter_device_cache_mb: int = _opt(512, "byte budget of adapters on the device, MiB")
    adapter_host_cache_mb: int = _opt(2048, "byte budget of adapters in host RAM, MiB")
    max_lora_rank: int = _opt(64, "LoRA adapters of a higher rank are refused")
    # tuner
    jobs_db: str = _opt("", "training job store: a SQLite file, or a postgresql:// URL (default: DATA_DIR/jobs.sqlite)")
    tuner_workers: int = _opt(1, "training workers the server starts beside itself (0: run hotswap-tuner separately)")
    max_upload_mb: int = _opt(1024, "largest dataset accepted by UploadDataset, MiB")
    max_uploads_total_mb: int = _opt(10240, "all uploaded datasets together, MiB; past it UploadDataset is refused until uploads are deleted (DeleteUpload)")
    max_inline_dataset_mb: int = _opt(8, "largest inline dataset (train + validation examples in the TrainAdapter message), MiB; "
                                         "larger ones go through UploadDataset")
    tuner_stale_seconds: float = _opt(60.0, "a running job whose worker has not reported for this long is requeued and resumes from its last checkpoint")
    # security
    tls_cert: str = _opt("", "PEM server certificate; enables TLS (with --tls-key)")
    tls_key: str = _opt("", "PEM private key of the server certificate")
    tls_client_ca: str = _opt("", "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)")
    auth_token: str = _opt("", "when set, calls must carry 'authorization: Bearer <token>' (health checks are exempt)")
    public_reflection: bool = _opt(False, "with --auth-token, let server reflection answer without a token")
    allowed_data_dir: str = _opt("", f"more folders (separated by '{os.pathsep}') under which TrainAdapter may read train.uri / validation.uri; "
                                     "DATA_DIR/uploads (where UploadDataset stores files) is always allowed")
    allowed_adapter_dir: str = _opt("", f"folders (separated by '{os.pathsep}') under which RegisterAdapter may read source_uri "
                                        "(default: DATA_DIR/imports)")
    allowed_uri_schemes: str = _opt("", "URL schemes (comma-separated, e.g. s3,gs) that dataset and adapter URIs may use; none by default "
                                        "(file:// counts as a local path)")
    # lifecycle
    drain_seconds: float = _opt(30.0, "on SIGTERM, how long in-flight requests may take to finish")
    drain_notice_seconds: float = _opt(1.0, "on SIGTERM, how long health reports NOT_SERVING (and new calls get UNAVAILABLE) "
                                            "before the listener closes, so health watchers and load balancers stop routing first")
    max_message_mb: int = _opt(64, "largest gRPC message, MiB, either way")
    keepalive_seconds: int = _opt(30, "HTTP/2 keepalive ping interval for long streams")
    log_level: str = _opt("INFO", "Python logging level")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"must be 0..65535, got {self.port}", field="port")
        if not 0 <= self.http_port <= 65535:
            raise InvalidArgument(f"must be 0 (off) or a port 1..65535, got {self.http_port}", field="http_port")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"must be -1..65535, got {self.metrics_port}", field="metrics_port")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("give both --tls-cert and --tls-key", field="tls_cert")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgument("mutual TLS needs the server's own --tls-cert and --tls-key", field="tls_client_ca")
        for name in ("drain_seconds", "drain_notice_seconds"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise InvalidArgument("must be a finite number >= 0", field=name)

    # -- derived configs ----------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return ModelConfig(source=self.model, quantization=self.quantization_choice()[0], double_quant=self.double_quant,
                           dtype=self.dtype, device=self.device, cache_dir=Path(self.model_cache_dir))

    def quantization_choice(self) -> tuple[str, str]:
        """(quantization, why): --quantization, or what "auto" picks for the device."""
        from .hardware import choose_quantization, resolve_device  # torch: only when a model is about to load

        return choose_quantization(self.quantization, resolve_device(self.device) if self.quantization == "auto" else None)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_batch_size=self.max_batch_size, max_tokens_per_step=self.max_tokens_per_step,
                            max_queue=self.max_queue, max_seq_len=self.max_seq_len, max_decode_slowdown=self.max_decode_slowdown, kv_cache_bytes=self.kv_cache_mb * 2**20,
                            enable_prefix_caching=self.enable_prefix_caching, max_loras=self.max_loras, max_expert_loras=self.max_expert_loras,
                            attention_backend=self.attention_backend, prepack_linears=self.prepack_linears,
                            decode_graphs=self.decode_graphs)

    def cache_config(self) -> AdapterCacheConfig:
        return AdapterCacheConfig(device_bytes=self.adapter_device_cache_mb * 2**20,
                                  host_bytes=self.adapter_host_cache_mb * 2**20, max_lora_rank=self.max_lora_rank)

    @property
    def registry_path(self) -> str:
        return self.registry_db or str(Path(self.data_dir) / "registry.sqlite")

    @property
    def jobs_path(self) -> str:
        return self.jobs_db or str(Path(self.data_dir) / "jobs.sqlite")

    @property
    def jobs_dir(self) -> Path:
        """Checkpoints and outputs of training jobs."""
        return Path(self.data_dir) / "jobs"

    @property
    def uploads_dir(self) -> Path:
        """Datasets streamed in with UploadDataset (workers on other machines need it on shared storage)."""
        return Path(self.data_dir) / "uploads"

    @property
    def imports_dir(self) -> Path:
        """The default folder RegisterAdapter may read adapters from."""
        return Path(self.data_dir) / "imports"

    def data_policy(self) -> SourcePolicy:
        roots = [self.uploads_dir, *split_list(self.allowed_data_dir)]
        return SourcePolicy.of(roots, split_list(self.allowed_uri_schemes), "--allowed-data-dir")

    def adapter_policy(self) -> SourcePolicy:
        roots = split_list(self.allowed_adapter_dir) or [self.imports_dir]
        return SourcePolicy.of(roots, split_list(self.allowed_uri_schemes), "--allowed-adapter-dir")

    @property
    def store_path(self) -> str:
        return self.adapter_store or str(Path(self.data_dir) / "adapters")

    @property
    def adapter_cache_path(self) -> str:
        return self.adapter_cache_dir or str(Path(self.data_dir) / "adapter-cache")


def _env_name(name: str) -> str:
    return "HOTSWAP_" + name.upper()


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def build_parser(prog: str = "hotswap-server") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="hotswap gRPC server: one base model, every PEFT adapter type, one continuous batch.",
        epilog="Every option also reads HOTSWAP_<NAME> from the environment (e.g. HOTSWAP_PORT) and <name> from "
        "the TOML file given by --config (e.g. port = 50051). Precedence: flag > environment > config file > default.",
    )
    ap.add_argument("--config", default=os.environ.get("HOTSWAP_CONFIG", ""),
                    help="TOML file with option values (env HOTSWAP_CONFIG)")
    for f in dataclasses.fields(ServerOptions):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r}; env {_env_name(f.name)})"
        if f.type in ("bool", bool):
            ap.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            ap.add_argument(flag, default=None, type=_type_of(f), choices=f.metadata.get("choices"), help=help_text)
    return ap


def _type_of(f: dataclasses.Field):
    return {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)


def parse_options(argv: list[str] | None = None, environ: dict[str, str] | None = None, prog: str = "hotswap-server") -> ServerOptions:
    environ = os.environ if environ is None else environ
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    from_file: dict = {}
    if args.config:
        try:
            from_file = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            ap.error(f"--config {args.config}: {e}")
        known = {f.name for f in dataclasses.fields(ServerOptions)}
        unknown = sorted(set(from_file) - known)
        if unknown:
            ap.error(f"--config {args.config}: unknown option(s) {', '.join(unknown)}")
    values = {}
    for f in dataclasses.fields(ServerOptions):
        value = getattr(args, f.name)
        if value is None and _env_name(f.name) in environ:
            raw = environ[_env_name(f.name)]
            try:
                value = _parse_bool(raw) if f.type in ("bool", bool) else _type_of(f)(raw)
            except ValueError as e:
                ap.error(f"{_env_name(f.name)}={raw!r}: {e}")
        if value is None and f.name in from_file:
            value = from_file[f.name]
        if value is not None:
            values[f.name] = value
    try:
        return ServerOptions(**values)
    except InvalidArgument as e:
        ap.error(str(e))


def options_from_dict(values: dict) -> ServerOptions:
    """ServerOptions from a mapping whose values may be strings (e.g. `serve run ... key=value`)."""
    fields = {f.name: f for f in dataclasses.fields(ServerOptions)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidArgument(f"unknown option(s) {', '.join(unknown)}", field=unknown[0])
    typed = {}
    for name, value in values.items():
        f = fields[name]
        if isinstance(value, str) and f.type in ("bool", bool):
            value = _parse_bool(value)
        elif isinstance(value, str):
            value = _type_of(f)(value)
        typed[name] = value
    return ServerOptions(**typed)
