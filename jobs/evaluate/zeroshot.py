"""Zero-shot CLIP inference: load the checkpoint, build class classifiers from
templates, embed images and texts. fp32 throughout (DataComp: amp off)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from dcslurm.core.errors import UserError


def load_model(model_name: str, checkpoint: str, device: str):
    """(model in eval mode, val transform, tokenizer) from a local checkpoint file;
    one-line UserError if it is not an open_clip `model_name` state dict."""
    from jobs.models import create_model

    if not os.path.exists(checkpoint):
        raise UserError(f"{checkpoint}: checkpoint file does not exist")
    try:
        model, _, preprocess, tokenizer = create_model(model_name, pretrained=checkpoint, device=device)
    except UserError as exc:
        raise UserError(f"{checkpoint}: not an open_clip {model_name} checkpoint ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - torch.load / state-dict errors of every kind
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{checkpoint}: not an open_clip {model_name} checkpoint "
                        f"({type(exc).__name__}: {first})") from None
    model.eval()
    return model, preprocess, tokenizer


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device: str) -> torch.Tensor:
    """(embed_dim, n_classes): per class, the normalised text embeddings of its
    prompts averaged and renormalised (clip_benchmark's construction)."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(c=name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)
        weights.append(emb / emb.norm())
    return torch.stack(weights, dim=1)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ImageEncoder:
    """Decodes and transforms images in a thread pool, encodes them in batches."""

    def __init__(self, model, preprocess, device: str, num_workers: int = 2):
        self.model, self.preprocess, self.device = model, preprocess, device
        self.pool = ThreadPoolExecutor(max(1, num_workers)) if num_workers > 0 else None

    def _prepare(self, data: bytes) -> torch.Tensor:
        from jobs.evaluate.evalset import decode_image

        return self.preprocess(decode_image(data))

    @torch.no_grad()
    def encode(self, images: list[bytes]) -> torch.Tensor:
        """L2-normalised image embeddings (n, dim) on the CPU, fp32."""
        tensors = list(self.pool.map(self._prepare, images)) if self.pool else [self._prepare(b) for b in images]
        batch = torch.stack(tensors).to(self.device)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu()

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], device: str) -> torch.Tensor:
    tokens = tokenizer(texts).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
