"""Server options: flag > environment > config file > default, and --help documents them all."""
from __future__ import annotations

import dataclasses

import pytest

from hotswap.server.options import ServerOptions, build_parser, parse_options


def test_precedence_flag_env_file_default(tmp_path):
    cfg = tmp_path / "hotswap.toml"
    cfg.write_text('port = 6000\nmax_batch_size = 8\nquantization = "nf4"\ndouble_quant = false\n')
    env = {"HOTSWAP_PORT": "7000", "HOTSWAP_MAX_QUEUE": "5", "HOTSWAP_DOUBLE_QUANT": "true"}
    opts = parse_options(["--config", str(cfg), "--port", "8000"], env)
    assert opts.port == 8000  # flag beats env and file
    assert opts.max_queue == 5  # env
    assert opts.max_batch_size == 8 and opts.quantization == "nf4"  # file
    assert opts.double_quant is True  # env beats file
    assert opts.max_seq_len == ServerOptions.max_seq_len  # default
    assert parse_options(["--no-double-quant"], {}).double_quant is False
    assert opts.engine_config().max_batch_size == 8 and opts.model_config().quantization == "nf4"


def test_bad_values_exit_with_the_option_named(tmp_path, capsys):
    for argv, env, needle in [
        (["--quantization", "fp3"], {}, "quantization"),
        (["--port", "70000"], {}, "port"),
        ([], {"HOTSWAP_PORT": "many"}, "HOTSWAP_PORT"),
        (["--tls-cert", "x.pem"], {}, "tls"),
    ]:
        with pytest.raises(SystemExit):
            parse_options(argv, env)
        assert needle in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(SystemExit):
        parse_options(["--config", str(bad)], {})
    assert "unknown option(s) prot" in capsys.readouterr().err


def test_help_documents_every_option_with_default_and_env():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(ServerOptions):
        assert "--" + f.name.replace("_", "-") in text
        assert f"env HOTSWAP_{f.name.upper()}" in text


def test_quantization_auto_is_nf4_on_cuda_and_none_on_cpu_and_says_why():
    import torch

    from hotswap.server.hardware import choose_quantization

    assert parse_options([], {}).quantization == "auto"
    q, why = choose_quantization("auto", torch.device("cuda", 0))
    assert q == "nf4" and "CUDA" in why
    q, why = choose_quantization("auto", torch.device("cpu"))
    assert q == "none" and "slow on CPU" in why
    assert choose_quantization("int8", torch.device("cpu")) == ("int8", "set with --quantization")
    opts = parse_options(["--device", "cpu"], {})
    assert opts.quantization_choice()[0] == opts.model_config().quantization == "none"


