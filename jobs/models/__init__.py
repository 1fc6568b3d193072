"""open_clip models for every stage: dcslurm's own configs plus open_clip's.

`create_model` is the one place that builds a model from (name, pretrained):
`pretrained` is an open_clip tag (e.g. "openai", from the local cache; nothing
is downloaded when HF_HUB_OFFLINE / no network), a local checkpoint path, or
"" for random init (seeded).
"""

from __future__ import annotations

import os

from dcslurm.errors import UserError

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
_registered = False


def register_configs() -> None:
    """Register dcslurm's model configs (e.g. `dcslurm-tiny-vit`) with open_clip."""
    global _registered
    if _registered:
        return
    import open_clip

    for name in sorted(os.listdir(CONFIG_DIR)):
        if name.endswith(".json"):
            open_clip.add_model_config(os.path.join(CONFIG_DIR, name))
    _registered = True


def create_model(name: str, pretrained: str = "", device: str = "cpu", seed: int = 0):
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip model.

    A `pretrained` that looks like a path must exist; a tag must be known to
    open_clip for `name` (and be in its cache when offline).
    """
    import open_clip
    import torch

    register_configs()
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r}")
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth"))):
        if not os.path.exists(pretrained):
            raise UserError(f"{pretrained}: model checkpoint file does not exist")
    elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise UserError(f"{name}: no pretrained weights called {pretrained!r} "
                        f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    torch.manual_seed(seed)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device)
    except RuntimeError as exc:
        raise UserError(f"{name} / {pretrained or 'random init'}: cannot load weights: "
                        f"{str(exc).splitlines()[0][:300]}") from None
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)
