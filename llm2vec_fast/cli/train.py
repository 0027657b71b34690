"""`llm2vec-fast train mntp|simcse|supervised`: the training stages of the LLM2Vec recipe.

Every hyper-parameter lives in TrainConfig (train/config.py); a config file (--config, JSON or YAML) sets any of
them, or is one of the llm2vec reference's training configs (mapped onto them, see reference_config.REFERENCE_KEYS), and the
flags below override the most common ones. Output: the adapter in the released LLM2Vec layout,
a loss log (train_log.jsonl), checkpoints every --save-steps steps, and --resume to continue a killed run.
A non-empty --output is refused unless --resume continues or --overwrite replaces the run there.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .options import silence_progress_bars
from ..errors import UserError
from ..settings import Ranks
from ..train.config import DTYPES, STAGES, ConfigWarning, TrainConfig, stage_defaults, stages_using

# flag -> (type, help); each maps to the TrainConfig field of the same name with dashes as underscores.
_FLAGS = {
    "--model": (str, "model directory or 'smollm2-135m' (simcse/supervised: typically the MNTP output)"),
    "--data": (str, "training data: .txt (one text per line) or .jsonl"),
    "--output": (str, "output directory (adapter, logs, checkpoints)"),
    "--peft-model": (str, "an adapter to merge into --model before training"),
    "--steps": (int, "optimizer steps"),
    "--batch-size": (int, "blocks (mntp) or examples (contrastive) per step and process"),
    "--learning-rate": (float, "peak learning rate"),
    "--warmup-steps": (int, "linear warmup steps"),
    "--dtype": (str, "weights dtype"),
    "--device": (str, "cpu, cuda or cuda:N"),
    "--save-steps": (int, "checkpoint every N steps"),
    "--seed": (int, "random seed"),
    "--block-size": (int, "tokens per block"),
    "--mlm-probability": (float, "share of tokens masked"),
    "--max-length": (int, "tokens per text"),
    "--attention-dropout": (float, "attention-probability dropout"),
    "--gradcache-chunk": (int, "examples per GradCache chunk (0: the whole batch at once)"),
    "--text-field": (str, "jsonl: the text field"),
}
# Defaults that are not values of the recipe.
_DEFAULT_WORDS = {"peft-model": "none", "device": "cuda when available, else cpu"}

_EPILOG = """\
Defaults are the stage's recipe (the llm2vec reference's train_configs), listed per stage where they differ.
--config takes our options (train_config.json in an output lists them all) or one of the llm2vec 0.2.3
reference's training configs as it ships (train_configs/<stage>/*.json): its keys are mapped onto these options,
keys without effect here are named in a warning, keys asking for what llm2vec-fast does not implement are an
error naming the alternative. The reference's Hub datasets (dataset_name wikitext) are never downloaded: pass
--data FILE. Flags override the file.
"""


def register(subparsers) -> None:
    """Add the `train` subcommand's parser (the stage, --config and one flag per training option) to `subparsers`."""
    parser = subparsers.add_parser("train", help="train an LLM2Vec stage (mntp, simcse, supervised)",
                                   description=__doc__.splitlines()[0], epilog=_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="JSON or YAML file of training options, or a reference llm2vec train_configs JSON")
    for flag, (kind, text) in _FLAGS.items():
        choices = DTYPES if flag == "--dtype" else None
        parser.add_argument(flag, type=kind, default=None, choices=choices, help=f"{text} ({_default_help(flag)})")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="keep all activations (default: gradient checkpointing on)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its newest intact checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the training run in --output (only the files training wrote are removed)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (neither ours nor transformers' and huggingface_hub's)")
    parser.set_defaults(func=run)


def _default_help(flag: str) -> str:
    """'default: X', or the value per stage where the recipes differ; names the stages a flag applies to."""
    name = flag[2:]
    stages = stages_using(name.replace("-", "_"))
    only = "" if stages == STAGES else f"{'/'.join(stages)} only; "
    if name in ("data", "output"):
        return "required"
    if name in _DEFAULT_WORDS:
        return f"{only}default: {_DEFAULT_WORDS[name]}"
    values = {stage: getattr(stage_defaults(stage), name.replace("-", "_")) for stage in stages}
    if len(set(values.values())) == 1:
        return f"{only}default: {next(iter(values.values()))}"
    return f"{only}default: " + ", ".join(f"{stage} {value}" for stage, value in values.items())


def run(args: argparse.Namespace) -> int:
    """Train args.stage into --output with the options of --config, overridden by the flags; returns 0.

    Prints the first and last step's loss. Bad options or data raise UserError.
    """
    from ..train.data import DataError
    from ..train.loop import train
    from ..train.output import check_output

    if args.no_progress:
        silence_progress_bars()
    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in _FLAGS}
    if args.no_gradient_checkpointing:
        overrides["gradient_checkpointing"] = False
    try:
        config = _read_config(args.stage, args.config, overrides)
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


def _read_config(stage: str, path: str | None, overrides: dict):
    """TrainConfig.for_stage, its ConfigWarnings printed once (by rank 0 under torchrun) as one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        config = TrainConfig.for_stage(stage, path, **overrides)
    for warning in caught:
        if not issubclass(warning.category, ConfigWarning):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        elif Ranks.from_env().is_main:
            print(f"llm2vec-fast train: warning: {warning.message}", file=sys.stderr)
    return config


def _make_stage(stage: str, config):
    if stage == "mntp":
        from ..train.mntp import MNTPStage

        return MNTPStage(config)
    if stage == "simcse":
        from ..train.simcse import SimCSEStage

        return SimCSEStage(config)
    from ..train.supervised import SupervisedStage

    return SupervisedStage(config)
