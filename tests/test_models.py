"""Backbones: transformers is the oracle for our Mamba block; heads, embeddings, checkpoints and LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from kit.errors import KitError
from kit.models import (
    BackboneConfig,
    InputsConfig,
    KitModel,
    MambaBackbone,
    MambaSpec,
    ModelConfig,
    TaskSpec,
    apply_lora,
    build_model,
    from_pretrained,
    load_backbone,
    lora_parameters,
    merge_lora,
)

VOCAB = 61
# transformers' modeling modules are reached through attributes only inside tests: importing them imports triton,
# and triton must not be imported at collection time, before the Triton-interpreter tests choose their mode.


def tiny_hf_mamba_config(**overrides) -> transformers.MambaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, time_step_rank=4)
    return transformers.MambaConfig(**{**fields, **overrides})


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Random noise on every weight, so zero-initialised biases and unit norms are really checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def ids(batch: int = 2, length: int = 23, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_state_dict_loads_both_ways() -> None:
    torch.manual_seed(0)
    config = tiny_hf_mamba_config()
    hf = transformers.MambaModel(config).eval()
    perturb(hf)
    ours = MambaBackbone(MambaSpec.from_hf(config.to_dict())).eval()
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in hf_state.items()} == {k: v.shape for k, v in our_state.items()}

    ours.load_state_dict(hf_state, strict=True)
    back = transformers.MambaModel(config).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    x = ids()
    with torch.no_grad():
        reference = hf(x).last_hidden_state
        torch.testing.assert_close(ours(x).last_hidden_state, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x).last_hidden_state, reference, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize(
    "wrapper, overrides",
    [("MambaModel", {}), ("MambaForCausalLM", {"use_bias": True, "residual_in_fp32": False, "expand": 3})],
)
def test_load_backbone_matches_transformers(tmp_path, wrapper, overrides, impl) -> None:
    torch.manual_seed(0)
    hf = getattr(transformers, wrapper)(tiny_hf_mamba_config(**overrides)).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = load_backbone(tmp_path)
    assert isinstance(ours, MambaBackbone)
    ours.set_scan_impl(impl)
    hf_backbone = hf.backbone if wrapper == "MambaForCausalLM" else hf
    x = ids(length=70)
    mask = torch.ones_like(x)
    mask[0, :9] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(ours(x).last_hidden_state, hf_backbone(x).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours(x, attention_mask=mask).last_hidden_state,
            hf_backbone(x, attention_mask=mask).last_hidden_state,
            atol=1e-5,
            rtol=0,
        )


def test_load_backbone_llama(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_backbone(tmp_path)
    assert ours.config._attn_implementation == "sdpa"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).last_hidden_state, hf.model(x).last_hidden_state, atol=1e-5, rtol=0)


def test_streaming_state_matches_full_sequence() -> None:
    torch.manual_seed(0)
    backbone = MambaBackbone(MambaSpec(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8)).eval()
    x = ids(length=21)
    with torch.no_grad():
        full = backbone(x).last_hidden_state
        first = backbone(x[:, :2], return_state=True)  # shorter than the conv window
        second = backbone(x[:, 2:13], state=first.state, return_state=True)
        steps = [second.last_hidden_state]
        state = second.state
        for t in range(13, 21):  # one token at a time, as in generation
            out = backbone(x[:, t : t + 1], state=state, return_state=True)
            steps.append(out.last_hidden_state)
            state = out.state
    streamed = torch.cat([first.last_hidden_state, *steps], dim=1)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=0)
    # final_state (what history_state reads) skips only the output: the very same states, padding included.
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad():
        embeds = backbone.embeddings(x)
        both = backbone(inputs_embeds=embeds, attention_mask=mask, return_state=True).state
        only = backbone.final_state(embeds, mask)
    for a, b in zip([*both.conv, *both.ssm], [*only.conv, *only.ssm], strict=True):
        assert torch.equal(a, b)


TASKS = [
    TaskSpec("mortality", "binary"),
    TaskSpec("los_bucket", "multiclass", 4),
    TaskSpec("diagnoses", "multilabel", 7),
    TaskSpec("length_of_stay", "regression"),
]


def tiny_model(kind: str = "mamba", inputs: InputsConfig | None = None, **kw) -> KitModel:
    backbone = BackboneConfig(kind=kind, vocab_size=VOCAB, hidden_size=32, num_layers=2,
                              overrides={"num_attention_heads": 4} if kind == "transformer" else {})
    return build_model(ModelConfig(backbone=backbone, inputs=inputs or InputsConfig(), tasks=TASKS, **kw)).eval()


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_heads_read_the_task_token(kind) -> None:
    torch.manual_seed(0)
    model = tiny_model(kind)
    x = ids(batch=3, length=12)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0  # right padding: row 1 ends at position 7
    with torch.no_grad():
        out = model(x, mask)
        assert out.hidden_states.shape == (3, 12, 32)
        assert out.lm_logits.shape == (3, 12, VOCAB)
        assert {k: v.shape for k, v in out.task_outputs.items()} == {
            "mortality": (3, 1), "los_bucket": (3, 4), "diagnoses": (3, 7), "length_of_stay": (3, 1)}
        torch.testing.assert_close(out.task_hidden[1], out.hidden_states[1, 7])
        torch.testing.assert_close(out.task_hidden[0], out.hidden_states[0, 11])
        at = model(x, mask, task_positions=torch.tensor([2, 3, 4]), compute_lm_logits=False)
        assert at.lm_logits is None
        torch.testing.assert_close(at.task_hidden, out.hidden_states[torch.arange(3), torch.tensor([2, 3, 4])])
    assert model.lm_head.weight is model.backbone.get_input_embeddings().weight  # tied by default


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_gradient_checkpointing_gives_the_same_gradients(kind) -> None:
    torch.manual_seed(0)
    model = tiny_model(kind).train()
    x = ids(batch=2, length=20)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(x)
        (out.lm_logits.logsumexp(-1).mean() + out.task_outputs["diagnoses"].sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    inner = model.backbone.layers[0].mixer if kind == "mamba" else model.backbone.layers[0].mlp
    forward = inner.forward
    inner.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # hooks do not fire on recompute
    plain = grads()
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(calls) == 3  # the first layer ran again during backward
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_task_specs_are_validated() -> None:
    with pytest.raises(KitError, match="1 output"):
        TaskSpec("x", "binary", 2)
    with pytest.raises(KitError, match="multiclass"):
        TaskSpec("x", "multiclass", 1)
    with pytest.raises(KitError, match="unique"):
        ModelConfig(tasks=[TaskSpec("a", "binary"), TaskSpec("a", "regression")])


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_optional_embeddings_change_outputs(kind) -> None:
    torch.manual_seed(0)
    model = tiny_model(kind, InputsConfig(time=True, age=True, num_token_types=5, max_visits=8))
    x = ids(batch=2, length=10)
    batch = {
        "time": torch.linspace(0, 400, 10).repeat(2, 1),
        "age": torch.full((2, 10), 63.5),
        "token_type_ids": torch.randint(0, 5, (2, 10)),
        "visit_ids": torch.arange(10).repeat(2, 1) // 3,
    }
    with torch.no_grad():
        base = model(x, **batch).hidden_states
        for key, changed in [
            ("time", batch["time"] + 30.0),
            ("age", batch["age"] + 10.0),
            ("token_type_ids", (batch["token_type_ids"] + 1) % 5),
            ("visit_ids", batch["visit_ids"] + 1),
        ]:
            other = model(x, **{**batch, key: changed}).hidden_states
            assert not torch.allclose(other, base, atol=1e-4), key
        with pytest.raises(KitError, match="age"):
            model(x, **{k: v for k, v in batch.items() if k != "age"})


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_save_and_from_pretrained_round_trip(tmp_path, kind) -> None:
    torch.manual_seed(0)
    model = tiny_model(kind, InputsConfig(time=True, num_token_types=3))
    perturb(model)
    x = ids(batch=2, length=9)
    extra = {"time": torch.rand(2, 9) * 100, "token_type_ids": torch.randint(0, 3, (2, 9))}
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "kit"
    loaded = KitModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    with torch.no_grad():
        a, b = model(x, **extra), loaded(x, **extra)
    assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.lm_logits, b.lm_logits)
    for name in a.task_outputs:
        assert torch.equal(a.task_outputs[name], b.task_outputs[name])

    # New tasks on a saved model: the backbone loads, a new head starts fresh, a kept head keeps its weights.
    new_tasks = [TASKS[0], TaskSpec("readmission", "binary")]
    started = from_pretrained(tmp_path / "m", tasks=new_tasks)
    assert torch.equal(started.task_heads.heads["mortality"].weight, model.task_heads.heads["mortality"].weight)
    with torch.no_grad():
        assert torch.equal(started(x, **extra).hidden_states, a.hidden_states)


def test_from_pretrained_accepts_plain_transformers_directories(tmp_path) -> None:
    torch.manual_seed(0)
    mamba = transformers.MambaForCausalLM(tiny_hf_mamba_config()).eval()
    perturb(mamba)
    mamba.save_pretrained(tmp_path / "mamba")
    llama_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(llama_config).eval()
    llama.save_pretrained(tmp_path / "llama")
    x = ids()
    for path, hf, kind in [(tmp_path / "mamba", mamba, "mamba"), (tmp_path / "llama", llama, "transformer")]:
        model = from_pretrained(path, tasks=TASKS[:2])
        assert model.config.backbone.kind == kind
        with torch.no_grad():
            out = model(x)
            expected = hf(x).logits
        torch.testing.assert_close(out.lm_logits, expected, atol=1e-5, rtol=0)
        assert set(out.task_outputs) == {"mortality", "los_bucket"}
        # Saved as a kit model and loaded again: nothing changes.
        model.save_pretrained(tmp_path / f"kit-{kind}")
        with torch.no_grad():
            assert torch.equal(from_pretrained(tmp_path / f"kit-{kind}")(x).lm_logits, out.lm_logits)


def test_load_backbone_reads_sharded_checkpoints(tmp_path) -> None:
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(tiny_hf_mamba_config()).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(load_backbone(tmp_path)(x).last_hidden_state, hf.backbone(x).last_hidden_state,
                                   atol=1e-5, rtol=0)


def test_pickled_weights_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_mamba_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(KitError, match="model.safetensors") as err:
        load_backbone(tmp_path)
    assert "pickled" in err.value.hint


def test_size_presets() -> None:
    def count(kind: str, size: str) -> int:
        config = ModelConfig(backbone=BackboneConfig(kind=kind, size=size, vocab_size=4096), lm_head=False)
        return sum(p.numel() for p in build_model(config).parameters())

    tiny = count("mamba", "tiny")
    assert 0.8e6 < tiny < 1.3e6
    # "Same size": the transformer preset matches the Mamba one within 5%.
    assert abs(count("transformer", "tiny") - tiny) / tiny < 0.05


def lora_step_grads(peft_model) -> dict[str, torch.Tensor]:
    peft_model.train()
    x = ids(batch=2, length=40)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    grads = {}
    for _ in range(2):  # lora_B starts at zero, so lora_A only gets gradient from the second step on
        optimizer.zero_grad()
        out = peft_model(input_ids=x)
        heads = sum(v.float().pow(2).mean() for v in out.task_outputs.values())
        loss = out.lm_logits.float().logsumexp(-1).mean() + heads
        loss.backward()
        grads = {n: p.grad.detach().clone() if p.grad is not None else None
                 for n, p in peft_model.named_parameters() if p.requires_grad}
        optimizer.step()
    return grads


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_lora_adapters_all_get_gradient_cpu(kind) -> None:
    torch.manual_seed(0)
    model = tiny_model(kind)
    peft_model = apply_lora(model, r=4, alpha=8)
    lora = lora_parameters(peft_model)
    targets = {"mamba": ["in_proj", "x_proj", "dt_proj", "out_proj"],
               "transformer": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}[kind]
    for target in targets:
        assert any(f".{target}.lora_A" in n for n in lora), target
    grads = lora_step_grads(peft_model)
    trainable = set(grads)
    assert trainable == set(lora) | {n for n in trainable if ".task_heads." in n}
    assert any(".task_heads." in n for n in trainable)  # heads stay trainable
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    merged = merge_lora(peft_model)
    assert isinstance(merged, KitModel) and not lora_parameters(merged)


def test_lora_adapters_get_gradient_through_triton_interpreter(monkeypatch) -> None:
    """The Triton kernel path under triton's CPU interpreter at a tiny shape (the GPU test below does real sizes)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # kit.kernels loads its Triton kernels per interpreter mode
    torch.manual_seed(0)
    backbone = BackboneConfig(kind="mamba", vocab_size=VOCAB, hidden_size=16, num_layers=1,
                              overrides={"state_size": 4})
    model = build_model(ModelConfig(backbone=backbone, tasks=[TaskSpec("a", "binary")]))
    model.backbone.set_scan_impl("triton")
    peft_model = apply_lora(model, r=2, alpha=4)
    lora = lora_parameters(peft_model)
    with torch.no_grad():  # lora_B starts at zero; make it non-zero so one backward reaches every lora_A too
        for name, p in lora.items():
            if "lora_B" in name:
                p.normal_(std=0.1)
    out = peft_model(input_ids=ids(batch=1, length=16))
    (out.lm_logits.logsumexp(-1).mean() + out.task_outputs["a"].pow(2).mean()).backward()
    assert len(lora) == 8, sorted(lora)
    for name, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
