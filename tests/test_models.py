"""jobs.models: building open_clip models offline, and the settings stages read from them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dcslurm.core.errors import UserError
from jobs.models import create_model, embed_dim, model_preprocess, text_settings


def test_tiny_model_random_init_is_seeded_and_reloads_from_a_file(tmp_path):
    a, _, _, _ = create_model("dcslurm-tiny-vit", "", "cpu", seed=3)
    b, _, _, _ = create_model("dcslurm-tiny-vit", "", "cpu", seed=3)
    c, _, _, _ = create_model("dcslurm-tiny-vit", "", "cpu", seed=4)
    assert torch.equal(a.visual.conv1.weight, b.visual.conv1.weight)
    assert not torch.equal(a.visual.conv1.weight, c.visual.conv1.weight)
    path = tmp_path / "tiny.pt"
    torch.save(c.state_dict(), path)
    d, _, _, _ = create_model("dcslurm-tiny-vit", str(path), "cpu", seed=0)
    assert torch.equal(c.visual.conv1.weight, d.visual.conv1.weight)


def test_settings_stages_read():
    model, _, _, _ = create_model("dcslurm-tiny-vit", "", "cpu", 0)
    pre = model_preprocess(model)
    assert pre.size == (64, 64) and pre.resize_mode == "shortest" and pre.interpolation == "bicubic"
    assert embed_dim("dcslurm-tiny-vit") == 64 and embed_dim("ViT-B-32") == 512 and embed_dim("ViT-L-14") == 768
    assert text_settings("dcslurm-tiny-vit", model)[0] == 32
    # B/32 and L/14 share one tokenizer: the embed stage tokenises each caption once for both.
    assert text_settings("ViT-B-32") == text_settings("ViT-L-14")
    assert text_settings("ViT-B-32") != text_settings("dcslurm-tiny-vit")


@pytest.mark.parametrize("name, pretrained, message", [
    ("no-such-model", "", "unknown open_clip model 'no-such-model'"),
    ("dcslurm-tiny-vit", "/nonexistent/ckpt.pt", "/nonexistent/ckpt.pt: model checkpoint file does not exist"),
    ("ViT-B-32", "no-such-tag", "no pretrained weights called 'no-such-tag'"),
])
def test_bad_model_settings_are_one_line_errors(name, pretrained, message):
    with pytest.raises(UserError, match=message):
        create_model(name, pretrained, "cpu", 0)


def test_checkpoint_of_another_model_is_one_line_error(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="cannot load weights") as info:
        create_model("dcslurm-tiny-vit", str(path), "cpu", 0)
    assert "\n" not in str(info.value)


def test_tag_weights_missing_offline_names_the_file(tmp_path):
    """No weights in the cache and no hub: the error says which file is missing, and where."""
    code = ("from jobs.models import create_model\n"
            "try:\n    create_model('ViT-B-32', 'openai', 'cpu', 0)\n"
            "except Exception as e:\n    print(type(e).__name__ + ': ' + str(e))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    assert out.startswith("UserError: ViT-B-32 / openai: weights not found: open_clip_pytorch_model.bin of "
                          "Hugging Face repo timm/vit_base_patch32_clip_224.openai"), out
    assert "set pretrained to a local checkpoint file" in out and "\n" not in out
