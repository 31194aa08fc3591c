"""Self-distilled data at scale and the hidden-transfer training on a lent GPU (issue 15,
items 1 and 8), prepared here and run there in one long call:

    python scripts/gpu_train.py prepare                 # here: fills .gpu/ and .gpu2/ (see below)
    run(command="bash scripts/gpu_train.sh", carry=[".gpu"], timeout_s=60)      # stashes part 1
    run(command="bash scripts/gpu_train.sh", carry=[".gpu2"], timeout_s=560)    # at once, while warm
    python scripts/gpu_train.py land FILES_AT           # here: the data into the cache, the weights

`prepare` writes what the device has not got (no ShareGPT file, no `gguf` package, one
call carries at most 64 MiB): the training prompts already in the chat template (the ids
`leapfrog train` would make, in its order), the cached validation replies, the `gguf`
wheel, and the GGUF file cut in two parts, one for each call.

`run` (on the device) joins the GGUF, loads the model in bfloat16, then, each part up to
a deadline counted from its start:
  1. generates the model's own greedy replies (`--max-new-tokens`) to the training prompts
     in batches of `--gen-batch` (runtime.training.distill, transformers generate), in
     order, into the same cache file `leapfrog train --data self` reads;
  2. validates the shipped `ht` weights (before) on the validation replies;
  3. times a few packed training steps and fits the step count to the time left;
  4. trains from the shipped weights (runtime.training.trainer, `--pack` sequences a
     forward) and validates (after).
It writes the weights, their summary, the data (gzipped) and a JSON report to --out.

`land` puts the returned data where `leapfrog train` finds it and the weights beside
the report, so the numbers can be checked here (`leapfrog bench`).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from configs.training import TrainConfig  # noqa: E402
from runtime.training import distill  # noqa: E402
from runtime.training.objective import evaluate, format_eval, pack_loss, usable  # noqa: E402
from runtime.training.trainer import train  # noqa: E402
from workers.drafters.loading import load, shipped_weights  # noqa: E402
from workers.loading import default_gguf_path, load_model, load_tokenizer  # noqa: E402

PART_ONE_BYTES = 49_000_000  # with the tree (~15 MB) and the prompts, under one call's 64 MiB
VAL_EXAMPLES = 60  # the validation set every earlier run reports on


def settings(max_new_tokens: int) -> tuple[distill.DistillSettings, distill.DistillSettings]:
    """(training, validation) data settings: bfloat16 greedy replies, as decoding drafts for."""
    return (distill.DistillSettings(256, max_new_tokens, "bfloat16", "self"),
            distill.DistillSettings(256, 128, "bfloat16", "self"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(args) -> None:
    one, two = Path(args.part_one), Path(args.part_two)
    for d in (one, two):  # only what this run carries: each call's files count against its 64 MiB
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    gguf = default_gguf_path()
    _, folder = load_model("default", torch.bfloat16, "cpu")
    tokenizer = load_tokenizer(folder)
    train_settings, val_settings = settings(args.max_new_tokens)
    encoded = list(distill.encoded_prompts(tokenizer, train_settings, "train"))
    val = distill.distill(folder, VAL_EXAMPLES, "val", settings=val_settings)  # cached here
    with gzip.open(one / "prompts.json.gz", "wt") as f:
        json.dump({"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "gguf_sha256": sha256(gguf),
                   "max_new_tokens": args.max_new_tokens, "prompts": encoded}, f)
    (two / "val.jsonl").write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in val))
    data = gguf.read_bytes()
    (one / "gguf.part1").write_bytes(data[:PART_ONE_BYTES])
    (two / "gguf.part2").write_bytes(data[PART_ONE_BYTES:])
    wheels = one / "whl"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64", "-d", str(wheels),
                    "gguf==0.19.0"], check=True)
    print(f"{len(encoded)} training prompts; {len(val)} validation replies; parts: "
          f"{sum(p.stat().st_size for p in one.rglob('*') if p.is_file()) / 1e6:.1f} MB in {one}, "
          f"{sum(p.stat().st_size for p in two.rglob('*') if p.is_file()) / 1e6:.1f} MB in {two}")


def join_gguf(manifest: dict, parts: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / manifest["gguf"]
    with open(path, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    if path.stat().st_size != manifest["gguf_bytes"] or sha256(path) != manifest["gguf_sha256"]:
        raise SystemExit(f"{path}: the joined parts are not the GGUF file that was cut")
    return path


def step_seconds(model, examples: list[dict], cfg: TrainConfig, init: Path, repeats: int = 3) -> float:
    """Seconds of one optimizer step (`cfg.batch` sequences, `cfg.pack` a forward), measured."""
    ht = load(init, model.args).to(model.device)
    ht.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        group = [examples[(r * cfg.batch + i) % len(examples)] for i in range(cfg.batch)]
        for start in range(0, len(group), cfg.pack):
            pack_loss(model, ht, group[start : start + cfg.pack], cfg.positions_per_seq, g).backward()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])  # the first carries the warm-up


def run(args) -> None:
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def say(msg: str) -> None:
        line = f"[{time.monotonic() - start:6.1f}s] {msg}"
        print(line, flush=True)
        with open(out / "gpu_train.log", "a") as f:
            f.write(line + "\n")

    def save() -> None:
        (out / "gpu_train.json").write_text(json.dumps(report, indent=1))

    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    def first_call(name: str) -> Path:  # what the first call carried: still in the tree, or in the stash
        return next((p for p in (Path(args.part_one) / name, Path(args.stash) / name) if p.is_file()), Path(args.stash) / name)

    with gzip.open(first_call("prompts.json.gz"), "rt") as f:
        manifest = json.load(f)
    parts = [first_call("gguf.part1"), Path(args.part_two) / "gguf.part2"]
    gguf = join_gguf(manifest, parts, Path(args.stash))
    model, folder = load_model(str(gguf), torch.bfloat16, args.device, cuda_graphs=False)
    say(f"model loaded from {gguf} ({folder})")
    train_settings, val_settings = settings(manifest["max_new_tokens"])

    # The validation replies made here earlier, where `leapfrog train` looks for them.
    val_file = distill.cache_file(distill.default_data_dir(), folder, val_settings, "val")
    val_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(args.part_two) / "val.jsonl", val_file)
    val = distill.distill(folder, VAL_EXAMPLES, "val", settings=val_settings, progress=False)

    # 1. The model's own replies, up to the generation deadline.
    prompts = [(cid, ids) for cid, ids in manifest["prompts"]][: args.examples or None]
    train_file = distill.cache_file(distill.default_data_dir(), folder, train_settings, "train")
    made_before = sum(len(e["reply_ids"]) for e in distill.read_cache(train_file))  # by an earlier run
    t0 = time.perf_counter()
    data = distill.distill(folder, len(prompts), "train", settings=train_settings, batch_size=args.gen_batch,
                           device=args.device, encoded=prompts, deadline=start + args.gen_until, progress=False)
    gen_s = time.perf_counter() - t0
    reply_tokens = sum(len(e["reply_ids"]) for e in data)
    report["data"] = {"examples": len(data), "of_prompts": len(prompts), "reply_tokens": reply_tokens,
                      "max_new_tokens": train_settings.max_new_tokens, "batch": args.gen_batch,
                      "made_now": reply_tokens - made_before, "seconds": round(gen_s, 1),
                      "reply_tokens_per_s": round((reply_tokens - made_before) / gen_s, 1)}
    say(f"data: {report['data']}")
    save()
    with open(train_file, "rb") as src, gzip.open(out / "train.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)

    # 2. The shipped weights, before.
    init = shipped_weights("default", "ht")
    report["before"] = evaluate(model, load(init, model.args).to(model.device), val)
    say(f"before (shipped weights): {format_eval(report['before'])}")
    save()

    # 3-4. Steps fitted to the time left, then training from the shipped weights.
    shape = load(init, model.args).config  # the run continues the shipped drafter: same layer, k and attention
    data = usable(data, shape.k)
    cfg = TrainConfig(checkpoint=str(gguf), dtype="bfloat16", device=args.device, init=str(init), data="self",
                      layer=shape.layer, k=shape.k, pseudo_attention=shape.pseudo_attention,
                      examples=len(data), val_examples=len(val), max_new_tokens=train_settings.max_new_tokens,
                      batch=args.batch, pack=args.pack, positions_per_seq=args.positions, lr=args.lr,
                      out=str(out / "ht.safetensors"), progress=False, log_every=25)
    step_s = step_seconds(model, data, cfg, init)
    left = args.train_until - (time.monotonic() - start)
    cfg.steps = max(1, int(left * 0.9 / step_s))
    cfg.eval_every = max(1, cfg.steps // 4)
    cfg.checkpoint_every = cfg.steps + 1  # one checkpoint, at the end
    report["training"] = {"step_s": round(step_s, 4), "steps": cfg.steps, "batch": cfg.batch, "pack": cfg.pack,
                          "positions_per_seq": cfg.positions_per_seq, "lr": cfg.lr,
                          "epochs": round(cfg.steps * cfg.batch / len(data), 2)}
    say(f"training: {report['training']}")
    save()
    _, summary = train(model, data, val, cfg, log=say)
    report["after"] = summary["val"]
    report["val_history"] = summary["val_history"]
    report["training"]["seconds"] = summary["time_s"]
    report["total_s"] = round(time.monotonic() - start, 1)
    save()
    (out / "ht.ckpt.pt").unlink(missing_ok=True)  # resumable state: not needed back here
    say(f"done in {report['total_s']}s")


def land(args) -> None:
    """Here, after the run: the returned data into the cache, the report beside the weights."""
    back = Path(args.files_at)
    _, folder = load_model("default", torch.bfloat16, "cpu")
    manifest_settings, _ = settings(json.loads((back / "gpu_train.json").read_text())["data"]["max_new_tokens"])
    target = distill.cache_file(distill.default_data_dir(), folder, manifest_settings, "train")
    source = back / "train.jsonl.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    print(f"{len(distill.read_cache(target))} training examples in {target}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("prepare", "run"):
        s = sub.add_parser(name)
        s.add_argument("--part-one", default=str(ROOT / ".gpu"), help="what the first call carries")
        s.add_argument("--part-two", default=str(ROOT / ".gpu2"), help="what the second call carries")
    sub.choices["prepare"].add_argument("--max-new-tokens", type=int, default=384, help="reply length of the training data")
    r = sub.choices["run"]
    r.add_argument("--stash", default="/root/leapfrog-gpu", help="where part 1 is kept between calls, and the GGUF joined")
    r.add_argument("--device", default="cuda")
    r.add_argument("--out", default="out/gpu_train")
    r.add_argument("--examples", type=int, default=0, help="at most this many training prompts (0: all)")
    r.add_argument("--gen-batch", type=int, default=1024)
    r.add_argument("--gen-until", type=float, default=240, help="seconds from the start: stop generating after the batch")
    r.add_argument("--train-until", type=float, default=470, help="seconds from the start: fit the steps to end by then")
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--pack", type=int, default=16)
    r.add_argument("--positions", type=int, default=128, help="positions per sequence and step")
    r.add_argument("--lr", type=float, default=1e-3)
    la = sub.add_parser("land")
    la.add_argument("files_at")
    args = p.parse_args()
    {"prepare": prepare, "run": run, "land": land}[args.command](args)


if __name__ == "__main__":
    main()