def test_bf16_forward_is_close_to_fp32(kind) -> None:
    torch.manual_seed(0)
    model = tiny_model(kind)
    x = ids(length=50)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x)
        half = model.to(torch.bfloat16)(x)
    for out in (autocast, half):
        assert torch.isfinite(out.lm_logits.float()).all()
        torch.testing.assert_close(out.hidden_states.float(), full.hidden_states, atol=0.1, rtol=0.05)
        for name, value in out.task_outputs.items():
            torch.testing.assert_close(value.float(), full.task_outputs[name], atol=0.1, rtol=0.05)


def test_lora_with_wrong_targets_is_a_clear_error() -> None:
    with pytest.raises(KitError, match="do not fit the transformer backbone") as err:
        apply_lora(tiny_model("transformer"), target_modules=["x_proj", "dt_proj"])
    assert "q_proj" in err.value.hint


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_adapters_all_get_gradient_triton() -> None:
    torch.manual_seed(0)
    model = tiny_model("mamba").cuda()
    model.backbone.set_scan_impl("triton")
    peft_model = apply_lora(model, r=4, alpha=8)
    x = ids(batch=2, length=40).cuda()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        out = peft_model(input_ids=x)
        (out.lm_logits.float().logsumexp(-1).mean()).backward()
        optimizer.step()
    for name, p in lora_parameters(peft_model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_backbone_matches_reference_on_gpu() -> None:
    torch.manual_seed(0)
    backbone = MambaBackbone(MambaSpec(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2)).cuda().eval()
    x = ids(batch=2, length=300).cuda()
    with torch.no_grad():
        backbone.set_scan_impl("reference")
        expected = backbone(x).last_hidden_state
        backbone.set_scan_impl("triton")
        torch.testing.assert_close(backbone(x).last_hidden_state, expected, atol=1e-4, rtol=1e-4)


def test_models_import_without_the_data_stack() -> None:
    """The GPU machine has torch, transformers, peft and safetensors but not polars, pydantic, orjson or fhir."""
    check = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"polars", "pydantic", "orjson", "fhir", "meds", "pyarrow"}:
                    raise ImportError("blocked " + name)

        sys.meta_path.insert(0, Block())
        import torch
        from kit.models import BackboneConfig, ModelConfig, TaskSpec, build_model

        config = ModelConfig(backbone=BackboneConfig(vocab_size=50, hidden_size=16, num_layers=1),
                             tasks=[TaskSpec("a", "binary")])
        print(build_model(config)(torch.randint(0, 50, (1, 5))).task_outputs["a"].shape)
        """
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size([1, 1])" in proc.stdout


def test_stepped_scoring_matches_whole_rows_and_ignores_batch_company() -> None:
    """A Mamba model scores rows by reading each distinct history once and stepping the task token from its state:
    the same logits as the whole row (to fp32 rounding), and exactly the same whatever else shares the batch."""
    import numpy as np

    from kit.eval.scoring import _stepped_logits, _whole_row_logits, row_logits
    from kit.train.batching import Row

    torch.manual_seed(0)
    model = tiny_model("mamba", InputsConfig(time=True, age=True, num_token_types=9, max_visits=8))
    rng = np.random.default_rng(0)
    rows = []
    for n in (1, 3, 9, 40, 40, 57):  # histories of 0..56 tokens (n - 1), two of the same length
        hist = rng.integers(5, VOCAB, n - 1)
        for k, task in enumerate(["mortality", "los_bucket", "diagnoses"][: 1 + n % 3]):  # tasks share a history
            rows.append(Row(np.append(hist, 1 + k).astype(np.int64), rng.random(n).astype(np.float32) * 30,
                            np.full(n, 60.0, np.float32), np.append(np.full(n - 1, 2), 8).astype(np.int64),
                            np.zeros(n, np.int64), task, np.zeros(1, np.float32), None, 1.0))
    assert model.streams_state
    stepped = _stepped_logits(model, rows, "cpu", batch_size=4, bf16=False, task=None)
    whole = _whole_row_logits(model, rows, "cpu", batch_size=4, bf16=False, task=None)
    for a, b in zip(stepped, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(stepped, row_logits(model, rows, "cpu", batch_size=64, bf16=False)))
    for i in (0, 5, len(rows) - 1):  # alone, a row gets the very same numbers
        assert torch.equal(row_logits(model, [rows[i]], "cpu", bf16=False)[0], stepped[i])
    # Histories of assorted lengths share passes, left-padded (exact without an in_proj bias); with a bias padding
    # would reach the state, so only equal lengths share, and a row still gets its numbers alone.
    from kit.eval.scoring import _history_batches

    lengths = [(n, [i]) for i, n in enumerate((44, 56, 43, 8, 8, 20))]
    assert [[m[0] for m in b] for b in _history_batches(model, lengths, 64)] == [[1, 0, 2], [5], [3, 4]]
    biased = build_model(ModelConfig(backbone=BackboneConfig(kind="mamba", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                                             overrides={"use_bias": True}),
                                     inputs=InputsConfig(time=True, age=True, num_token_types=9, max_visits=8),
                                     tasks=TASKS)).eval()
    assert [[m[0] for m in b] for b in _history_batches(biased, lengths, 64)] == [[1], [0], [2], [5], [3, 4]]
    together = row_logits(biased, rows, "cpu", batch_size=64, bf16=False)
    assert all(torch.equal(row_logits(biased, [rows[i]], "cpu", bf16=False)[0], together[i]) for i in (0, 5, len(rows) - 1))
