"""`llm2vec-fast train mntp|simcse|supervised`: the training stages of the LLM2Vec recipe.

Every hyper-parameter lives in TrainConfig (train/config.py); a config file (--config, JSON or YAML) sets any of
them and the flags below override the most common ones. Output: the adapter in the released LLM2Vec layout,
a loss log (train_log.jsonl), checkpoints every --save-steps steps, and --resume to continue a killed run.
A non-empty --output is refused unless --resume continues or --overwrite replaces the run there.
"""

from __future__ import annotations

import argparse

from .errors import UserError

STAGES = ("mntp", "simcse", "supervised")
# flag -> (type, help); each maps to the TrainConfig field of the same name with dashes as underscores.
_FLAGS = {
    "--model": (str, "model directory or 'smollm2-135m' (simcse/supervised: typically the MNTP output)"),
    "--data": (str, "training data: .txt (one text per line) or .jsonl"),
    "--output": (str, "output directory (adapter, logs, checkpoints)"),
    "--peft-model": (str, "an adapter to merge into --model before training"),
    "--steps": (int, "optimizer steps"),
    "--batch-size": (int, "blocks (mntp) or examples (contrastive) per step"),
    "--learning-rate": (float, "peak learning rate"),
    "--warmup-steps": (int, "linear warmup steps"),
    "--dtype": (str, "weights dtype: float32, bfloat16, float16"),
    "--device": (str, "cpu, cuda or cuda:N"),
    "--save-steps": (int, "checkpoint every N steps"),
    "--seed": (int, "random seed"),
    "--block-size": (int, "mntp: tokens per block"),
    "--mlm-probability": (float, "mntp: share of tokens masked"),
    "--max-length": (int, "contrastive: tokens per text"),
    "--attention-dropout": (float, "attention-probability dropout (simcse: 0.3)"),
    "--gradcache-chunk": (int, "contrastive: examples per GradCache chunk (0: whole batch at once)"),
    "--text-field": (str, "jsonl: the text field (mntp, simcse)"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an LLM2Vec stage (mntp, simcse, supervised)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", default=None, help="JSON or YAML file of TrainConfig options")
    for flag, (kind, text) in _FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="keep all activations")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its newest intact checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the training run in --output (only the files training wrote are removed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.data import DataError
    from .train.loop import train
    from .train.output import check_output

    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in _FLAGS}
    if args.no_gradient_checkpointing:
        overrides["gradient_checkpointing"] = False
    try:
        config = TrainConfig.for_stage(args.stage, args.config, **overrides)
        check_output(config, args.resume, args.overwrite)  # before minutes of loading; train() checks again
        stage = _make_stage(args.stage, config)
        losses = train(stage, config, resume=args.resume, show_progress=not args.no_progress,
                       overwrite=args.overwrite)
    except (DataError, FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    if losses:
        print(f"{args.stage}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
              f"adapter written to {config.output}")
    return 0


def _make_stage(stage: str, config):
    if stage == "mntp":
        from .train.mntp import MNTPStage

        return MNTPStage(config)
    if stage == "simcse":
        from .train.simcse import SimCSEStage

        return SimCSEStage(config)
    from .train.supervised import SupervisedStage

    return SupervisedStage(config)
