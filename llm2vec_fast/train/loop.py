"""The optimisation loop every stage shares: AdamW with warmup and linear decay over the steps actually run,
gradient clipping, data-parallel gradient averaging under torchrun, a loss log, checkpoints and exact resume,
and a stop at the first non-finite loss or gradient norm.

A stage (see `Stage`) owns its trainable model and data; `train` asks it for one backward pass per step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import UserError
from .checkpoint import checkpoint_candidates, clean_checkpoints, report_skipped, save_checkpoint
from .config import TrainConfig
from .data import DataError
from ..files import make_staging, move_files, seal, write_atomic
from ..settings import Ranks
from .output import (CHECKPOINTS, RUN_CONFIG, check_same_inputs, hold_output, input_fingerprint, prepare_output,
                     record_inputs, record_outputs, stored_config, stored_inputs)


class Stage:
    """One training stage. Subclasses set `model` (the peft-wrapped decoder) and implement `step` and `save`."""

    name = "stage"
    model: torch.nn.Module
    device: torch.device

    def step(self, step: int) -> tuple[float, int]:
        """Forward and backward of batch `step` (deterministic in step); returns (loss, tokens processed)."""
        raise NotImplementedError

    def save(self, directory: str) -> None:
        """Write the adapter (and what loading it needs) to `directory`."""
        raise NotImplementedError


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """This rank's example indices for batch `step`: epochs of a seeded permutation, so any step is reproducible
    alone. batch_size is per rank; the global batch (batch_size x world size) is the same whatever the world
    size, and each rank takes its slice of it."""
    rank, world = distributed_context()
    global_size = batch_size * world
    per_epoch = max(1, num_examples // global_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    batch = order[position * global_size:(position + 1) * global_size].tolist()
    return batch[rank * batch_size:(rank + 1) * batch_size]


def check_batch_fits(count: int, what: str, config: TrainConfig) -> None:
    """Refuse a global batch (batch_size x ranks) larger than the `count` examples of the data: the batch would
    silently shrink to the whole data, or leave a rank without examples."""
    _, world = distributed_context()
    if config.batch_size * world > count:
        ranks = f" x {world} ranks" if world > 1 else ""
        raise DataError(f"{config.data}: {count} {what}, fewer than one batch (--batch-size {config.batch_size}"
                        f"{ranks}); lower --batch-size to at most {max(1, count // world)}, or add data")


def example_generator(seed: int, step: int, example: int) -> torch.Generator:
    """A generator private to one example of one step (e.g. its MNTP masks): independent of the global RNG and
    of which other examples share the batch or the rank."""
    # Modulo 2**64 (the generator's seed range): the same seeds as ever below it, and no overflow for large seeds.
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 10_000_019 + example) % 2**64)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once; (0, 1) otherwise."""
    if Ranks.from_env().distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_dropout_per_rank(seed: int, start: int, rank: int, world: int) -> None:
    """Give each rank of a multi-process run its own dropout stream (LoRA and attention dropout draw from the torch
    RNG). Every rank seeds alike to build identical LoRA weights; left so, the ranks would draw identical dropout
    masks, and SimCSE's two views would repeat the same noise pattern across the global batch. Mixing in the start
    step keeps a resumed run reproducible. A single process keeps its RNG untouched (its resume is exact)."""
    if world > 1:
        torch.manual_seed(((seed * 1_000_003 + start) * 1_009 + rank) % 2**63)


def _schedule(config: TrainConfig):
    warmup, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingDiverged(UserError):
    """A non-finite loss, gradient norm or weight: training stopped before applying or saving it."""


# Options that may differ between a run and its resumption (a run directory may be moved); every other one must
# match.
_RESUMABLE_CHANGES = {"steps", "save_steps", "device", "log_file", "output"}


