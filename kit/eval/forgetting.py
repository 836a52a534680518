"""Forgetting: what finetuning cost the pretraining objective, on held-out (test-split) subjects.

Next-event loss, perplexity and top-10 accuracy of the pretrained base and of the finetuned model, on the same rows.
"""

from __future__ import annotations

from typing import Any

MEASURES = ("loss", "perplexity", "top10_accuracy")


def measure_forgetting(base, model, ds, device, *, max_rows: int = 1000, seed: int = 0, batch_size: int = 32,
                       bf16: bool = True) -> dict[str, Any]:
    """Before/after next-event metrics; `base` is the pretrained KitModel, or None when there was none."""
    from kit.eval.scoring import next_event_metrics
    from kit.models import KitModel
    from kit.train.finetune import _pick, pretraining_rows

    if not isinstance(base, KitModel):
        return {"note": "Next-event forgetting was not measured: no pretrained base model in this run (pretraining "
                        "skipped)."}
    rows = _pick(pretraining_rows(ds, "test"), max_rows, seed)
    if not rows:
        return {"note": "Forgetting was not measured: no held-out (test-split) sequences."}
    before = next_event_metrics(base.to(device), rows, device, batch_size=batch_size, bf16=bf16)
    after = next_event_metrics(model, rows, device, batch_size=batch_size, bf16=bf16)
    return {
        "note": f"Next-event objective on {len(rows)} held-out test-split sequences, before and after finetuning.",
        "rows": len(rows),
        "next_event": {k: {"before": before[k], "after": after[k]} for k in MEASURES},
    }


# ---------------------------------------------------------------- held-out tasks (--hold-out-task)

PROBE = ("logistic regression (ridge for regression) on the standardized final hidden state at the task token, "
         "fit on train-split rows of the frozen model, scored on the test split")
PROBE_TRAIN_ROWS = 2000  # a fixed subsample: enough for a linear probe on a few hundred features


def task_features(model, rows, device, *, batch_size: int = 64, bf16: bool = True):
    """The final hidden state at each row's task token (its last real token), (n, hidden), as a numpy array."""
    import numpy as np
    import torch

    from kit.models.heads import gather_positions
    from kit.train.batching import collate, model_inputs
    from kit.train.objectives import autocast, used_inputs

    model.eval()
    chunks = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size])
            inputs = model_inputs(batch, device, used_inputs(model))
            with autocast(torch.device(device), bf16):
                out = model(**inputs, compute_lm_logits=False)
            chunks.append(gather_positions(out.hidden_states, inputs["task_positions"]).float().cpu().numpy())
    hidden = model.config.backbone.hidden_size
    return np.concatenate(chunks) if chunks else np.zeros((0, hidden), dtype=np.float32)


def probe_scores(model, ds, task: str, kind: str, device, *, seed: int, bf16: bool, batch_size: int = 64):
    """Test-split scores of a linear probe fit on the frozen model's train-split features (None if no train rows)."""
    import numpy as np

    from kit.eval.baseline import fit_baseline
    from kit.eval.scoring import targets_array
    from kit.train.finetune import _pick

    train = _pick(ds.splits["train"][task].rows, PROBE_TRAIN_ROWS, seed)
    test = ds.splits["test"][task].rows
    if not train or not test:
        return None
    x_train = task_features(model, train, device, batch_size=batch_size, bf16=bf16)
    x_test = task_features(model, test, device, batch_size=batch_size, bf16=bf16)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    try:
        fitted = fit_baseline(kind, (x_train - mean) / std, targets_array(kind, train), seed=seed)
    except ValueError:  # e.g. a multiclass task with one class among the train rows: nothing to fit
        return None
    scores = np.asarray(fitted.predict_scores((x_test - mean) / std))
    width = int(ds.manifest["tasks"][task]["num_outputs"])
    if kind == "multiclass" and scores.shape[1] < width:  # classes absent from the train rows score 0
        scores = np.pad(scores, ((0, 0), (0, width - scores.shape[1])))
    return scores, len(train)


def measure_held_out(before, after, ds, tasks: list[str], device, *, seed: int = 0, n_boot: int = 500,
                     bf16: bool = True, batch_size: int = 64, before_note: str = "") -> dict[str, Any]:
    """Per held-out task: the probe's primary metric before and after finetuning on the test split, and the change
    with a paired subject-level bootstrap interval. `before` is the model finetuning started from."""
    import numpy as np

    from kit.eval.metrics import bootstrap, metric_fn, paired_difference
    from kit.eval.scoring import targets_array

    out: dict[str, Any] = {}
    for name in tasks:
        info = ds.manifest["tasks"][name]
        kind = info["type"]
        metric = info.get("metric") or ("mae" if kind == "regression" else "auroc")
        try:
            fn = metric_fn(kind, metric)
        except KeyError:
            metric = "mae" if kind == "regression" else "auroc"
            fn = metric_fn(kind, metric)
        test = ds.splits["test"][name]
        entry: dict[str, Any] = {"type": kind, "metric": metric, "probe": PROBE, "n_test": len(test.rows)}
        b = probe_scores(before, ds, name, kind, device, seed=seed, bf16=bf16, batch_size=batch_size)
        a = probe_scores(after, ds, name, kind, device, seed=seed, bf16=bf16, batch_size=batch_size)
        if b is None or a is None:
            entry["note"] = "not measured: no train or test rows, or a single outcome among the train rows"
            out[name] = entry
            continue
        y = targets_array(kind, test.rows)
        clusters = np.asarray(test.subject_ids)
        vb = bootstrap(fn, y, b[0], n_boot=n_boot, seed=seed, clusters=clusters)
        va = bootstrap(fn, y, a[0], n_boot=n_boot, seed=seed, clusters=clusters)
        change = paired_difference(fn, y, a[0], b[0], n_boot=n_boot, seed=seed, clusters=clusters)
        entry.update({
            "n_train": b[1], "subjects": int(len(np.unique(clusters))),
            "before": vb.value, "before_ci95": [vb.low, vb.high],
            "after": va.value, "after_ci95": [va.low, va.high],
            "change": change.value, "change_ci95": [change.low, change.high],
        })
        if before_note:
            entry["note"] = before_note
        out[name] = entry
    return out
