"""`--base-model` and the dataset's vocabulary: which token embeddings a base checkpoint can hand on.

A model reads kit token ids (the dataset's tokenizer: event codes, quantile bins, words of a text corpus), so a
checkpoint's embedding rows mean something only where its ids mean the same tokens:

* a kit checkpoint with its `tokenizer.json` beside the weights (kit's pretraining runs write it): rows are matched
  by token string; a token the checkpoint never saw starts fresh. With the same tokenizer nothing changes.
* a kit checkpoint without one (made before runs wrote it): taken as is; it must come from this dataset's tokenizer.
* a transformers Mamba/Llama directory with its own tokenizer (tokenizer.json / tokenizer_config.json, read with
  `local_files_only`, never the hub): each kit token starts from the mean of the checkpoint's embeddings of its text's
  sub-word tokens (the vertical's `token_text(token)`, default: the code's words), so a text model's knowledge of
  words reaches the text task's `TEXT/<word>` tokens through the embeddings and the backbone. The checkpoint's
  tokenizer never replaces kit's: a history is one stream of kit tokens.
* a transformers directory without a tokenizer: its ids mean nothing here; the backbone's layers load and the token
  embeddings start fresh.

The new embedding (and an untied LM head) has the dataset's vocabulary size.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from kit.errors import KitError
from kit.models import KitModel

KIT_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_BIN = re.compile(r"#Q\d+$")


def default_token_text(token: str) -> str | None:
    """A token's words for a text tokenizer: `TXN/DEBIT#Q3` -> `TXN DEBIT`; special tokens (`[CLS]`) have none."""
    if token.startswith("[") and token.endswith("]"):
        return None
    text = _BIN.sub("", token).replace("/", " ").replace("_", " ").strip()
    return text or None


def _is_kit_tokenizer(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("vocab"), list) and "value_bins" in data


def _hf_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; name the directory and the cause
        raise KitError(f"--base-model {directory}: its tokenizer files do not load ({type(err).__name__}: {err})",
                       hint="remove them to start the token embeddings fresh, or re-save the tokenizer") from None


def align_vocabulary(model: KitModel, base_dir: Path, vocab: list[str], pad_id: int,
                     token_text: Callable[[str], str | None] | None = None) -> tuple[KitModel, str]:
    """`model` (loaded from `base_dir`) with token embeddings for the dataset's `vocab`, and a line saying how."""
    base_dir = Path(base_dir)
    raw = json.loads((base_dir / "config.json").read_text())
    if raw.get("model_type") == "kit":
        path = base_dir / KIT_TOKENIZER
        if not path.is_file() or not _is_kit_tokenizer(path):
            return model, f"--base-model {base_dir}: a kit checkpoint without its tokenizer: token ids taken as the dataset's"
        theirs = json.loads(path.read_text())["vocab"]
        if theirs == vocab:
            return model, f"--base-model {base_dir}: same vocabulary as the dataset"
        index = {t: i for i, t in enumerate(theirs)}
        rows = [[index[t]] if t in index else None for t in vocab]
        known = sum(r is not None for r in rows)
        return _reembed(model, rows, pad_id), (f"--base-model {base_dir}: another vocabulary; {known:,} of "
                                               f"{len(vocab):,} tokens matched by name, the rest start fresh")
    if not any((base_dir / f).is_file() for f in HF_TOKENIZER_FILES):
        rows = [None] * len(vocab)
        return _reembed(model, rows, pad_id), (f"--base-model {base_dir}: no tokenizer beside the weights, so its token "
                                               "ids mean nothing here: the backbone's layers load, token embeddings "
                                               "start fresh")
    tok = _hf_tokenizer(base_dir)
    text_of = token_text or default_token_text
    n_rows = model.backbone.get_input_embeddings().weight.shape[0]
    rows = []
    for t in vocab:
        text = text_of(t)
        ids = [i for i in tok.encode(text, add_special_tokens=False) if 0 <= i < n_rows] if text else []
        rows.append(ids or None)
    known = sum(r is not None for r in rows)
    return _reembed(model, rows, pad_id), (f"--base-model {base_dir}: {known:,} of {len(vocab):,} kit tokens start "
                                           "from the checkpoint tokenizer's embeddings of their text, the rest fresh")


def _reembed(model: KitModel, rows: list[list[int] | None], pad_id: int) -> KitModel:
    """A copy of `model` whose token embedding row k is the mean of the old rows `rows[k]` (fresh when None)."""
    config = copy.deepcopy(model.config)
    config.backbone.vocab_size = len(rows)
    config.backbone.pad_token_id = pad_id
    new = KitModel(config)
    own = new.state_dict()
    new.load_state_dict({k: v for k, v in model.state_dict().items() if k in own and v.shape == own[k].shape},
                        strict=False)
    old_emb = model.backbone.get_input_embeddings().weight.detach()
    targets = [(new.backbone.get_input_embeddings().weight, old_emb)]
    if new.lm_head is not None and not config.tie_lm_head and model.lm_head is not None:
        targets.append((new.lm_head.weight, model.lm_head.weight.detach()))
    with torch.no_grad():
        for weight, old in targets:
            if old.shape[1] != weight.shape[1]:
                raise KitError(f"embedding width {old.shape[1]} != {weight.shape[1]}")  # a bug, not a user mistake
            for k, ids in enumerate(rows):
                if ids:
                    weight[k] = old[ids].float().mean(0).to(weight.dtype)
    return new.eval()
