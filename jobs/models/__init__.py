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
    except (RuntimeError, OSError) as exc:
        if pretrained and not os.path.exists(pretrained):
            raise UserError(f"{name} / {pretrained}: weights not found: {_tag_location(name, pretrained)} is not in "
                            "the local cache and cannot be downloaded here; copy it there, or set pretrained to a "
                            "local checkpoint file") from None
        raise UserError(f"{name} / {pretrained or 'random init'}: cannot load weights: "
                        f"{str(exc).splitlines()[0][:300]}") from None
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def _tag_location(name: str, tag: str) -> str:
    """Where open_clip looks for the weights of (name, tag), in words."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"].rstrip("/")) if not cfg["hf_hub"].endswith("/") else (
            cfg["hf_hub"].rstrip("/"), "open_clip_pytorch_model.bin")
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        return f"{filename} of Hugging Face repo {repo} (cache {hub})"
    if cfg.get("url"):
        return f"{os.path.expanduser('~/.cache/clip')}/{os.path.basename(cfg['url'])}"
    return f"the weights of tag {tag!r}"


def model_preprocess(model):
    """open_clip's eval preprocessing settings of a built model (a `PreprocessCfg`:
    size, mean, std, interpolation, resize_mode, fill_color)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    return PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), open_clip.get_model_preprocess_cfg(model)))


def text_settings(name: str, model=None) -> tuple[int, str]:
    """(context length, tokenizer identity) of open_clip model `name`: two models
    with the same identity tokenize any caption to the same tokens."""
    import json

    import open_clip

    register_configs()
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if model is not None:
        context_length = open_clip.get_model_tokenize_cfg(model).get("context_length", context_length)
    identity = json.dumps({"hf": text_cfg.get("hf_tokenizer_name", ""), "kwargs": text_cfg.get("tokenizer_kwargs", {}),
                           "context_length": context_length}, sort_keys=True)
    return context_length, identity


def embed_dim(name: str) -> int:
    """Width of the joint embedding space of open_clip model `name`."""
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(name)
    if not cfg or "embed_dim" not in cfg:
        raise UserError(f"open_clip model {name!r} has no embed_dim in its config")
    return int(cfg["embed_dim"])
