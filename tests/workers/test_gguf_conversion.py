"""Converting a GGUF file when several processes start at once (issue 17: `--replicas 2` on
a fresh cache): one converts, the others wait and use its folder; no one sees a half
written one."""

from __future__ import annotations

import threading
import time

from workers import loading


class SlowConversion:
    """Stands in for transformers' de-quantisation (workers.loading._write_checkpoint): slow
    enough for the other replicas to start converting too, writing the files one by one."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gguf, folder):
        self.calls += 1
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            time.sleep(0.1)
            (folder / name).write_text("{}")


def test_replicas_converting_at_once_share_one_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPFROG_CACHE", str(tmp_path / "cache"))
    convert = SlowConversion()
    monkeypatch.setattr(loading, "_write_checkpoint", convert)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    results, errors = [], []

    def replica():
        try:
            results.append(loading.convert_gguf(gguf))
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
    assert convert.calls == 1
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no temporary folder left
