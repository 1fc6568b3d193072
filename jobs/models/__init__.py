"""open_clip models for every stage: dcslurm's own configs plus open_clip's.

`create_model` is the one place that builds a model from (name, pretrained):
`pretrained` is an open_clip tag (e.g. "openai", from the local cache; nothing
is downloaded when HF_HUB_OFFLINE / no network), a local checkpoint path, or
"" for random init (seeded).
"""

from __future__ import annotations

import os

from dcslurm.core.errors import UserError

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


def create_model(name: str, pretrained: str = "", device: str = "cpu", seed: int = 0,
                 storage_options: dict | None = None):
    """(model, preprocess_train, preprocess_val, tokenizer) for an open_clip model.

    A `pretrained` that looks like a path must exist (an s3:// or other fsspec URL is
    copied to a temporary file first, read with `storage_options`); a tag must be known
    to open_clip for `name` (and be in its cache when offline).
    """
    import tempfile

    import open_clip

    from dcslurm.core.storage import DataFolder, is_remote

    register_configs()
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {name!r}")
    if is_remote(pretrained):
        parent, base = pretrained.rstrip("/").rsplit("/", 1)
        with tempfile.TemporaryDirectory(prefix="dcslurm-weights-") as scratch:
            try:
                local = DataFolder(parent, storage_options).local_copy(base, scratch)
            except FileNotFoundError:
                raise UserError(f"{pretrained}: model checkpoint file does not exist") from None
            return _create(open_clip, name, local, device, seed, shown=pretrained)
    if is_weights_path(pretrained):
        if not os.path.exists(pretrained):
            raise UserError(f"{pretrained}: model checkpoint file does not exist")
    elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise UserError(f"{name}: no pretrained weights called {pretrained!r} "
                        f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    return _create(open_clip, name, pretrained, device, seed, shown=pretrained)


def _create(open_clip, name: str, pretrained: str, device: str, seed: int, shown: str):
    """open_clip's model and transforms (seeded); `shown` names the weights in errors."""
    import torch

    torch.manual_seed(seed)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device)
    except (RuntimeError, OSError) as exc:
        if pretrained and not os.path.exists(pretrained):
            raise UserError(f"{name} / {shown}: weights not found: {_tag_location(name, pretrained)} is not in "
                            "the local cache and cannot be downloaded here; copy it there, or set pretrained to a "
                            "local checkpoint file") from None
        raise UserError(f"{name} / {shown or 'random init'}: cannot load weights: "
                        f"{str(exc).splitlines()[0][:300]}") from None
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


WEIGHT_SUFFIXES = (".pt", ".bin", ".safetensors", ".pth")


def is_weights_path(pretrained: str) -> bool:
    """True when `pretrained` names a checkpoint file (a path or URL), not an open_clip tag."""
    return bool(pretrained) and ("/" in pretrained or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES))


def nodes_offline(online: bool) -> bool:
    """Whether a node will not download weights: the config says it has no internet, or
    HF_HUB_OFFLINE is set here (sbatch and the local executor pass the environment on)."""
    return not online or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_weights(name: str, pretrained: str, storage_options: dict | None = None, online: bool = False,
                  where: str = "") -> None:
    """Preflight (login node, before anything is queued): can a node build (name, pretrained)
    without surprises? One-line UserError if not. Downloads nothing.

    A checkpoint path or URL must be a readable file. With open_clip installed here, the
    model must be known to it, a tag must be one of the model's, and when the nodes are
    offline (`online` false) the tag's weights must already be in the cache open_clip reads
    (the login node's view of it: home folders and HF_HOME are shared on most clusters).
    Without open_clip here only the file checks are done; the node checks the rest.
    """
    from dcslurm.core.stages import require_file

    if is_weights_path(pretrained):
        require_file(pretrained, storage_options, "model checkpoint file")
    models = known_model_names()
    if models is None:  # no open_clip on this node: the task checks the rest
        return
    if name not in models:
        raise UserError(f"{where}unknown open_clip model {name!r}{_close_matches(name, models)}")
    if not pretrained or is_weights_path(pretrained):
        return
    # Only a named tag needs open_clip itself (its pretrained table); importing it costs
    # torch's import, tens of seconds on a busy login node, on every plan and submit.
    import open_clip

    register_configs()
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        hint = _close_matches(pretrained, tags) or f" (known: {', '.join(tags) or 'none'})"
        raise UserError(f"{where}{name}: no pretrained weights called {pretrained!r}{hint}")
    if nodes_offline(online) and cached_weights(name, pretrained) is None:
        raise UserError(f"{where}{name} / {pretrained}: weights not in the local cache: "
                        f"{_tag_location(name, pretrained)}; the nodes cannot download them (offline): fetch them "
                        "once on a machine with internet into that cache, set pretrained to a checkpoint file, "
                        "or set offline = false if the nodes have internet")


def known_model_names() -> list[str] | None:
    """open_clip's model names (its model_configs/*.json, as open_clip.list_models reads
    them) plus dcslurm's, found without importing open_clip; None if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    names = set()
    for folder in [os.path.join(p, "model_configs") for p in spec.submodule_search_locations] + [CONFIG_DIR]:
        if os.path.isdir(folder):
            names.update(f[: -len(".json")] for f in os.listdir(folder) if f.endswith(".json"))
    return sorted(names)


def cached_weights(name: str, tag: str) -> str | None:
    """The local file open_clip would load for (name, tag) without downloading, or None.
    Mirrors open_clip.pretrained.download_pretrained: Hugging Face hub first (its
    .safetensors alternatives before the file itself), else ~/.cache/clip/<url basename>."""
    import open_clip
    from open_clip import pretrained as P

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub") and P.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or P.HF_WEIGHTS_NAME
        alternatives = list(getattr(P, "_get_safe_alternatives", lambda f: [])(filename))
        for candidate in [*alternatives, filename]:
            found = try_to_load_from_cache(repo, candidate, cache_dir=hf_hub_cache())
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    if cfg.get("url"):
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        return local if os.path.isfile(local) else None
    return None


def hf_hub_cache() -> str:
    """The Hugging Face hub cache a task started now would use (huggingface_hub reads these
    variables when imported: read them here, not from an import done earlier)."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                  "huggingface"), "hub")


def _close_matches(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=5, cutoff=0.6)
    return f" (close matches: {', '.join(close)})" if close else ""


def _tag_location(name: str, tag: str) -> str:
    """Where open_clip looks for the weights of (name, tag), in words."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"].rstrip("/")) if not cfg["hf_hub"].endswith("/") else (
            cfg["hf_hub"].rstrip("/"), "open_clip_pytorch_model.bin")
        return f"{filename} of Hugging Face repo {repo} (cache {hf_hub_cache()})"
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