def train(stage: Stage, config: TrainConfig, resume: bool = False, show_progress: bool = True,
          overwrite: bool = False) -> list[float]:
    """Run steps [start, config.steps) of `stage`; returns the losses of the steps run in this call.

    A fresh run needs an empty (or new) config.output, or `overwrite` to replace the training run there; `resume`
    continues that run from its newest intact checkpoint (from step 0 if it has none), provided its data and
    model files are those it started with. The output is locked for the whole call: a second run into it is
    refused. See output.py for what is refused and checkpoint.py for what a checkpoint holds.
    """
    with hold_output(config, resume, overwrite):
        return _train(stage, config, resume, show_progress, overwrite)


def _train(stage: Stage, config: TrainConfig, resume: bool, show_progress: bool, overwrite: bool) -> list[float]:
    rank, world = distributed_context()
    params = [p for p in stage.model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters (no LoRA adapter?)")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    inputs = input_fingerprint(config)
    record = True  # a fresh run, or a run of an older version, records what it trains on
    if resume:
        _check_same_run(stored_config(config.output), config, os.path.join(config.output, RUN_CONFIG))
        record = stored_inputs(config.output) is None
        if not record:
            check_same_inputs(config, inputs)
    _barrier(world)  # every rank has looked at --output before rank 0 changes it
    if rank == 0:
        prepare_output(config, overwrite)
        if record:
            record_inputs(config.output, inputs)
        clean_checkpoints(_checkpoints(config))
    _barrier(world)
    start, last_checkpoint = 0, None
    if resume:
        start, last_checkpoint = _restore(stage, optimizer, scheduler, config, rank)
    log_path = os.path.join(config.output, config.log_file)
    if rank == 0:
        _restart_log(log_path, start)
    seed_dropout_per_rank(config.seed, start, rank, world)

    losses = []
    progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {stage.name}",
                    disable=not show_progress or rank != 0, dynamic_ncols=True)
    stage.model.train()
    for step in progress:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, tokens = stage.step(step)
        if world > 1:
            loss = _average_gradients(params, loss, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        # Every rank holds the same averaged loss and gradients, so every rank stops at the same step.
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm}: "
                                   f"training diverged and stopped before applying this step; "
                                   f"{_kept(last_checkpoint)}. {_DIVERGED_FIX}")
        optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - started
        losses.append(loss)
        record = dict(step=step + 1, loss=loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                      tokens=tokens * world, seconds=round(elapsed, 4))
        checkpoint_due = (step + 1) % config.save_steps == 0 and step + 1 < config.steps
        if checkpoint_due:
            _check_finite_weights(params, step + 1, last_checkpoint)  # on every rank: their weights are identical
        if rank == 0:
            _append_log(log_path, record, sync=checkpoint_due)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens * world / elapsed:,.0f}")
            if checkpoint_due:
                last_checkpoint = save_checkpoint(_checkpoints(config), step + 1, stage.model.save_pretrained,
                                                  _trainer_state(optimizer, scheduler, config, step + 1))
    _check_finite_weights(params, config.steps, last_checkpoint)
    if rank == 0:
        _save_final(stage, config.output)
    _barrier(world)
    return losses


_DIVERGED_FIX = ("Lower --learning-rate (or use --dtype bfloat16 or float32 instead of float16) and start again "
                 "with --overwrite.")


def _kept(checkpoint: str | None) -> str:
    if checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint {checkpoint} is kept; nothing later was saved"


def _check_finite_weights(params, step: int, last_checkpoint: str | None) -> None:
    # A finite gradient can still overflow a weight; such an adapter is never saved.
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()
    if not bool(finite):
        raise TrainingDiverged(f"step {step}: the adapter weights are no longer finite: training diverged; "
                               f"{_kept(last_checkpoint)}. {_DIVERGED_FIX}")


def _checkpoints(config: TrainConfig) -> str:
    return os.path.join(config.output, CHECKPOINTS)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _trainer_state(optimizer, scheduler, config: TrainConfig, step: int) -> dict:
    return dict(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=_rng_state(),
                config=config.to_dict())


