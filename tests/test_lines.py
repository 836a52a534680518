"""LiNeS scaling: exact at the ends, layer-depth schedule in between, on real KitModel state dicts."""

import pytest
import torch

from kit.models import BackboneConfig, InputsConfig, KitModel, ModelConfig, TaskSpec
from kit.train.lines import (apply_lines, choose_point, lines_grid, lines_lambda, lines_scale, load_state, model_state,
                             num_layers, save_state, start_state, tied_aliases)


@pytest.fixture(params=["mamba", "transformer"])
def pair(request):
    torch.manual_seed(0)
    backbone = BackboneConfig(kind=request.param, size="tiny", vocab_size=40)
    base = KitModel(ModelConfig(backbone=backbone, inputs=InputsConfig(), tasks=[]))
    ft = KitModel(ModelConfig(backbone=backbone, inputs=InputsConfig(), tasks=[TaskSpec(name="a", type="binary", num_outputs=1)]))
    ft.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a finetuning update
    return base.state_dict(), ft.state_dict()


def test_alpha1_beta0_is_the_finetuned_model_and_alpha0_beta0_the_base(pair):
    base, ft = pair
    same_ft = lines_scale(base, ft, 1.0, 0.0)
    assert all(torch.equal(same_ft[k], ft[k]) for k in ft)
    same_base = lines_scale(base, ft, 0.0, 0.0)
    for k in ft:
        if k in base:
            assert torch.equal(same_base[k], base[k]), k
        else:  # a task head new at finetuning has no base: kept as finetuned
            assert k.startswith("task_heads.") and torch.equal(same_base[k], ft[k])


def test_update_scales_with_depth(pair):
    base, ft = pair
    n = num_layers(ft)
    assert n >= 2
    out = lines_scale(base, ft, 0.2, 0.6)
    for k in ft:
        if k not in base or not ft[k].is_floating_point() or torch.equal(ft[k], base[k]):
            continue
        lam = lines_lambda(k, n, 0.2, 0.6)
        torch.testing.assert_close(out[k], base[k] + lam * (ft[k] - base[k]))
    first = next(k for k in ft if ".layers.0." in k)
    last = next(k for k in ft if f".layers.{n - 1}." in k)
    assert lines_lambda(first, n, 0.2, 0.6) == pytest.approx(0.2) and lines_lambda(last, n, 0.2, 0.6) == pytest.approx(0.8)
    emb = next(k for k in ft if "embed" in k)
    assert lines_lambda(emb, n, 0.2, 0.6) == 0.2


def test_grid_keeps_alpha_plus_beta_within_bound_and_always_the_finetuned_point():
    pts = lines_grid([0.0, 0.5, 1.0], [0.0, 0.5, 1.0], max_scale=1.0)
    assert pts == [(0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 0.0), (0.5, 0.5), (1.0, 0.0)]
    assert (1.0, 0.0) in lines_grid([0.2], [0.3])


def test_choice_is_least_forgetting_within_the_allowed_score_drop():
    nan = float("nan")
    curve = [{"alpha": 0.0, "beta": 0.0, "task_score": 0.60, "forgetting": 0.0},
             {"alpha": 0.5, "beta": 0.0, "task_score": 0.795, "forgetting": 0.10},
             {"alpha": 0.5, "beta": 0.5, "task_score": 0.80, "forgetting": 0.30},
             {"alpha": 1.0, "beta": 0.0, "task_score": 0.79, "forgetting": 0.50},
             {"alpha": 0.25, "beta": 0.0, "task_score": nan, "forgetting": 0.01}]
    assert choose_point(curve, 0.01) == 1  # within 0.01 of the best (0.80), and forgets least
    assert choose_point(curve, 0.0) == 2   # no drop allowed: the best score
    assert choose_point(curve, 0.5) == 0
    assert choose_point([{**c, "task_score": nan} for c in curve], 0.01) == 3  # nothing scored: the finetuned model


def test_tied_lm_head_stays_tied_and_states_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(1)
    backbone = BackboneConfig(kind="mamba", size="tiny", vocab_size=40)
    model = KitModel(ModelConfig(backbone=backbone, inputs=InputsConfig(), tasks=[TaskSpec(name="a", type="binary", num_outputs=1)]))
    assert tied_aliases(model.state_dict()) == {"lm_head.weight": "backbone.embeddings.weight"}
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    ft_sd = {k: v.clone() for k, v in model.state_dict().items()}
    finetuned = model_state(model)
    assert "lm_head.weight" not in finetuned  # stored once, as the embedding
    start = start_state(KitModel(ModelConfig(backbone=backbone, inputs=InputsConfig(), tasks=[])))
    assert not any(k.startswith("task_heads.") for k in start)
    saved = load_state(save_state(finetuned, tmp_path / "ft.safetensors"))
    assert all(torch.equal(saved[k], finetuned[k]) for k in finetuned)
    apply_lines(model, start, saved, 0.3, 0.4)
    assert model.lm_head.weight.data_ptr() == model.backbone.get_input_embeddings().weight.data_ptr()
    apply_lines(model, start, saved, 1.0, 0.0)
    assert all(torch.equal(model.state_dict()[k], ft_sd[k]) for k in ft_sd)
