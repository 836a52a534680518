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
        return {"note": "Forgetting was not measured: no pretrained base model in this run (pretraining skipped or an "
                        "external --base-model)."}
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