def _restore(stage, optimizer, scheduler, config, rank: int) -> tuple[int, str | None]:
    """Load the newest intact checkpoint of config.output; (its step, its directory), or (0, None) without one.

    A checkpoint that is damaged, or whose content does not fit this run (a crafted or foreign one: tensors of
    other shapes, a step outside [0, --steps], an RNG state that is none, ...) is skipped with a message naming
    it and why, for the next older one; nothing of a skipped checkpoint stays applied."""
    report = rank == 0
    for directory, state, problem in checkpoint_candidates(_checkpoints(config)):
        if problem is None:
            # The run's own options were checked against RUN_CONFIG: a checkpoint of other ones is not the run's.
            changed = _changed_options(state["config"], config)
            if changed:
                problem = f"it was written with other options than the run's ({', '.join(changed)})"
            else:
                problem = _apply_checkpoint(stage, optimizer, scheduler, config, directory, state)
            if problem is None:
                return state["step"], directory
        if report:
            report_skipped(directory, problem)
    if report:
        print(f"--resume: no intact checkpoint in {_checkpoints(config)}; starting from step 0", file=sys.stderr)
    return 0, None


def _apply_checkpoint(stage, optimizer, scheduler, config, directory: str, state: dict) -> str | None:
    """Load checkpoint `directory` (its decoded `state`) into the adapter, optimizer, scheduler and RNGs; None on
    success, else why it does not fit this run, with everything as it was before the call."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    step = state["step"]
    if step > config.steps:
        return f"its step {step} lies beyond --steps {config.steps}"
    current = get_peft_model_state_dict(stage.model)
    try:
        adapter = load_file(os.path.join(directory, "adapter_model.safetensors"))
    except Exception as error:  # noqa: BLE001 - a crafted file may fail anywhere in the decoder
        return f"adapter_model.safetensors does not decode ({' '.join(str(error).split())[:200]})"
    problem = _adapter_problem(adapter, current) or _optimizer_problem(state["optimizer"], optimizer) or \
        _scheduler_problem(state["scheduler"], scheduler, step)
    if problem is not None:
        return problem
    saved = ({name: tensor.detach().clone() for name, tensor in current.items()},
             copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict()), _rng_state())
    try:
        set_peft_model_state_dict(stage.model, adapter)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
    except Exception as error:  # noqa: BLE001 - put everything back, then skip the checkpoint
        set_peft_model_state_dict(stage.model, saved[0])
        optimizer.load_state_dict(saved[1])
        scheduler.load_state_dict(saved[2])
        _set_rng_state(saved[3])
        return f"it does not load into this run ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return None


def _adapter_problem(adapter: dict, current: dict) -> str | None:
    """Why checkpoint adapter tensors `adapter` cannot replace the model's `current` ones, or None."""
    if set(adapter) != set(current):
        unknown, missing = sorted(set(adapter) - set(current)), sorted(set(current) - set(adapter))
        return f"its adapter does not fit the model (unknown tensors {unknown[:3]}, missing {missing[:3]})"
    for name, tensor in adapter.items():
        if tensor.shape != current[name].shape or tensor.dtype != current[name].dtype:
            return (f"its adapter tensor {name} is {tensor.dtype} {list(tensor.shape)}, the model's "
                    f"{current[name].dtype} {list(current[name].shape)}")
        if not bool(torch.isfinite(tensor).all()):
            return f"its adapter tensor {name} holds non-finite values"
    return None


