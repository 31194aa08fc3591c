"""Every proposer by name, built from an engine's config: the pieces the modes' presets
(runtime.modes.PRESETS) and `[speculation] proposers` compose.

    ht, medusa, pass   pseudo-state drafts inside the verifying pass ([ht], [medusa], [pass])
    eagle              the EAGLE-2 peer's draft model over the target's features ([eagle])
    early-exit         the target's first layers draft a chain ([early_exit])
    token-recycling    a table of the target's recent top-k next tokens ([token_recycling])
    draft              a separate draft model of the same vocabulary ([draft])
    pld                the prompt-lookup chain ([pld]): alone, or grafted after another

`build_proposer` returns the proposer and, for a trained one, what the benchmark table
shows of it (parameters, training time).
"""

from __future__ import annotations

from configs.schema import PROPOSERS, ConfigError
from workers.drafters.base import LookupChain, TreeProposer
from workers.drafters.draft_model import DraftModelProposer
from workers.drafters.eagle import EagleDrafter, EagleModel
from workers.drafters.early_exit import EarlyExitDrafter
from workers.drafters.loading import DrafterWeightsError, load, load_prior, weights_file
from workers.drafters.prompt_lookup import PromptLookupDrafter
from workers.drafters.pseudo_proposer import PseudoStateProposer
from workers.drafters.token_recycling import TokenRecyclingDrafter

PSEUDO_STATE_SECTIONS = {"ht": "ht", "medusa": "medusa", "pass": "pass_"}  # name -> DrafterConfigs field


def trained_info(drafter) -> dict:
    trained = drafter.training_summary
    return {"parameters": drafter.parameter_count(), "training_s": trained.get("time_s"),
            "training_steps": trained.get("steps")}


def pseudo_state_proposer(kind: str, engine) -> tuple[PseudoStateProposer, dict]:
    e = engine
    settings = getattr(e.drafters, PSEUDO_STATE_SECTIONS[kind])
    path = weights_file(e.config.checkpoint, kind, settings.weights)
    drafter = load(path, e.model.args)
    if drafter.config.kind != kind:
        raise DrafterWeightsError(f"{path} holds a {drafter.config.kind} drafter, not a {kind} one")
    prior = load_prior(e.config.checkpoint, kind, settings.prior, e.model.args.vocab_size)
    return PseudoStateProposer(drafter.to(e.model.device), settings, e.model.args, prior), trained_info(drafter)


def eagle_proposer(engine) -> tuple[TreeProposer, dict]:
    e, c = engine, engine.drafters.eagle
    eagle = EagleModel.load(weights_file(e.config.checkpoint, "eagle", c.weights), e.model.args)
    drafter = EagleDrafter(eagle, e.model, e.cache.max_len, c.depth, c.top_k, c.budget)
    return TreeProposer(drafter, scored=True), trained_info(eagle)


def early_exit_proposer(engine) -> TreeProposer:
    c, n_layers = engine.drafters.early_exit, engine.model.args.n_layers
    if c.layer > n_layers:
        raise ConfigError(f"[early_exit] layer {c.layer} is beyond this model's {n_layers} layers")
    return TreeProposer(EarlyExitDrafter(engine.model, engine.cache, c.layer or n_layers // 2, c.depth))


def draft_proposer(engine) -> tuple[DraftModelProposer, dict]:
    """The [draft] model's proposer; the model is loaded once for the engine and its siblings."""
    e, c = engine, engine.drafters.draft
    _, model = e.draft_model()
    proposer = DraftModelProposer(model, e.cache.max_len + c.depth * c.top_k, c.depth, c.top_k, c.budget, c.min_prob,
                                  e.draft_vocabulary())
    return proposer, {"parameters": sum(p.numel() for p in model.parameters()), "training_s": None, "training_steps": None}


def build_proposer(name: str, engine) -> tuple[object, dict | None]:
    """The proposer called `name` (PROPOSERS), and its trained drafter's info or None."""
    if name in PSEUDO_STATE_SECTIONS:
        return pseudo_state_proposer(name, engine)
    if name == "eagle":
        return eagle_proposer(engine)
    if name == "early-exit":
        return early_exit_proposer(engine), None
    if name == "draft":
        return draft_proposer(engine)
    if name == "token-recycling":
        c = engine.drafters.token_recycling
        drafter = TokenRecyclingDrafter(engine.model.args.vocab_size, c.top_k, c.budget)
        return TreeProposer(drafter, from_root_token=True), None
    if name == "pld":
        c = engine.drafters.pld
        return LookupChain(PromptLookupDrafter(c.min_ngram, c.max_ngram, c.depth)), None
    raise ConfigError(f"unknown proposer {name!r}; available: {', '.join(PROPOSERS)}")
