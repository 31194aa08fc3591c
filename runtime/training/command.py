"""`leapfrog train`: its flags (each a field of configs.training.TrainConfig), and the run:
the model loaded, the data distilled (cached), the drafter trained and saved."""

from __future__ import annotations

from dataclasses import fields

import torch

from configs.schema import DTYPES, KERNELS, LeapfrogConfig, torch_device
from configs.training import TRAIN_DRAFTERS, TRAIN_DTYPES, TrainConfig
from runtime.arg_types import layer_list, non_negative_int, positive_float, positive_int
from runtime.training.distill import DistillSettings, distill
from runtime.training.eagle_trainer import train_eagle
from runtime.training.trainer import drafter_config, train
from workers.loading import load_model


def add_train(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a drafter (ht, medusa, pass, or the eagle peer) by distillation on ShareGPT",
        description="Build the training data (ShareGPT training prompts with the model's greedy replies, or with "
        "ShareGPT's own replies under --data sharegpt; cached), then train "
        "the drafter (hidden-transfer maps, Medusa heads or PaSS look-ahead embeddings) with the backbone frozen. Writes OUT (weights), OUT with .json (summary) "
        "and .ckpt.pt (resumable checkpoint).",
    )
    p.add_argument("--config", help="TOML config file (default: configs/default.toml)")
    p.add_argument("--checkpoint", help="'default', a named one (qwen2.5-coder-1.5b, qwen2.5-coder-0.5b: `make models`), a .gguf file or a Hugging Face checkpoint folder")
    p.add_argument("--dtype", choices=TRAIN_DTYPES, help="backbone dtype (the transfer trains in float32)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--kernels", choices=KERNELS, help="matrix-product kernels: auto (native where it runs) | native (its fastest path here) | amx | avx512 | avx2 (a path of native by name) | torch")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--distill-dtype", choices=TRAIN_DTYPES,
                   help="dtype of the model that generates --data self replies (default: --dtype); float32 training on "
                   "a CPU without AVX-512 BF16 is several times faster than bfloat16, whose backward has no fast kernel there")
    p.add_argument("--drafter", choices=TRAIN_DRAFTERS, default=d.drafter,
                   help="ht: hidden transfer at --layer; medusa: heads after the last layer; pass: look-ahead embeddings; "
                   "eagle: the EAGLE peer (one draft layer over the target's features)")
    p.add_argument("--vocab", type=positive_int, default=d.vocab,
                   help=f"eagle: draft vocabulary, the most frequent reply tokens (default {d.vocab})")
    p.add_argument("--unroll", type=positive_int, default=d.unroll,
                   help="eagle: 2 also trains depth 2 on the draft model's own predicted features "
                   "(EAGLE-3's training-time test, one step; twice the cost a step)")
    p.add_argument("--layer", type=positive_int, help="ht: layers before the transfer (default: half the layers)")
    p.add_argument("--refine-layers", type=layer_list, default=(),
                   help="ht: later layers that transfer again, comma-separated (FIRP style), e.g. 26")
    p.add_argument("--init", help="start from these drafter weights (same kind, layer and k); new maps start at zero")
    p.add_argument("--freeze-init", action="store_true",
                   help="keep the --init weights fixed: only the parameters they lack learn (refine maps)")
    p.add_argument("--k", type=positive_int, default=d.k, help=f"pseudo positions (draft depth) (default {d.k})")
    p.add_argument("--no-pseudo-attention", action="store_true", help="pseudo states do not attend to each other")
    p.add_argument("--data", choices=("self", "sharegpt"), default=d.data,
                   help="training replies: self = the model's own greedy replies (slow to make), "
                   "sharegpt = ShareGPT's replies, teacher-forced (validation always uses the model's own)")
    p.add_argument("--examples", type=positive_int, default=d.examples,
                   help=f"training examples (default {d.examples})")
    p.add_argument("--val-examples", type=non_negative_int, help="validation examples (default: 5%% of --examples)")
    p.add_argument("--max-new-tokens", type=positive_int, help="reply length of the training examples (default 128)")
    p.add_argument("--val-max-new-tokens", type=positive_int, default=d.val_max_new_tokens,
                   help=f"reply length of the validation examples (default {d.val_max_new_tokens})")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=d.max_prompt_tokens,
                   help=f"skip longer prompts (default {d.max_prompt_tokens})")
    p.add_argument("--steps", type=non_negative_int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule, help="learning-rate schedule")
    p.add_argument("--positions-per-seq", type=positive_int, default=d.positions_per_seq,
                   help=f"positions drafted per sequence and step (default {d.positions_per_seq})")
    p.add_argument("--batch", type=positive_int, default=d.batch, help=f"sequences per step (default {d.batch})")
    p.add_argument("--pack", type=positive_int, default=d.pack,
                   help=f"sequences packed into one forward, at most --batch (default {d.pack}; more for a GPU)")
    p.add_argument("--out", default=d.out, help=f"weights file (default {d.out})")
    p.add_argument("--data-dir", help="cache of training examples (default: $LEAPFROG_CACHE/distill)")
    p.add_argument("--distill-batch", type=positive_int, default=d.distill_batch, help="generation batch size")
    p.add_argument("--resume", action="store_true", help="continue from OUT's .ckpt.pt checkpoint")
    p.add_argument("--data-only", action="store_true",
                   help="build (or extend) the cached training data and stop; a later run resumes it")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=positive_int, default=d.log_every, help="print the mean loss every N steps")
    p.add_argument("--eval-every", type=non_negative_int, default=d.eval_every,
                   help="validate every N steps (0: at the end only)")
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every, help="save the checkpoint every N steps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def train_config(args, config: LeapfrogConfig) -> TrainConfig:
    """The TrainConfig of `leapfrog train`: every flag named like one of its fields, and the
    model, device, threads and reply length as the shared config resolved them."""
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name in vars(args)}
    return TrainConfig(**{
        **flags,
        "checkpoint": config.model.checkpoint, "dtype": config.model.dtype, "device": config.model.device,
        "threads": config.runtime.threads, "max_new_tokens": config.generation.max_new_tokens,
        "pseudo_attention": not args.no_pseudo_attention, "progress": not args.no_progress,
    })


