"""The training stage: FSDP2 CLIP training sized by the compute scale (see train.py)."""
