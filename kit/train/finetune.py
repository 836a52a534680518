"""Pretraining and multitask prompted finetuning runs over a built dataset.

    pretrain(ds, config, run_dir)                        -> KitModel (next-event objective)
    finetune(ds, config, run_dir, base=...)              -> KitModel with task heads
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from kit.errors import KitError
from kit.eval.metrics import metric_fn
from kit.eval.scoring import next_event_metrics, scores_from_outputs, targets_array, task_logits
from kit.models import InputsConfig, KitModel, ModelConfig, TaskSpec, apply_lora, merge_lora
from kit.models.config import BackboneConfig
from kit.train import distributed
from kit.train.batching import Row
from kit.train.config import TrainConfig
from kit.train.data import LoadedDataset, mixing_probabilities, sample_batch
from kit.train.loop import LoopSettings, ProgressFn, run_loop
from kit.train.objectives import multitask_loss, pretrain_loss

log = logging.getLogger(__name__)
NUM_TOKEN_TYPES = 9  # kit.tokenizer.TOKEN_TYPES


def dist_main() -> bool:
    return distributed.current().is_main


def resolve_device(name: str) -> torch.device:
    if name == "auto" or name == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.current().local_rank)
    if name == "cuda":
        raise KitError("device 'cuda' requested but no CUDA GPU is available", hint="use --device cpu")
    return torch.device("cpu")


def inputs_config(config: TrainConfig) -> InputsConfig:
    m = config.model
    return InputsConfig(
        time=m.time_embeddings,
        age=m.age_embeddings,
        num_token_types=NUM_TOKEN_TYPES if m.type_embeddings else 0,
        max_visits=m.visit_embeddings,
    )


def new_model(ds: LoadedDataset, config: TrainConfig, tasks: list[TaskSpec]) -> KitModel:
    torch.manual_seed(config.seed)
    backbone = BackboneConfig(kind=config.model.backbone, size=config.model.size, vocab_size=ds.vocab_size)
    return KitModel(ModelConfig(backbone=backbone, inputs=inputs_config(config), tasks=tasks))


def pretraining_rows(ds: LoadedDataset, split: str) -> list[Row]:
    """History sequences for the next-event objective: the forecast task's rows, else every task's."""
    name = ds.forecast_task()
    if name is not None and ds.splits[split][name].rows:
        return ds.splits[split][name].rows
    return [r for t in ds.splits[split].values() for r in t.rows]


def _pick(rows: list[Row], n: int, seed: int) -> list[Row]:
    if len(rows) <= n:
        return rows
    idx = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    return [rows[i] for i in sorted(idx)]


def pretrain(
    ds: LoadedDataset,
    config: TrainConfig,
    run_dir: Path,
    *,
    progress: ProgressFn | None = None,
    stop_at: int | None = None,
) -> KitModel:
    device = resolve_device(config.device)
    model = new_model(ds, config, tasks=[]).to(device)
    train_rows = pretraining_rows(ds, "train")
    if not train_rows:
        raise KitError(f"{ds.root}: no train sequences to pretrain on")
    val_rows = _pick(pretraining_rows(ds, "val"), 256, config.seed)
    bs = config.pretrain.optim.batch_size
    rank = distributed.current().rank
    ddp = distributed.wrap(model, device)

    def loss_fn(step: int, micro: int):
        rng = np.random.default_rng([config.seed, 1, step, micro, rank])
        rows = [train_rows[i] for i in rng.integers(0, len(train_rows), bs)]
        return pretrain_loss(ddp.train(), rows, device, bf16=config.bf16)

    def evaluate():
        m = next_event_metrics(model, val_rows, device, bf16=config.bf16)
        return -m["loss"], m

    settings = LoopSettings(
        run_dir=run_dir, steps=config.pretrain.steps, optim=config.pretrain.optim,
        checkpoint_every=config.finetune.checkpoint_every, eval_every=max(1, config.pretrain.steps // 4) if val_rows else None,
        stop_at=stop_at,
    )
    run_loop(model, loss_fn, settings, evaluate=evaluate if val_rows else None, progress=progress)
    return model.eval()


def validation_score(model, ds: LoadedDataset, tasks: list[TaskSpec], device, config: TrainConfig, split: str = "val") -> tuple[float, dict]:
    """Mean over tasks of each task's primary metric on `split` (tasks whose metric is undefined are skipped, and so
    are classification tasks with fewer than `finetune.min_val_positives` positive or negative rows there: they are
    reported in the per-task dict but do not steer early stopping)."""
    per_task, counted = {}, []
    for t in tasks:
        # A fixed subsample keeps frequent evaluation cheap; the test split is always scored in full.
        rows = _pick(ds.splits[split][t.name].rows, config.max_eval_rows, config.seed)
        if not rows:
            continue
        metric = ds.manifest["tasks"][t.name].get("metric", "auroc")
        try:
            fn = metric_fn(t.type, metric)
        except KeyError:
            fn, metric = metric_fn(t.type, "auroc" if t.type != "regression" else "mae"), "auroc"
        scores = scores_from_outputs(t.type, task_logits(model, rows, t.name, device, batch_size=config.eval_batch_size, bf16=config.bf16))
        y = targets_array(t.type, rows)
        value = fn(y, scores)
        per_task[t.name] = -value if metric == "mae" else value
        if _enough_positives(t.type, y, config.finetune.min_val_positives):
            counted.append(per_task[t.name])
    vals = [v for v in counted if not math.isnan(v)]
    return (float(np.mean(vals)) if vals else float("nan")), per_task


def _enough_positives(kind: str, y: np.ndarray, need: int) -> bool:
    if kind == "binary":
        pos = int(np.sum(y == 1))
        return min(pos, len(y) - pos) >= need
    if kind == "multiclass":  # at least two classes with `need` rows each
        return int(np.sum(np.bincount(y.astype(int)) >= need)) >= 2
    if kind == "multilabel":  # some label with `need` positives and negatives
        pos = np.nansum(y, axis=0)
        return bool(np.any((pos >= need) & (len(y) - pos >= need)))
    return True


def training_tasks(ds: LoadedDataset, config: TrainConfig) -> list[TaskSpec]:
    """The tasks finetuning trains: `finetune.tasks` (default every supervised task) less `finetune.hold_out_tasks`."""
    held = list(config.finetune.hold_out_tasks)
    if held:
        ds.supervised_tasks(held)  # an unknown held-out task is an error naming the dataset's tasks
    if config.finetune.tasks and set(held) & set(config.finetune.tasks):
        raise KitError(f"task(s) {sorted(set(held) & set(config.finetune.tasks))} are both finetuned and held out",
                       hint="a --hold-out-task is left out of finetuning; do not also name it in finetune.tasks / --single-task")
    tasks = [t for t in ds.supervised_tasks(config.finetune.tasks) if t.name not in held]
    if not tasks and held:
        raise KitError(f"every supervised task is held out ({', '.join(held)}): nothing left to finetune on")
    return tasks


INITIAL_WEIGHTS = "initial.safetensors"


def _align_base_vocabulary(model: KitModel, base: Path, ds: LoadedDataset) -> tuple[KitModel, str]:
    from kit import registry
    from kit.tokenizer import PAD, Tokenizer
    from kit.train.base_vocab import align_vocabulary

    tokenizer = Tokenizer.load(ds.root / "tokenizer.json")
    try:
        token_text = getattr(registry.vertical(ds.manifest.get("vertical", "")), "token_text", None)
    except KitError:
        token_text = None
    return align_vocabulary(model, base, tokenizer.vocab, tokenizer.token_to_id[PAD], token_text)


def finetune(
    ds: LoadedDataset,
    config: TrainConfig,
    run_dir: Path,
    *,
    base: KitModel | str | Path | None = None,
    progress: ProgressFn | None = None,
    stop_at: int | None = None,
    say=None,
) -> KitModel:
    """Multitask prompted finetuning: batches mix tasks by the dataset's weights, the loss is task-balanced.

    `base`: the pretrained model, or a checkpoint directory (kit or transformers) whose token embeddings are
    re-indexed to the dataset's vocabulary (kit/train/base_vocab.py; `say` hears how)."""
    device = resolve_device(config.device)
    tasks = training_tasks(ds, config)
    if not tasks:
        raise KitError(f"{ds.root}: the dataset has no supervised task to finetune on")
    if isinstance(base, KitModel):
        model = KitModel(ModelConfig(backbone=base.config.backbone, inputs=base.config.inputs, tasks=tasks))
        missing = model.load_state_dict(base.state_dict(), strict=False)
        assert all(k.startswith("task_heads.") for k in missing.missing_keys), missing.missing_keys
    elif base is not None:
        model = KitModel.from_pretrained(base, tasks=tasks, inputs=inputs_config(config))
        model, how = _align_base_vocabulary(model, Path(base), ds)
        (say or log.info)(how)
        if model.config.backbone.vocab_size < ds.vocab_size:
            raise KitError(f"--base-model {base}: its vocabulary ({model.config.backbone.vocab_size}) is smaller than the "
                           f"dataset's tokenizer ({ds.vocab_size})", hint="pretrain on this dataset instead")
    else:
        model = new_model(ds, config, tasks)
    model = model.to(device)
    initial = Path(run_dir) / INITIAL_WEIGHTS
    if dist_main() and not initial.exists():
        # The weights finetuning starts from (every parameter but the new task heads): LiNeS scales the update
        # against exactly these, whether they came from pretraining, --base-model or a fresh init.
        from kit.train.lines import save_state, start_state

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_state(start_state(model), initial)
    trainable = model
    if config.lora.enabled:
        lc = config.lora
        trainable = apply_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules)
    types = {t.name: t.type for t in tasks}
    probs = mixing_probabilities(ds, [t.name for t in tasks])
    train = ds.splits["train"]
    fc = config.finetune
    dist_info = distributed.current()
    ddp = distributed.wrap(trainable, device)

    def loss_fn(step: int, micro: int):
        # Each rank draws its own micro-batches; rank 0 of a plain run draws exactly what it always did.
        key = micro + dist_info.rank * fc.optim.grad_accum
        rows = sample_batch(train, probs, fc.optim.batch_size, seed=config.seed, step=step, micro=key)
        ddp.train()
        return multitask_loss(ddp, rows, types, device, task_weights=fc.task_weights,
                              focal_gamma=fc.focal_gamma, keep_forecasting=fc.keep_forecasting, bf16=config.bf16)

    has_val = any(ds.splits["val"][t.name].rows for t in tasks)

    def evaluate():
        score, per_task = validation_score(trainable, ds, tasks, device, config)
        return score, {"val": per_task}

    settings = LoopSettings(
        run_dir=run_dir, steps=fc.steps, optim=fc.optim, checkpoint_every=fc.checkpoint_every,
        eval_every=fc.eval_every if has_val else None, patience=fc.patience, stop_at=stop_at,
    )
    run_loop(trainable, loss_fn, settings, evaluate=evaluate if has_val else None, progress=progress)
    if config.lora.enabled:
        model = merge_lora(trainable)
    return model.eval()


