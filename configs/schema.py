"""Typed configuration: one dataclass per section of a config file (configs/*.toml).

Both sides use these: the device side (workers/) reads the model, sampling and drafter
settings it is handed; the host side (runtime/) reads them all. configs.files turns a
TOML file into a validated LeapfrogConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Everything that drafts (runtime.decoding.proposers); all but "pld" start a tree, "pld" also grafts onto one.
PROPOSERS = ("ht", "medusa", "pass", "eagle", "early-exit", "token-recycling", "draft", "pld")
TREE_STARTERS = PROPOSERS[:7]
DRAFTER_KINDS = ("ht", "medusa", "pass")  # the pseudo-state drafters (workers.drafters.pseudo_states)
# Matrix-product kernels of the model (workers.kernels): auto (native where it runs, else
# torch), native (our CPU kernels on the fastest path this CPU has), a path of them by name
# (amx, avx512, avx2: an error where the CPU lacks it), or torch.
KERNELS = ("auto", "native", "amx", "avx512", "avx2", "torch")
# The linear layers' weights: "float" (de-quantized to the model's dtype), "shipped" (the
# GGUF file's own quantized blocks, multiplied as they are with x in float32:
# workers.gguf_weights) or "shipped-int8" (the same blocks, x quantized to int8 per block
# of 32 first, as llama.cpp does: faster one-row steps, llama.cpp's rounding).
WEIGHTS = ("float", "shipped", "shipped-int8")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    checkpoint: str = "default"
    dtype: str = "float32"
    device: str = "auto"
    max_context: int = 2048
    kernels: str = "auto"  # matrix products: auto | native | amx | avx512 | avx2 | torch (workers.kernels)
    cuda_graphs: bool = True  # on CUDA, decoder layers replay captured graphs (workers.graphed_layers)
    weights: str = "float"  # linear weights: float (in dtype) | shipped | shipped-int8 (the GGUF file's blocks; CPU)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        return torch_device(self.device)


def torch_device(name: str) -> torch.device:
    """"auto" (cuda when available, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class GenerationConfig:
    mode: str = "ht"  # the fastest lossless mode (docs/results.md); "ar" is plain decoding
    max_new_tokens: int = 128


@dataclass
class SamplingConfig:
    """How the next token is chosen. temperature 0 is greedy; otherwise tokens are drawn
    from softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the
    smallest set whose probability reaches top_p. Every mode draws with exactly this
    distribution, and with the same seed every lossless mode draws the same tokens as ar
    (workers.sampling)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()  # a SamplingConfig that exists is a valid one (fields set later: validate() again)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> SamplingConfig:
        """Every value in range and of its type: they travel to the workers in msgpack
        messages (64-bit integers), so a value that would not is refused here, once."""
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63  # noqa: E731
        if not (number(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise ConfigError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not integer(self.top_k):
            raise ConfigError(f"top_k must be an int in [0, 2**63) (0: off), got {self.top_k!r}")
        if not (number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not integer(self.seed):
            raise ConfigError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        return self


@dataclass
class PseudoStateModeConfig:
    """The [ht], [medusa] and [pass] sections: a pseudo-state drafter's trained weights
    (workers.drafters.pseudo_states) and the token tree it drafts each step."""

    weights: str = "default"  # "default" (shipped for the default model) or a .safetensors path
    budget: int = 8  # tree nodes per step, root included
    top_k: int = 8  # candidates per draft depth
    depth: int = 0  # draft depth used; 0 = every pseudo position of the weights
    pseudo_nodes: int = 2  # tree nodes (highest-scoring) that get pseudo states
    prior: str = "off"  # "off", "default" (the shipped successor prior, where one ships) or a .safetensors path


@dataclass
class HiddenTransferModeConfig(PseudoStateModeConfig):
    """The [ht] section: hidden-transfer trees, each node's children rescored under its own
    token (the successor prior)."""

    prior: str = "default"


@dataclass
class SpeculationConfig:
    """The [speculation] section: the proposers of mode `spec`, in the order they build a
    tree (the first starts it; pseudo-state drafts and EAGLE can only start it). The
    named modes are presets of the same (runtime.modes.PRESETS)."""

    proposers: list[str] = field(default_factory=lambda: ["ht", "pld"])

    def checked(self) -> tuple[str, ...]:
        names = tuple(self.proposers)
        unknown = [n for n in names if n not in PROPOSERS]
        if not names or unknown:
            raise ConfigError(f"[speculation] proposers must name some of {', '.join(PROPOSERS)}, got {list(names)}")
        if any(n in TREE_STARTERS for n in names[1:]):
            raise ConfigError(f"[speculation] proposers: {', '.join(TREE_STARTERS)} can only come first, got {list(names)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"[speculation] proposers: each at most once, got {list(names)}")
        return names


@dataclass
class PldConfig:
    """Prompt lookup (mode "pld", and grafted onto ht trees in "ht-pld"): drafts copied
    from the context after an n-gram match."""

    min_ngram: int = 1
    max_ngram: int = 3
    depth: int = 10  # drafted tokens per step (a chain)


@dataclass
class TokenRecyclingConfig:
    """Token recycling (mode "token-recycling"): adjacency table of the target's top-k next tokens."""

    top_k: int = 8  # next tokens kept per vocabulary token (>= 5, the template's ranks)
    budget: int = 8  # tree nodes per step, root included (a prefix of workers.tree.DEFAULT_TEMPLATE)


@dataclass
class EarlyExitConfig:
    """Early-exit self-drafting (mode "early-exit"): a chain from the first layers."""

    layer: int = 25  # layers that draft (then the final norm and LM head); 0 = half the layers
    depth: int = 2  # drafted tokens per step (a chain)


@dataclass
class EagleModeConfig:
    """Mode "eagle": the EAGLE-2 peer (workers.drafters.eagle), a one-layer draft model over
    the target's features drafting a dynamic tree."""

    weights: str = "default"  # "default" (shipped for the default model) or a .safetensors path
    depth: int = 3  # draft-model calls per step: the tree's depth
    top_k: int = 4  # children drafted per expanded node, and nodes expanded per depth
    budget: int = 8  # tree nodes per step, root included (then cut by [tree_sizing])


@dataclass
class DraftModelConfig:
    """Mode "draft": a separate, smaller model of the same vocabulary drafts a tree
    (workers.drafters.draft_model): `depth` calls of the draft model per step, each
    expanding its `top_k` best nodes by `top_k` children (top_k 1: a chain). Mode
    `async` with a draft model grows its tree the same way on the drafter worker
    (workers.drafters.draft_tree, no depth) and verifies `budget` nodes of it a step.
    Both draft among the `vocab` most frequent tokens only (workers.drafters.draft_vocabulary)."""

    checkpoint: str = "auto"  # auto: the one paired with the target (qwen2.5-coder-1.5b -> qwen2.5-coder-0.5b); or any checkpoint name
    depth: int = 4  # draft-model calls per step: the tree's depth
    top_k: int = 2  # children per expanded node; nodes expanded per depth
    budget: int = 8  # tree nodes per step, root included (then cut by [tree_sizing])
    min_prob: float = 0.1  # stop drafting deeper once the best path of a depth is drafted less likely than this (0: never)
    vocab: int = 32768  # draft only the most frequent tokens of ShareGPT's training replies (FR-Spec); 0: the whole vocabulary


@dataclass
class TreeSizingConfig:
    """How big each step's tree is (workers.tree_sizing): cut, step by step, to the nodes
    whose expected acceptance pays for their rows on this device's step cost t(n), or the
    drafters' fixed budgets."""

    cost: str = "auto"  # auto: this device's t(n), measured once and cached | off: fixed budgets | a `leapfrog profile` JSON
    # While other replies share the passes (workers.batched_step): "sized" (trees sized for
    # the whole pass), "plain" (every step plain), "auto" (plain on a CPU, where trees in
    # shared passes measured slower than plain steps: docs/serving.md; sized elsewhere)
    shared: str = "auto"


@dataclass
class DrafterConfigs:
    """Every drafter's settings; each is a [section] of its own in config files."""

    ht: PseudoStateModeConfig = field(default_factory=HiddenTransferModeConfig)
    medusa: PseudoStateModeConfig = field(default_factory=PseudoStateModeConfig)
    pass_: PseudoStateModeConfig = field(default_factory=PseudoStateModeConfig)  # [pass] in files ("pass" is a Python keyword)
    pld: PldConfig = field(default_factory=PldConfig)
    token_recycling: TokenRecyclingConfig = field(default_factory=TokenRecyclingConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)
    eagle: EagleModeConfig = field(default_factory=EagleModeConfig)
    draft: DraftModelConfig = field(default_factory=DraftModelConfig)
    tree_sizing: TreeSizingConfig = field(default_factory=TreeSizingConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    def validate(self) -> DrafterConfigs:
        for name, tree in (("ht", self.ht), ("medusa", self.medusa), ("pass", self.pass_)):
            if min(tree.budget, tree.top_k, tree.pseudo_nodes) < 1 or tree.depth < 0:
                raise ConfigError(f"[{name}] budget, top_k and pseudo_nodes must be >= 1 and depth >= 0: {tree}")
        pld = self.pld
        if not 1 <= pld.min_ngram <= pld.max_ngram or pld.depth < 1:
            raise ConfigError(f"[pld] needs 1 <= min_ngram <= max_ngram and depth >= 1: {pld}")
        if self.token_recycling.top_k < 5 or self.token_recycling.budget < 1:
            raise ConfigError(f"[token_recycling] needs top_k >= 5 and budget >= 1: {self.token_recycling}")
        if self.early_exit.layer < 0 or self.early_exit.depth < 1:
            raise ConfigError(f"[early_exit] needs layer >= 0 and depth >= 1: {self.early_exit}")
        if min(self.eagle.depth, self.eagle.top_k, self.eagle.budget) < 1:
            raise ConfigError(f"[eagle] depth, top_k and budget must be >= 1: {self.eagle}")
        d = self.draft
        if min(d.depth, d.top_k, d.budget) < 1 or not 0.0 <= d.min_prob < 1.0 or not d.checkpoint:
            raise ConfigError(f"[draft] depth, top_k and budget must be >= 1, min_prob in [0, 1), checkpoint set: {d}")
        if not self.tree_sizing.cost:
            raise ConfigError('[tree_sizing] cost must be "auto", "off" or a profile file (leapfrog profile --out)')
        self.speculation.checked()
        if self.tree_sizing.shared not in ("auto", "sized", "plain"):
            raise ConfigError(f'[tree_sizing] shared must be "auto", "sized" or "plain", got {self.tree_sizing.shared!r}')
        return self


@dataclass
class RuntimeConfig:
    threads: int = 2


PIPELINE_POLICIES = ("chain", "fanout")
ASYNC_DRAFTERS = ("auto", "early-exit", "draft")  # what drafts on the async drafter worker
TRANSPORTS = ("ray", "local")


@dataclass
class PipelineConfig:
    """Modes `pipeline` and `async`: several workers, each a model replica (runtime.pipeline.coordinator)."""

    workers: int = 2  # model replicas; one Ray actor each (one GPU, or one CPU core)
    transport: str = "ray"  # ray (actors) | local (threads in this process, sharing one replica)
    threads: int = 1  # torch threads per worker on the CPU
    policy: str = "chain"  # chain: a prediction seeds one step | fanout: one per alternative too
    predict_layer: int = 0  # layers after which a step predicts its walk (early exit); 0 = from the drafts at launch
    confidence: float = 0.5  # drafts-based prediction: descend to a child drafted at least this likely
    alternatives: int = 2  # next-best bonus tokens per prediction (leaves, or fanout steps)
    continuation_budget: int = 6  # nodes drafted after the predicted trunk
    lookup: bool = True  # graft prompt-lookup chains ([pld] settings) onto every tree
    drafter: str = "auto"  # async: what drafts on worker 0: early-exit (the target's first layers) | draft (the
    # [draft] model; worker 0 then only drafts) | auto: draft where a draft model is paired with the checkpoint
    drafter_layer: int = 8  # async: the drafting worker's early-exit layers
    draft_chunk: int = 0  # async: forwards per drafting call; 0: 1 for a draft model's tree, 2 for early-exit chains
    max_chain: int = 8  # async: drafted tokens kept ahead of the committed ones
    step_timeout: float = 60.0  # seconds a worker may take for a step (or an abort) before it is restarted
    start_timeout: float = 300.0  # seconds a worker may take to start (its replica placed and loaded)

    def validate(self) -> PipelineConfig:
        if self.policy not in PIPELINE_POLICIES or self.transport not in TRANSPORTS or self.drafter not in ASYNC_DRAFTERS:
            raise ConfigError(f"[pipeline] policy must be one of {PIPELINE_POLICIES}, transport one of {TRANSPORTS}, "
                              f"drafter one of {ASYNC_DRAFTERS}: {self}")
        if min(self.workers, self.threads, self.drafter_layer, self.max_chain) < 1 or self.draft_chunk < 0:
            raise ConfigError(f"[pipeline] workers, threads, drafter_layer, max_chain must be >= 1, draft_chunk >= 0: {self}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"[pipeline] confidence must be in (0, 1), got {self.confidence}")
        if min(self.predict_layer, self.alternatives, self.continuation_budget) < 0 or not min(self.step_timeout, self.start_timeout) > 0:
            raise ConfigError(
                f"[pipeline] predict_layer, alternatives, continuation_budget must be >= 0, step_timeout and start_timeout > 0: {self}"
            )
        return self


# Config-file sections of DrafterConfigs fields, where the two differ.
DRAFTER_SECTIONS = {"pass_": "pass"}


@dataclass
class ServerConfig:
    """`leapfrog serve`: where it listens, what it admits and who may use it
    (runtime/serving/, docs/serving.md has every limit)."""

    host: str = "127.0.0.1"
    port: int = 7860  # native protocol: length-prefixed msgpack frames over TCP (0: any free port)
    http_port: int = 7861  # OpenAI-compatible HTTP endpoint (-1: off, 0: any free port)
    concurrency: int = 1  # requests decoding at once; each has its own engine (a KV cache on the shared model)
    max_queue: int = 64  # requests waiting for an engine; more are refused (code "overloaded")
    max_connections: int = 256  # open native connections; more are refused ("too_many_connections")
    max_http_connections: int = 256  # open HTTP connections; more get a 429 and are closed
    max_connections_per_peer: int = 32  # open connections from one address, on each endpoint
    max_connections_per_range: int = 64  # open connections from one address range (IPv4 /24, IPv6 /48), on each endpoint
    max_pending_per_connection: int = 2  # a connection's requests not yet finished (detached ones too)
    max_frame_bytes: int = 1 << 20  # largest frame (or HTTP body) a client may send
    max_prompt_bytes: int = 65536  # prompt text in UTF-8 bytes (messages summed), checked before tokenizing
    max_new_tokens: int = 2048  # upper limit on a request's max_new_tokens
    idle_timeout: float = 60.0  # seconds a connection may sit with no request running and none sent
    request_timeout: float = 10.0  # seconds for a request (HTTP headers and body, a native frame) to arrive once begun
    write_timeout: float = 30.0  # seconds a client may leave a reply unread before its connection is closed
    allowed_modes: list = field(default_factory=list)  # modes requests may name; empty: the server's and the single-worker lossless ones
    api_key: str = ""  # required of clients when set ("" here: $LEAPFROG_API_KEY, if set)
    insecure: bool = False  # allow listening beyond the loopback without an API key
    fresh_seed: bool = True  # a request without a seed samples with a fresh random one (reported back); false: [sampling] seed


@dataclass
class LeapfrogConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    drafters: DrafterConfigs = field(default_factory=DrafterConfigs)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def validate(self) -> LeapfrogConfig:
        if self.model.kernels not in KERNELS:
            raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, got {self.model.kernels!r}")
        if self.model.weights not in WEIGHTS:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.model.weights!r}")
        if self.model.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.model.dtype!r}")
        if self.model.max_context < 2:
            raise ConfigError(f"max_context must be at least 2, got {self.model.max_context}")
        if self.generation.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.generation.max_new_tokens}")
        self.sampling.validate()
        self.drafters.validate()
        if self.runtime.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.runtime.threads}")
        self.pipeline.validate()
        self.validate_server()
        return self

    def validate_server(self) -> None:
        s = self.server
        if not 0 <= s.port <= 65535 or not -1 <= s.http_port <= 65535:
            raise ConfigError(f"[server] port must be in [0, 65535] and http_port in [-1, 65535]: {s}")
        if s.port == s.http_port != 0:
            raise ConfigError(f"[server] port and http_port are both {s.port}")
        if min(s.concurrency, s.max_connections, s.max_new_tokens) < 1 or s.max_queue < 0:
            raise ConfigError(f"[server] concurrency, max_connections, max_new_tokens must be >= 1, max_queue >= 0: {s}")
        if s.max_frame_bytes < 1024:
            raise ConfigError(f"[server] max_frame_bytes must be at least 1024, got {s.max_frame_bytes}")
        limits = (s.max_http_connections, s.max_connections_per_peer, s.max_pending_per_connection, s.max_prompt_bytes)
        if min(limits) < 1:
            raise ConfigError(f"[server] max_http_connections, max_connections_per_peer, max_pending_per_connection, "
                              f"max_prompt_bytes must be >= 1: {s}")
        if s.max_connections_per_range < 1:
            raise ConfigError(f"[server] max_connections_per_range must be >= 1, got {s.max_connections_per_range}")
        if not s.idle_timeout > 0 or not s.write_timeout > 0:
            raise ConfigError(f"[server] idle_timeout and write_timeout must be > 0 seconds: {s}")
        if not s.request_timeout > 0:
            raise ConfigError(f"[server] request_timeout must be > 0 seconds, got {s.request_timeout}")
        if not all(isinstance(m, str) for m in s.allowed_modes):
            raise ConfigError(f"[server] allowed_modes must be a list of mode names, got {s.allowed_modes!r}")
