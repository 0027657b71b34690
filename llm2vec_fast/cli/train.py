"""`llm2vec-fast train mntp|simcse|supervised`: the training stages of the LLM2Vec recipe.

Every hyper-parameter lives in TrainConfig (train/config.py); a config file (--config, JSON or YAML) sets any of
them, or is one of the llm2vec reference's training configs (mapped onto them, see reference_config.REFERENCE_KEYS), and the
flags below override the most common ones. Output: the adapter in the released LLM2Vec layout,
a loss log (train_log.jsonl), checkpoints every --save-steps steps, and --resume to continue a killed run.
A non-empty --output is refused unless --resume continues or --overwrite replaces the run there; an --output
another run is writing to is refused, naming that run; --resume refuses a run whose data or model files changed.
--max-length limits the training texts only: train_config.json records it, and the adapter's llm2vec_config.json
(the defaults it is encoded with) gets it only with --save-max-length. Options, --data, --model paths and --output
are checked before torch is imported and any model loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .options import add_threads_option, apply_threads, check_model_path, silence_progress_bars
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
    "--max-length": (int, "tokens per training text (the model keeps its own default: see --save-max-length)"),
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
    parser.add_argument("--save-max-length", action="store_true",
                        help="simcse/supervised: also make --max-length the trained model's inference default (its "
                             "llm2vec_config.json); without it, --max-length only limits the training texts and is "
                             "recorded in train_config.json")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (neither ours nor transformers' and huggingface_hub's)")
    add_threads_option(parser)
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

    Prints the first and last step's loss. Bad options or data raise UserError, the ones that need no model
    (options, --data, --model paths, --output) before torch is imported.
    """
    from ..train.data import DataError
    from ..train.output import check_same_inputs, hold_output, save_max_length

    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in _FLAGS}
    if args.no_gradient_checkpointing:
        overrides["gradient_checkpointing"] = False
    try:
        config = _read_config(args.stage, args.config, overrides)
        check_inputs(args.stage, config, args.save_max_length)
        # Checked and locked before minutes of loading, held to the end; train() checks again under the same hold.
        with hold_output(config, args.resume, args.overwrite):
            if args.resume:
                check_same_inputs(config)  # the data and model files are the run's, before the model loads
            if args.no_progress:
                silence_progress_bars()
            apply_threads(args.threads)
            from ..train.loop import train

            stage = _make_stage(args.stage, config)
            losses = train(stage, config, resume=args.resume, show_progress=not args.no_progress,
                           overwrite=args.overwrite)
            if args.save_max_length and Ranks.from_env().is_main:
                save_max_length(config.output, config.max_length)  # asked: the training limit as the model's
    except (DataError, FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    if losses:
        print(f"{args.stage}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
              f"adapter written to {config.output}")
    return 0


def check_inputs(stage: str, config, save_max_length: bool) -> None:
    """Refuse, before any model loads, what training would fail on later: a --data file that is missing, a
    directory or unreadable, a local --model / --peft-model path that does not exist, and --save-max-length for
    the MNTP stage (which has no --max-length). Raises UserError."""
    if save_max_length and stage == "mntp":
        raise UserError("--save-max-length saves the --max-length of simcse or supervised training; mntp has no "
                        "--max-length. Remove --save-max-length.")
    data = config.data
    if not os.path.exists(data):
        kinds = ("a .jsonl file with query and positive fields" if stage == "supervised" else
                 "a .txt file (one text per line) or a .jsonl file")
        raise UserError(f"--data {data!r}: no such file. Pass the training data: {kinds}.")
    if os.path.isdir(data):
        raise UserError(f"--data {data!r} is a directory; pass the training data file (.txt or .jsonl) in it.")
    if not os.access(data, os.R_OK):
        raise UserError(f"--data {data!r} is not readable (check its permissions).")
    check_model_path(config.model, "--model")
    check_model_path(config.peft_model, "--peft-model")


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
