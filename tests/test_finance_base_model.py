"""`kit finetune --vertical finance --base-model DIR` from a kit checkpoint of an earlier run (same or another
vocabulary) and from a plain local transformers Mamba directory with its own tokenizer (no hub): the token
embeddings finetuning starts from are the ones kit/train/base_vocab.py promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kit.tokenizer import Tokenizer
from kit.train.base_vocab import align_vocabulary
from kit.train.config import load_train_config
from kit.train.lines import load_state
from kit.train.workflow import FinetuneRequest, run_finetune

REPO = Path(__file__).resolve().parents[1]
EMB = "backbone.embeddings.weight"
TRAIN = ["device=cpu", "model.size=tiny", "pretrain.steps=0", "finetune.steps=2", "finetune.eval_every=2",
         "finetune.checkpoint_every=2", "finetune.optim.batch_size=4", "n_bootstrap=0", "max_eval_rows=8"]


@pytest.fixture(scope="module")
def run(tiny_finance_bundle) -> Path:
    return tiny_finance_bundle.parent


def _finetune(workdir: Path, data: Path, base: Path, dataset_sets=()) -> tuple[Path, list[str]]:
    said: list[str] = []
    req = FinetuneRequest(vertical="finance", data=[data], workdir=workdir, config=load_train_config(overrides=TRAIN),
                          dataset_overrides=list(dataset_sets), base_model=base)
    result = run_finetune(req, said.append, lambda _label, _total: None)
    return result.bundle_dir, said


def test_kit_checkpoint_of_an_earlier_run_with_another_vocabulary(run, tmp_path):
    """The earlier run's pretrained model (min_count=2) on a dataset built with min_count=1: shared tokens keep their
    rows (matched by name), new ones start fresh; with its own dataset nothing is re-indexed."""
    base = run / "pretrain" / "model"
    assert (base / "tokenizer.json").is_file()  # runs keep the tokenizer beside the model
    bundle, said = _finetune(tmp_path / "wd", run / "events", base, ["tokenizer.max_len=48", "tokenizer.min_count=1"])
    theirs = Tokenizer.load(base / "tokenizer.json").vocab
    mine = Tokenizer.load(bundle / "tokenizer.json").vocab
    assert len(mine) > len(theirs)
    line = next(s for s in said if "--base-model" in s)
    shared = [t for t in mine if t in set(theirs)]
    assert f"{len(shared):,} of {len(mine):,} tokens matched by name" in line
    start = load_state(tmp_path / "wd" / "finetune" / "initial.safetensors")[EMB]
    old = load_file(str(base / "model.safetensors"))[EMB]
    assert start.shape[0] == len(mine)
    for t in shared[:: max(1, len(shared) // 50)]:
        assert torch.equal(start[mine.index(t)], old[theirs.index(t)]), t
    fresh = [mine.index(t) for t in mine if t not in set(theirs)]
    assert not any(torch.equal(start[k], old[j]) for k in fresh[:20] for j in range(old.shape[0]))
    metrics = json.loads((bundle / "metrics.json").read_text())  # NaN where a metric is undefined
    assert set(metrics["tasks"]) >= {"news_sentiment", "credit_default_next_month"}

    from kit.models import KitModel

    model = KitModel.from_pretrained(base)
    same, how = align_vocabulary(model, base, theirs, 0)
    assert same is model and "same vocabulary" in how
    older = tmp_path / "older"  # a checkpoint saved before runs kept the tokenizer: ids taken as they are
    older.mkdir()
    for name in ("config.json", "model.safetensors"):
        (older / name).write_bytes((base / name).read_bytes())
    same, how = align_vocabulary(model, older, mine, 0)
    assert same is model and "without its tokenizer" in how


def _hf_mamba(directory: Path, with_tokenizer: bool) -> dict[str, int]:
    """A tiny MambaForCausalLM saved by transformers, with a word-level tokenizer trained on the shipped tweets."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import MambaConfig, MambaForCausalLM, PreTrainedTokenizerFast

    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = (REPO / "tests" / "data" / "finance_tasks" / "news" / "sent_train_sample.csv").read_text().lower().splitlines()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"], min_frequency=2))
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, state_size=8,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0)
    MambaForCausalLM(config).save_pretrained(directory)
    if with_tokenizer:
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(directory)
    return tok.get_vocab()


def test_plain_transformers_mamba_with_its_tokenizer(run, tmp_path):
    """`kit finetune` (the command) from a local transformers directory: TEXT/<word> tokens start from the LM's
    embedding of that word, the bundle scores a tweet; without tokenizer files the embeddings start fresh."""
    hf = tmp_path / "hf-mamba"
    vocab = _hf_mamba(hf, with_tokenizer=True)
    wd = tmp_path / "wd"
    args = [sys.executable, "-m", "kit", "finetune", "--vertical", "finance", "--data", str(run / "dataset"),
            "--workdir", str(wd), "--base-model", str(hf)]
    for s in TRAIN:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    assert "start from the checkpoint tokenizer's embeddings of their text" in proc.stdout + proc.stderr
    kit_vocab = Tokenizer.load(run / "dataset" / "tokenizer.json").vocab
    state, hf_state = load_state(wd / "finetune" / "initial.safetensors"), load_file(str(hf / "model.safetensors"))
    start, lm = state[EMB], hf_state[EMB]
    assert start.shape == (len(kit_vocab), 32)
    words = [t for t in kit_vocab if t.startswith("TEXT/") and t[5:] in vocab]
    assert len(words) > 50
    for t in words[:50]:
        assert torch.allclose(start[kit_vocab.index(t)], lm[vocab[t[5:]]]), t
    # The layers are the checkpoint's, whatever the vocabulary.
    layer = next(k for k in state if k.startswith("backbone.layers.0.") and k.endswith("in_proj.weight"))
    assert torch.equal(state[layer], hf_state[layer])

    from kit import Predictor

    doc = {"subjects": [{"subject_id": "t"}], "events": [{"subject_id": "t", "code": "TEXT", "text_value": "stocks rally"}]}
    (pred,) = Predictor.load(wd / "bundle", device="cpu").predict(doc, tasks=["news_sentiment"], explain=False)
    assert set(pred.scores) == {"bearish", "bullish", "neutral"}

    from kit.models import KitModel

    bare = tmp_path / "hf-bare"
    _hf_mamba(bare, with_tokenizer=False)
    model, how = align_vocabulary(KitModel.from_pretrained(bare), bare, kit_vocab, 0)
    assert "no tokenizer beside the weights" in how
    assert model.backbone.get_input_embeddings().weight.shape == (len(kit_vocab), 32)
