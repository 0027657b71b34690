"""The optimisation loop every stage shares: AdamW with warmup and linear decay over the steps actually run,
gradient clipping, data-parallel gradient averaging under torchrun, a loss log, checkpoints and exact resume.

A stage (see `Stage`) owns its trainable model and data; `train` asks it for one backward pass per step.
"""

from __future__ import annotations

import glob
import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .config import TrainConfig

STATE_FILE = "trainer_state.pt"


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


def example_generator(seed: int, step: int, example: int) -> torch.Generator:
    """A generator private to one example of one step (e.g. its MNTP masks): independent of the global RNG and
    of which other examples share the batch or the rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_000_019 + example)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) under torchrun, initialising the process group once; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
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


def latest_checkpoint(output: str) -> str | None:
    found = glob.glob(os.path.join(output, "checkpoints", "step-*", STATE_FILE))
    if not found:
        return None
    return os.path.dirname(max(found, key=lambda p: int(p.split("step-")[-1].split(os.sep)[0])))


# Options that may differ between a run and its resumption; every other one must match.
_RESUMABLE_CHANGES = {"steps", "save_steps", "device", "log_file"}


def train(stage: Stage, config: TrainConfig, resume: bool = False, show_progress: bool = True) -> list[float]:
    """Run steps [start, config.steps) of `stage`; returns the losses of the steps run in this call."""
    rank, world = distributed_context()
    params = [p for p in stage.model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters (no LoRA adapter?)")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    os.makedirs(config.output, exist_ok=True)
    log_path = os.path.join(config.output, config.log_file)
    start = 0
    checkpoint = latest_checkpoint(config.output) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {config.output}/checkpoints; start without --resume")
    if checkpoint:
        start = _load_checkpoint(checkpoint, stage, optimizer, scheduler, config)
        _truncate_log(log_path, start)
    elif os.path.exists(log_path) and rank == 0:
        os.remove(log_path)
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
        optimizer.step()
        scheduler.step()
        elapsed = time.perf_counter() - started
        losses.append(loss)
        record = dict(step=step + 1, loss=loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                      tokens=tokens * world, seconds=round(elapsed, 4))
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens * world / elapsed:,.0f}")
            if (step + 1) % config.save_steps == 0 and step + 1 < config.steps:
                _save_checkpoint(stage, optimizer, scheduler, config, step + 1)
    if rank == 0:
        stage.save(config.output)
        with open(os.path.join(config.output, "train_config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    if world > 1:
        dist.barrier()
    return losses


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


def _save_checkpoint(stage, optimizer, scheduler, config, step: int) -> None:
    directory = os.path.join(config.output, "checkpoints", f"step-{step}")
    staging = directory + ".tmp"
    os.makedirs(staging, exist_ok=True)
    stage.model.save_pretrained(staging)
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=_rng_state(),
                    config=config.to_dict()), os.path.join(staging, STATE_FILE))
    if os.path.isdir(directory):
        import shutil

        shutil.rmtree(directory)
    os.replace(staging, directory)  # a checkpoint exists whole or not at all


def _load_checkpoint(directory, stage, optimizer, scheduler, config) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(os.path.join(directory, STATE_FILE), weights_only=False)
    changed = {k for k, v in state["config"].items() if config.to_dict().get(k) != v} - _RESUMABLE_CHANGES
    if changed:
        raise ValueError(f"cannot resume from {directory}: option(s) {sorted(changed)} differ from the checkpoint's; "
                         f"resume with the same options, or start a new run in another --output")
    set_peft_model_state_dict(stage.model, load_file(os.path.join(directory, "adapter_model.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"]


def _truncate_log(path: str, start: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
    with open(path, "w") as f:
        f.writelines(kept)
