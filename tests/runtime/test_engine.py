"""The engine (runtime.engine): built from a config, the prompt checks, modes built once
and rebuilt when their settings change."""

import pytest
import torch

from configs.files import load_config
from configs.schema import PseudoStateModeConfig
from runtime.engine import Engine, PromptTooLongError
from runtime.modes import UnknownModeError


@pytest.fixture(scope="module")
def engine():
    config = load_config()
    config.model.device, config.model.max_context, config.runtime.threads = "cpu", 256, 1
    return Engine.from_config(config)


def test_from_config_takes_every_section_it_reads(engine):
    assert torch.get_num_threads() == 1
    assert engine.config.max_context == 256 and engine.drafters.ht.budget == load_config().drafters.ht.budget
    assert engine.cache.max_len > 256  # room for a tree step's pending rows beyond the context
    assert engine.stop_ids and len(engine.encode_chat("Hi")) > 5  # the chat template is around the message


def test_prompts_that_do_not_fit_are_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.check_fits([], 8)
    with pytest.raises(PromptTooLongError, match="exceeds the context of 256"):
        engine.steps([1] * 250, "ar", 7)
    engine.check_fits([1] * 250, 6)


def test_modes_are_built_once_and_rebuilt_after_new_settings(engine):
    ar, ht = engine.mode("ar"), engine.mode("ht")
    assert engine.mode("ar") is ar and engine.mode("ht") is ht
    engine.set_drafter_config("ht", PseudoStateModeConfig(budget=4))
    assert engine.mode("ar") is ar and engine.mode("ht") is not ht  # drafting modes rebuilt, ar kept
    assert engine.mode("ht").decoder.settings.budget == 4
    with pytest.raises(UnknownModeError, match="unknown mode 'warp'"):
        engine.mode("warp")
