"""The optimisation loop shared by pretraining and finetuning: AdamW, warmup-cosine, clipping, accumulation,
periodic evaluation with early stopping, atomic checkpoints and exact resume.

Batches are a pure function of (seed, step, micro-batch), so a resumed run replays exactly the steps an
uninterrupted run would have taken, and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kit.errors import KitError
from kit.fsutil import atomic_dir
from kit.train import distributed
from kit.train.checkpoint import TrainState, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from kit.train.config import OptimSection
from kit.train.schedule import make_scheduler

LossFn = Callable[[int, int], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[], tuple[float, dict[str, float]]]  # (score, higher is better; details)
ProgressFn = Callable[[int, int, dict], None]


@dataclass
class LoopSettings:
    run_dir: Path
    steps: int
    optim: OptimSection
    checkpoint_every: int = 50
    eval_every: int | None = None
    patience: int = 0
    resume: bool = True
    stop_at: int | None = None  # testing aid: raise KeyboardInterrupt after this step, as a kill would


class NonFiniteLoss(KitError):
    pass


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def _save_best(run_dir: Path, model: torch.nn.Module) -> None:
    with atomic_dir(run_dir / "best") as tmp:
        save_file({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))


def load_best(run_dir: Path, model: torch.nn.Module) -> bool:
    f = Path(run_dir) / "best" / "model.safetensors"
    if not f.exists():
        return False
    model.load_state_dict(load_file(str(f)))
    return True


def _tensorboard(run_dir: Path):
    """A TensorBoard writer under run_dir/tensorboard when tensorboard is installed; None otherwise."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def run_loop(
    model: torch.nn.Module,
    loss_fn: LossFn,
    settings: LoopSettings,
    *,
    evaluate: EvalFn | None = None,
    progress: ProgressFn | None = None,
) -> TrainState:
    """Train `model` in place for `settings.steps` optimizer steps; returns the final TrainState.

    With `evaluate`, the best weights by its score are restored at the end, and training stops early after
    `patience` evaluations without improvement.
    """
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise KitError("no trainable parameters")
    o = settings.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    scheduler = make_scheduler(optimizer, warmup_steps=o.warmup_steps, total_steps=settings.steps, min_ratio=o.min_lr_ratio)
    state = TrainState()
    existing = list_checkpoints(run_dir) if settings.resume else []
    if existing:
        ck = load_checkpoint(existing[-1])
        try:
            model.load_state_dict(ck.model_state)
        except RuntimeError as exc:
            raise KitError(f"{ck.path}: checkpoint does not fit this model ({str(exc).splitlines()[0]}); "
                           "was the config changed? start a fresh --workdir") from None
        optimizer.load_state_dict(ck.optimizer_state)
        if ck.scheduler_state:
            scheduler.load_state_dict(ck.scheduler_state)
        restore_rng(ck.rng)
        state = ck.state
    main = distributed.current().is_main
    log_path = run_dir / "metrics.jsonl"
    log = log_path.open("a") if main else None
    board = _tensorboard(run_dir) if main else None

    def checkpoint() -> None:
        if main:
            save_checkpoint(run_dir, model_state=_trainable_state(model), optimizer=optimizer, scheduler=scheduler, state=state)

    try:
        while state.step < settings.steps and not state.extra.get("stopped_early"):
            step = state.step
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            parts: dict[str, float] = {}
            total = 0.0
            for micro in range(o.grad_accum):
                try:
                    loss, p = loss_fn(step, micro)
                except torch.OutOfMemoryError:
                    raise KitError(
                        f"out of memory at step {step + 1} with batch size {o.batch_size}",
                        hint=f"lower the batch size (e.g. --set finetune.optim.batch_size={max(1, o.batch_size // 2)}) "
                        f"and raise grad_accum to keep the effective batch, or lower tokenizer.max_len",
                    ) from None
                if not torch.isfinite(loss):
                    last = list_checkpoints(run_dir)
                    raise NonFiniteLoss(
                        f"loss is {loss.item()} at step {step + 1} (micro-batch {micro}); stopped. "
                        + (f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"),
                        hint="lower the learning rate (--set finetune.optim.lr=...) or check the task labels",
                    )
                (loss / o.grad_accum).backward()
                total += float(loss.detach()) / o.grad_accum
                for k, v in p.items():
                    parts[k] = parts.get(k, 0.0) + v / o.grad_accum
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip))
            optimizer.step()
            scheduler.step()
            state.step = step + 1
            record = {"step": state.step, "loss": total, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "seconds": time.perf_counter() - t0, "tasks": parts}
            if evaluate is not None and settings.eval_every and (state.step % settings.eval_every == 0 or state.step == settings.steps):
                score, details = evaluate()
                record["eval"] = {"score": score, **details}
                best = state.best_metric
                if best is None or (not math.isnan(score) and (math.isnan(best) or score > best)):
                    state.best_metric, state.best_step, state.bad_evals = score, state.step, 0
                    if main:
                        _save_best(run_dir, model)
                else:
                    state.bad_evals += 1
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if board is not None:
                board.add_scalar("loss", total, state.step)
                for k, v in parts.items():
                    board.add_scalar(f"loss/{k}", v, state.step)
                if "eval" in record:
                    board.add_scalar("eval/score", record["eval"]["score"], state.step)
            if progress is not None and main:
                progress(state.step, settings.steps, record)
            if settings.patience and state.bad_evals >= settings.patience:
                state.extra["stopped_early"] = True
            if state.step % settings.checkpoint_every == 0 or state.step == settings.steps or state.extra.get("stopped_early"):
                checkpoint()
            if settings.stop_at is not None and state.step >= settings.stop_at:
                raise KeyboardInterrupt
    finally:
        if log is not None:
            log.close()
        if board is not None:
            board.close()
    distributed.barrier()  # rank 0 has written the best weights before anyone reads them
    if evaluate is not None:
        load_best(run_dir, model)
    return state
