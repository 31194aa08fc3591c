"""The one training loop (runtime.training.loop) on a toy task: a linear map fitted to 24
noisy examples, no model. A stop and a resume give the weights of an uninterrupted run,
micro-batches the weights of whole batches, and the task's settings what they say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from configs.training import TrainConfig, TrainError
from runtime.training.loop import LoopSettings, Progress, train_loop, weights_paths

DIM = 4


class LinearTask:
    """y = w x: the summed squared error of the chosen examples, each example one target."""

    def __init__(self, settings: LoopSettings, stop_at: int | None = None):
        g = torch.Generator().manual_seed(0)
        xs, w_true = torch.randn(24, DIM, generator=g), torch.randn(DIM, generator=g)
        ys = xs @ w_true + 0.1 * torch.randn(24, generator=g)
        self.examples = [{"id": str(i), "prompt_ids": [0], "reply_ids": [0], "x": x, "y": y} for i, (x, y) in
                         enumerate(zip(xs, ys))]  # fmt: skip
        self.settings, self.stop_at, self.calls = settings, stop_at, 0
        self.w = torch.nn.Parameter(torch.zeros(DIM))

    def parameters(self):
        return [self.w]

    def loss(self, indices, generator):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt  # a stop in the middle of a step
        x = torch.stack([self.examples[i]["x"] for i in indices])
        y = torch.stack([self.examples[i]["y"] for i in indices])
        return ((x @ self.w - y) ** 2).sum() * (math.nan if self.settings.tag == "nan" else 1), len(indices)

    def validate(self):
        with torch.no_grad():
            return {"mse": float(((torch.stack([e["x"] for e in self.examples]) @ self.w
                                   - torch.stack([e["y"] for e in self.examples])) ** 2).mean())}  # fmt: skip

    def describe(self, m):
        return f"mse {m['mse']:.4f}"

    def started(self):
        return "[toy] start"

    def checkpoint_state(self):
        return {"w": self.w.detach().clone()}

    def restore(self, state, path):
        self.w.data.copy_(state["w"])

    def summary(self, progress: Progress, final):
        return {"steps": progress.step, "history": progress.history, "validation": progress.val_history, "val": final}

    def save(self, path: Path, summary):
        torch.save(self.w.detach(), path)


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "toy.pt"), steps=12, lr=0.05, batch=4, log_every=4, eval_every=5,
                checkpoint_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


def quiet(*_):
    pass


def test_a_stop_and_a_resume_give_the_uninterrupted_weights(tmp_path):
    straight = LinearTask(LoopSettings("toy", micro_batch=2))
    want = train_loop(straight, config(tmp_path / "a"), quiet)
    stopped = LinearTask(LoopSettings("toy", micro_batch=2), stop_at=2 * 7 + 1)  # in step 8; checkpoint at step 6
    with pytest.raises(KeyboardInterrupt):
        train_loop(stopped, config(tmp_path / "b"), quiet)
    messages = []
    resumed = LinearTask(LoopSettings("toy", micro_batch=2))
    got = train_loop(resumed, config(tmp_path / "b", resume=True), messages.append)
    assert any("resumed" in m and "step 6" in m for m in messages)
    torch.testing.assert_close(resumed.w, straight.w, atol=0, rtol=0)  # same order, optimizer state and schedule
    assert got == want and len(got["history"]) == 12
    assert [v["step"] for v in got["validation"]] == [5, 10, 12]  # every eval_every steps and at the end
    saved = weights_paths(tmp_path / "b" / "toy.pt")
    assert json.loads(saved[1].read_text())["steps"] == 12 and torch.load(saved[2], weights_only=True)["step"] == 12


def test_micro_batches_give_the_weights_of_whole_batches(tmp_path):
    whole, parts = LinearTask(LoopSettings("toy", micro_batch=4)), LinearTask(LoopSettings("toy", micro_batch=1))
    train_loop(whole, config(tmp_path / "a"), quiet)
    train_loop(parts, config(tmp_path / "b"), quiet)
    torch.testing.assert_close(parts.w, whole.w, atol=1e-6, rtol=1e-5)


def test_settings(tmp_path):
    task = LinearTask(LoopSettings("toy", micro_batch=4, clip_grad_norm=0.5, validate_first=True, loss_history="log"))
    summary = train_loop(task, config(tmp_path / "a", eval_every=0), quiet)
    assert [v["step"] for v in summary["validation"]] == [0, 12]  # before the first step and at the end
    assert [h["step"] for h in summary["history"]] == [4, 8, 12] and summary["history"][0]["loss"] > 0
    assert summary["val"] == {"mse": summary["validation"][-1]["mse"]}
    # An older checkpoint without the data fingerprint resumes with its order of examples.
    ckpt = weights_paths(tmp_path / "a" / "toy.pt")[2]
    state = torch.load(ckpt, weights_only=True)
    del state["data"]
    torch.save(state, ckpt)
    assert train_loop(LinearTask(task.settings), config(tmp_path / "a", resume=True, steps=14), quiet)["steps"] == 14
    with pytest.raises(TrainError, match="loss is nan"):
        train_loop(LinearTask(LoopSettings("nan", micro_batch=4)), config(tmp_path / "c"), quiet)
