"""Audits: who a filter keeps and drops (filteraudit.py), how distinguishable datasets are (bias.py)."""
