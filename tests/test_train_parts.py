"""Loss, schedule and checkpoint pieces of the trainer."""

import json

import pytest
import torch

from kit.errors import KitError
from kit.train.checkpoint import TrainState, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from kit.train.loss import TaskTarget, balanced_loss, task_loss
from kit.train.schedule import warmup_cosine


def test_balanced_loss_gives_each_task_equal_say():
    torch.manual_seed(0)
    big = TaskTarget("binary", torch.zeros(1000, 1), torch.ones(1000, 1))  # loss log 2 each
    small = TaskTarget("binary", torch.full((2, 1), 5.0), torch.ones(2, 1))  # near-zero loss
    loss, parts = balanced_loss({"big": big, "small": small})
    assert loss.item() == pytest.approx((parts["big"] + parts["small"]) / 2)
    # A plain sample mean would sit almost on the big task's loss.
    assert abs(loss.item() - parts["big"]) > 0.3


def test_task_weights_and_sample_weights():
    a = TaskTarget("regression", torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [3.0]]), weight=torch.tensor([1.0, 0.0]))
    assert task_loss(a).item() == pytest.approx(1.0)
    b = TaskTarget("multiclass", torch.tensor([[10.0, 0.0]]), torch.tensor([1]))
    loss, parts = balanced_loss({"a": a, "b": b}, task_weights={"a": 3.0, "b": 1.0})
    assert loss.item() == pytest.approx((3 * parts["a"] + parts["b"]) / 4)


def test_multilabel_mask_ignores_unknown_labels():
    logits = torch.tensor([[0.0, 100.0]])
    t_masked = TaskTarget("multilabel", logits, torch.tensor([[1.0, 0.0]]), mask=torch.tensor([[1.0, 0.0]]))
    assert task_loss(t_masked).item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)


def test_focal_term_downweights_easy_samples():
    easy = TaskTarget("binary", torch.tensor([[4.0]]), torch.tensor([[1.0]]))
    assert task_loss(easy, focal_gamma=2.0) < task_loss(easy) * 0.01


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def _tiny_training(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model, opt, x


def test_checkpoint_round_trip_resumes_identically(tmp_path):
    model, opt, x = _tiny_training(tmp_path)
    save_checkpoint(tmp_path, model_state=model.state_dict(), optimizer=opt, scheduler=None, state=TrainState(step=3))
    # Continue the original run one step.
    opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ck = load_checkpoint(list_checkpoints(tmp_path)[-1])
    model2.load_state_dict(ck.model_state)
    opt2.load_state_dict(ck.optimizer_state)
    restore_rng(ck.rng)
    assert ck.state.step == 3
    opt2.zero_grad(); model2(x).pow(2).mean().backward(); opt2.step()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_corrupt_checkpoint_is_refused_with_file_name(tmp_path):
    model, opt, _ = _tiny_training(tmp_path)
    path = save_checkpoint(tmp_path, model_state=model.state_dict(), optimizer=opt, scheduler=None, state=TrainState(step=1))
    f = path / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(KitError, match="optimizer.safetensors"):
        load_checkpoint(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(KitError, match="state.json"):
        load_checkpoint(path)


def test_checkpoints_are_pruned(tmp_path):
    model, opt, _ = _tiny_training(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model_state=model.state_dict(), optimizer=opt, scheduler=None, state=TrainState(step=step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert json.loads((list_checkpoints(tmp_path)[-1] / "state.json").read_text())["step"] == 3


def test_out_of_memory_becomes_a_message_naming_what_to_lower(tmp_path):
    from kit.train.config import OptimSection
    from kit.train.loop import LoopSettings, run_loop

    model = torch.nn.Linear(2, 1)

    def loss_fn(step, micro):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(KitError) as err:
        run_loop(model, loss_fn, LoopSettings(run_dir=tmp_path, steps=3, optim=OptimSection(batch_size=32)))
    assert "batch size 32" in str(err.value) and "batch_size=16" in err.value.hint


def test_best_checkpoint_follows_the_first_defined_score(tmp_path):
    """An undefined (nan) first validation score must not block every later improvement; the best weights are the
    ones at the best defined score."""
    import math

    from kit.train.config import OptimSection
    from kit.train.loop import LoopSettings, load_best, run_loop

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x = torch.randn(16, 2)

    def loss_fn(step, micro):
        loss = model(x).pow(2).mean()
        return loss, {"t": float(loss.detach())}

    scores = iter([math.nan, 0.6, 0.9, 0.7])
    seen = {}

    def evaluate():
        s = next(scores)
        seen[s] = {k: v.clone() for k, v in model.state_dict().items()}
        return s, {}

    run_loop(model, loss_fn, LoopSettings(run_dir=tmp_path, steps=4, optim=OptimSection(batch_size=16, lr=0.1, warmup_steps=0),
                                          eval_every=1, patience=3), evaluate=evaluate)
    best = torch.nn.Linear(2, 1)
    assert load_best(tmp_path, best)
    assert torch.equal(best.weight, seen[0.9]["weight"])


def test_validation_score_counts_tasks_with_enough_positives_only():
    import numpy as np

    from kit.train.finetune import _enough_positives

    assert _enough_positives("binary", np.array([1] * 10 + [0] * 50), 10)
    assert not _enough_positives("binary", np.array([1] * 5 + [0] * 500), 10)  # 5 positives: not a signal to select on
    assert not _enough_positives("binary", np.array([1] * 500 + [0] * 3), 10)
    assert _enough_positives("multiclass", np.array([0] * 12 + [1] * 10 + [2]), 10)
    assert not _enough_positives("multiclass", np.array([0] * 40 + [1] * 9), 10)
    y = np.zeros((40, 3))
    y[:9, 0] = 1
    assert not _enough_positives("multilabel", y, 10)
    y[:12, 2] = 1
    assert _enough_positives("multilabel", y, 10)
    assert _enough_positives("regression", np.zeros(3), 10)
