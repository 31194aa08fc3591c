"""TOML configuration: defaults, overrides and errors."""

from __future__ import annotations

import pytest
import torch

from configs.files import CONFIG_DIR, load_config
from configs.schema import (
    ConfigError,
    GenerationConfig,
    LeapfrogConfig,
    ModelConfig,
    PipelineConfig,
    RuntimeConfig,
    SamplingConfig,
    ServerConfig,
)


def write(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_default_file_gives_dataclass_defaults():
    assert (CONFIG_DIR / "default.toml").is_file()
    config = load_config()
    assert config == LeapfrogConfig()
    assert config == load_config(CONFIG_DIR / "default.toml")
    assert config.model == ModelConfig(checkpoint="default", dtype="float32", device="auto", max_context=2048)
    assert config.generation == GenerationConfig(mode="ht", max_new_tokens=128)
    assert config.runtime == RuntimeConfig(threads=2)
    assert config.model.torch_dtype() is torch.float32


def test_empty_file_keeps_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == LeapfrogConfig()


def test_partial_override(tmp_path):
    config = load_config(write(tmp_path, '[model]\ndtype = "bfloat16"\n[generation]\nmax_new_tokens = 7\n'))
    assert config.model.dtype == "bfloat16" and config.model.torch_dtype() is torch.bfloat16
    assert config.model.checkpoint == "default" and config.model.max_context == 2048
    assert config.generation.max_new_tokens == 7 and config.generation.mode == "ht"
    assert config.runtime.threads == 2


def test_torch_device():
    assert ModelConfig(device="cpu").torch_device() == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ModelConfig(device="auto").torch_device().type == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("[sampler]\ntemperature = 0.5\n", "unknown sections.*sampler"),
        ("[sampling]\ntemperature = -0.5\n", "temperature must be a number in"),
        ("[sampling]\ntop_p = 0\n", "top_p must be a number in"),
        ("[sampling]\ntop_k = -1\n", "top_k must be an int in"),
        ("[model]\nquantize = true\n", "unknown keys.*quantize"),
        ("[runtime]\nthread = 4\n", "unknown keys.*thread"),
        ('[runtime]\nthreads = "4"\n', "threads must be int"),
        ("[model]\nmax_context = 2048.0\n", "max_context must be int"),
        ("[runtime]\nthreads = true\n", "threads must be int"),
        ("[model]\ncheckpoint = 3\n", "checkpoint must be str"),
        ("[generation]\nmode = [\"ar\"]\n", "mode must be str"),
        ('[model]\ndtype = "float64"\n', "dtype must be one of"),
        ('[model]\ndtype = "fp16"\n', "dtype must be one of"),
        ('[model]\nkernels = "fast"\n', "kernels must be one of auto, native, amx, avx512, avx2, torch"),
        ('[model]\ncuda_graphs = "yes"\n', "cuda_graphs must be bool"),
        ("[runtime]\nthreads = 0\n", "threads must be at least 1"),
        ("[generation]\nmax_new_tokens = 0\n", "max_new_tokens must be at least 1"),
        ("[model]\nmax_context = 1\n", "max_context must be at least 2"),
        ('[ht]\ntree = "dynamic"\n', "unknown keys \\['tree'\\]"),
        ('[speculation]\nproposers = ["pld", "ht"]\n', "can only come first"),
        ("[ht]\nbudget = 0\n", "budget, top_k and pseudo_nodes must be >= 1"),
        ("[eagle]\ntop_k = 0\n", "eagle.*depth, top_k and budget must be >= 1"),
        ('[tree_sizing]\nshared = "always"\n', 'shared must be "auto", "sized" or "plain"'),
        ("[server]\nport = 70000\n", "port must be in"),
        ("[server]\nhttp_port = -2\n", "http_port in"),
        ("[server]\nport = 9000\nhttp_port = 9000\n", "both 9000"),
        ("[server]\nconcurrency = 0\n", "concurrency, max_connections, max_new_tokens must be >= 1"),
        ("[server]\nmax_queue = -1\n", "max_queue >= 0"),
        ("[server]\nmax_frame_bytes = 100\n", "max_frame_bytes must be at least 1024"),
        ("[server]\nidle_timeout = 0\n", "idle_timeout and write_timeout must be > 0"),
        ("[server]\nwrite_timeout = -1\n", "idle_timeout and write_timeout must be > 0"),
        ("[server]\nmax_connections_per_peer = 0\n", "max_connections_per_peer"),
        ("[server]\nallowed_modes = [1]\n", "allowed_modes must be a list"),
        ('[server]\nport = "7860"\n', "port must be int"),
        ("[server]\nworkers = 2\n", "unknown keys.*workers"),
        ("[model\ndtype = 'float32'\n", "not valid TOML"),
        ("model.dtype = \n", "not valid TOML"),
    ],
)
def test_bad_config(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_server_section(tmp_path):
    assert load_config().server == ServerConfig()
    config = load_config(write(tmp_path, '[server]\nhost = "0.0.0.0"\nport = 0\nhttp_port = -1\nidle_timeout = 5\n'))
    assert config.server.host == "0.0.0.0" and config.server.port == 0 and config.server.http_port == -1
    assert config.server.idle_timeout == 5.0 and config.server.max_queue == ServerConfig().max_queue


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(top_k=2**64), "top_k must be an int in"),  # would not fit a worker message (issue 16)
        (dict(top_k=2**63), "top_k must be an int in"),
        (dict(top_k=2.5), "top_k must be an int in"),
        (dict(seed=True), "seed must be an int in"),
        (dict(temperature="0.7"), "temperature must be a number in"),
        (dict(top_p=float("nan")), "top_p must be a number in"),
    ],
)
def test_sampling_values_outside_their_ranges_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**fields)
    assert SamplingConfig(0.5, 2**63 - 1, 0.5, 2**63 - 1).top_k == 2**63 - 1


def test_validate_catches_bad_overrides():
    config = LeapfrogConfig()
    config.model.dtype = "int8"
    with pytest.raises(ConfigError, match="dtype"):
        config.validate()


def test_pipeline_config_is_checked():
    with pytest.raises(ConfigError, match="policy"):
        PipelineConfig(policy="guess").validate()
    with pytest.raises(ConfigError, match="workers"):
        PipelineConfig(workers=0).validate()
    with pytest.raises(ConfigError, match="confidence"):
        PipelineConfig(confidence=1.5).validate()
