"""Class descriptions for the vlm family's description-based methods (descriptions, fudd, kapt, msgcoop).

Not a method: this module lives beside the ``vlm`` package, not in it, because every module of
``classlab.methods.vlm`` is imported as a method. It turns the shipped descriptions
(``config/descriptions/<dataset>.yaml``, read by ``classlab.data.descriptions.load_descriptions``) into
sentences and sentence embeddings, and averages joint-space features per class.

Which file. The protocol calls ``build(class_names)`` only, so a method does not know its dataset. The
hyperparameter ``descriptions_dataset`` names it; when it is empty the file is inferred: the one of
``config/descriptions/`` whose generic descriptions name the most of ``class_names`` (a file that misses
a class still wins the match and is then refused by the loader, naming the class).

The templates (stated once here, used by every method of the four):

- generic description d of class c:       "a photo of a {c}, which is {d}."   (``GENERIC_TEMPLATE``)
  (Menon and Vondrick's "{c}, which (is/has) {d}", with CLIP's "a photo of a" in front);
- differential description t of (c, c'):  "a photo of a {c}, {t}."           (``DIFFERENTIAL_TEMPLATE``)
  (the shipped ``tells`` phrases say what c has instead of c''s features; the other class is not named).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml

import classlab.data.descriptions as shipped
from classlab.config import ConfigError

GENERIC_TEMPLATE = "a photo of a {}, which is {}."
DIFFERENTIAL_TEMPLATE = "a photo of a {}, {}."


def infer_descriptions_dataset(class_names: list[str]) -> str:
    """The dataset of the descriptions file in ``config/descriptions/`` whose generic descriptions name the
    most of ``class_names`` (ties: the first by file name). ConfigError when no file names any of them."""
    wanted = set(class_names)
    best, best_hits = None, 0
    for path in sorted(shipped.DESCRIPTIONS_DIR.glob("*.yaml")):
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"descriptions: {path} is not valid YAML: {exc}") from exc
        hits = len(wanted & {str(k) for k in (spec.get("generic") or {})})
        if hits > best_hits:
            best, best_hits = path.stem, hits
    if best is None:
        raise ConfigError(f"descriptions: no file in {shipped.DESCRIPTIONS_DIR} describes any of the classes "
                          f"{list(class_names)}; write one (like fashion_mnist.yaml) or set descriptions_dataset")
    return best


def class_descriptions(hparams: dict, class_names: list[str]) -> dict:
    """``load_descriptions`` for ``class_names``, the dataset from ``descriptions_dataset`` or inferred."""
    dataset = str(hparams.get("descriptions_dataset") or "") or infer_descriptions_dataset(class_names)
    return shipped.load_descriptions(dataset, list(class_names))


def generic_sentences(descriptions: dict, class_names: list[str], template: str = GENERIC_TEMPLATE):
    """Every generic description as a sentence: (texts, owner) with owner[i] the class index of texts[i]."""
    texts, owner = [], []
    for index, name in enumerate(class_names):
        for description in descriptions["generic"][name]:
            texts.append(template.format(name, description.strip().rstrip(".")))
            owner.append(index)
    return texts, owner


def generic_embeddings(hparams: dict, class_names: list[str], device: torch.device | str = "cpu"):
    """The loaded descriptions, the generic sentences, their MiniLM sentence embeddings (N, 384) on
    ``device`` and the owner class of each (N,) long: what a method keeps as buffers."""
    from classlab.models.image_text import encode_sentences

    descriptions = class_descriptions(hparams, class_names)
    texts, owner = generic_sentences(descriptions, class_names)
    return (descriptions, texts, encode_sentences(texts).to(device),
            torch.tensor(owner, dtype=torch.long, device=device))


def differential_sentence(name: str, tells: str, template: str = DIFFERENTIAL_TEMPLATE) -> str:
    return template.format(name, tells.strip().rstrip("."))


def class_mean(features: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, E) unit-norm features, owner (N,) -> (num_classes, E): each class's features averaged, then
    L2-normalised (a class without a feature gets the zero vector)."""
    total = features.new_zeros(num_classes, features.shape[-1]).index_add_(0, owner, features)
    return F.normalize(total, dim=-1)