def _optimizer_problem(saved: dict, optimizer) -> str | None:
    """Why optimizer state `saved` does not fit `optimizer` (group count and hyper-parameters, parameters per
    group, the shape of each moment), or None. torch checks only the counts, and a moment of another shape would
    fail at the next step, or broadcast silently."""
    mine = optimizer.state_dict()["param_groups"]
    groups = saved["param_groups"]
    if len(groups) != len(mine):
        return f"its optimizer has {len(groups)} parameter groups, this run's {len(mine)}"
    positions = {}
    for group, own, params in zip(groups, mine, (g["params"] for g in optimizer.param_groups)):
        ids = group.get("params")
        if not isinstance(ids, list) or len(ids) != len(own["params"]):
            return "its optimizer holds another number of parameters than this run's"
        for key, value in own.items():
            # A key an older torch did not save is filled in by load_state_dict; one that is there must agree.
            if key not in ("params", "lr", "initial_lr") and key in group and group[key] != value:
                return f"its optimizer's {key} is {group[key]!r}, this run's {value!r}"
        lr = group.get("lr")
        if not isinstance(lr, float) or not math.isfinite(lr) or lr < 0:
            return f"its optimizer's learning rate {lr!r} is not a finite number >= 0"
        positions.update(zip((i for i in ids if isinstance(i, (int, str))), params))
    for key, entry in saved["state"].items():
        param = positions.get(key)
        if param is None or not isinstance(entry, dict):
            return f"its optimizer state names a parameter {key!r} that the run does not have"
        for name, value in entry.items():
            if name == "step":
                ok = isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()
            else:
                ok = isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_floating_point()
            if ok and not bool(torch.isfinite(value).all()):
                return f"its optimizer's {name} of a {list(param.shape)} parameter holds non-finite values"
            if not ok:
                shown = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else \
                    type(value).__name__
                return f"its optimizer's {name} of a {list(param.shape)} parameter is {shown}"
    return None


def _scheduler_problem(saved: dict, scheduler, step: int) -> str | None:
    """Why scheduler state `saved` is not that of `scheduler` after `step` steps, or None."""
    if saved.get("last_epoch") != step or type(saved.get("last_epoch")) is not int:
        return f"its learning-rate schedule is at step {saved.get('last_epoch')!r}, its trainer state at {step}"
    if saved.get("base_lrs") != scheduler.base_lrs:
        return f"its learning-rate schedule peaks at {saved.get('base_lrs')!r}, this run's at {scheduler.base_lrs}"
    return None


def _check_same_run(stored: dict | None, config: TrainConfig, source: str) -> None:
    if stored is None:
        return
    changed = _changed_options(stored, config)
    if changed:
        raise UserError(f"cannot resume from {source}: option(s) {sorted(changed)} differ from that run's; resume "
                        f"with the same options, or start a new run in another --output (or with --overwrite)")


def _changed_options(stored: dict, config: TrainConfig) -> list[str]:
    """The options of `config` that differ from the `stored` ones and must not change on a resume."""
    current = config.to_dict()
    return sorted({k for k in set(stored) | set(current) if stored.get(k) != current.get(k)} - _RESUMABLE_CHANGES)


def _restart_log(path: str, start: int) -> None:
    """Keep the log records of steps <= start, atomically (a kill mid-append may have left a partial last line)."""
    kept = []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
    write_atomic(path, "".join(kept).encode())


def _append_log(path: str, record: dict, sync: bool) -> None:
    """Append one record; `sync` before a checkpoint, so that no power cut loses records the checkpoint covers."""
    # The log was created by this run (_restart_log); O_NOFOLLOW refuses a symlink swapped in since.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(record) + "\n")
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _save_final(stage: Stage, output: str) -> None:
    """The stage's save, built in a temporary directory, then each file renamed into `output`."""
    staging = make_staging(output, "final")
    stage.save(staging)
    seal(staging)
    names = sorted(os.listdir(staging))
    record_outputs(output, names)
    move_files(staging, output, names)


def _average_gradients(params, loss: float, world: int) -> float:
    # Plain all-reduce instead of a DDP wrapper: it works the same with peft and gradient checkpointing, and the
    # contrastive stages already all-gather their embeddings with gradients (see contrastive.gather_with_grad).
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world
    value = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(value)
    return float(value) / world
