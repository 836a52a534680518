"""LiNeS scaling: exact at the ends, layer-depth schedule in between, on real KitModel state dicts."""

import pytest
import torch

from kit.models import BackboneConfig, InputsConfig, KitModel, ModelConfig, TaskSpec
from kit.train.lines import lines_lambda, lines_scale, num_layers


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
