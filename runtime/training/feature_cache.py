"""The feature cache of drafter training: the target's last hidden states of every
training sequence, computed once and kept on disk beside the weights.

A drafter that reads the target's features (the EAGLE peer, runtime.training.eagle_trainer)
trains on the same features every epoch and every resumed run: they are computed once in
the backbone's dtype and saved as bfloat16 (what decoding feeds), several sequences a
forward (similar lengths together, little padding), in shards of SHARD sequences
(OUT.features/train/00000-<fingerprint>.pt, ...): a stop loses at most one shard, and a
shard's file name holds its sequences' fingerprint, so other data never reads stale
features. (The pseudo-state drafters cache nothing: their loss reads the target's logits
and the K/V of every layer from the drafter's on, over the whole sequence, recomputed
under no_grad each step: far more than features to keep on disk.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from configs.training import TrainConfig
from runtime.training.loop import data_fingerprint, save_checkpoint, weights_paths
from workers.model import Transformer

SHARD = 64  # sequences per feature file
FEATURE_BATCH = (8, 64)  # sequences a feature forward: (CPU, GPU)


@torch.inference_mode()
def features(model: Transformer, examples: list[dict]) -> list[torch.Tensor]:
    """The target's last hidden states of each example (prompt + reply, dim), before the final
    norm, in bfloat16 on the CPU: one right-padded causal forward for all of them (a real row
    never sees the padding after it)."""
    ids = [e["prompt_ids"] + e["reply_ids"] for e in examples]
    n = max(len(i) for i in ids)
    tokens = torch.tensor([i + [0] * (n - len(i)) for i in ids], device=model.device)
    h = model.run_layers(model.embed(tokens), model.context(torch.arange(n, device=model.device)))
    return [h[b, : len(i)].to(torch.bfloat16).cpu() for b, i in enumerate(ids)]


def feature_folder(cfg: TrainConfig) -> Path:
    """Where a run keeps its cached features (train/ and val/): beside its weights."""
    return weights_paths(cfg.out)[0].with_suffix(".features")


def cached_features(model: Transformer, examples: list[dict], folder: Path, progress: bool, log) -> list[torch.Tensor]:
    """Features of every example, from `folder` where a shard is there, computed (and saved) otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[torch.Tensor] = []
    computed = 0
    per_pass = FEATURE_BATCH[model.device.type == "cuda"]
    bar = tqdm(total=len(examples), desc="eagle features", unit="seq", disable=not progress)
    for start in range(0, len(examples), SHARD):
        chunk = examples[start : start + SHARD]
        path = folder / f"{start // SHARD:05d}-{data_fingerprint(chunk)}.pt"
        if path.is_file():
            feats = torch.load(path, weights_only=True)
        else:
            order = sorted(range(len(chunk)), key=lambda i: len(chunk[i]["reply_ids"]) + len(chunk[i]["prompt_ids"]))
            feats = [None] * len(chunk)
            for first in range(0, len(order), per_pass):  # similar lengths together: little padding
                part = order[first : first + per_pass]
                for i, f in zip(part, features(model, [chunk[i] for i in part])):
                    feats[i] = f
            save_checkpoint(path, feats)
            computed += len(chunk)
        out += feats
        bar.update(len(chunk))
    bar.close()
    log(f"[eagle] features of {len(out)} sequences in {folder}: {len(out) - computed} read, {computed} computed")
    return out