def cmd_train(args, config: LeapfrogConfig) -> int:
    run(train_config(args, config))
    return 0


def run(cfg: TrainConfig, log=print) -> dict:
    """`leapfrog train`: load the model, distil the data (cached), train, save."""
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    device = torch_device(cfg.device)
    model, folder = load_model(cfg.checkpoint, DTYPES[cfg.dtype], device, cuda_graphs=False)  # gradients flow
    if cfg.drafter != "eagle":
        drafter_config(cfg, model.args.n_layers)  # fail before distilling
    common = dict(data_dir=cfg.data_dir, batch_size=cfg.distill_batch, device=device, progress=cfg.progress)
    generator_dtype = cfg.distill_dtype or cfg.dtype
    train_settings = DistillSettings(cfg.max_prompt_tokens, cfg.max_new_tokens, generator_dtype, cfg.data)
    val_settings = DistillSettings(cfg.max_prompt_tokens, cfg.val_max_new_tokens, generator_dtype, "self")
    train_examples = distill(folder, cfg.examples, "train", settings=train_settings, **common)
    val_examples = distill(folder, cfg.n_val(), "val", settings=val_settings, **common) if cfg.n_val() else []
    if len(train_examples) < cfg.examples:
        log(f"[train] only {len(train_examples)} training prompts fit; using them all")
    sizes = {"train": len(train_examples), "val": len(val_examples),
             "train_reply_tokens": sum(len(e["reply_ids"]) for e in train_examples)}
    log(f"[train] data ({cfg.data}): {sizes['train']} training sequences, {sizes['train_reply_tokens']:,} reply tokens; "
        f"{sizes['val']} validation sequences (the model's own replies)")
    if cfg.data_only:
        return {"examples": sizes}
    if cfg.drafter == "eagle":
        return train_eagle(model, train_examples, val_examples, cfg, log=log)
    _, summary = train(model, train_examples, val_examples, cfg, log=log)
    return summary
