"""Converting a GGUF file when several processes start at once (issue 17: `--replicas 2` on
a fresh cache): one converts, the others wait and use its folder; no one sees a half
written one."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch
import transformers

from workers.loading import convert_gguf


class SlowModel:
    calls = 0

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls.calls += 1
        time.sleep(0.3)  # long enough for the other replica to start converting too
        config = SimpleNamespace(tie_word_embeddings=False, to_dict=lambda: {"model_type": "llama"})
        return SimpleNamespace(config=config, state_dict=lambda: {"w": torch.zeros(2)})


class FakeTokenizer:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


def test_replicas_converting_at_once_share_one_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPFROG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", SlowModel)
    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTokenizer)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    results, errors = [], []

    def replica():
        try:
            results.append(convert_gguf(gguf))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(set(results)) == 1
    folder = results[0]
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert SlowModel.calls == 1
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no temporary folder left
