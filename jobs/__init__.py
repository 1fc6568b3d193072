"""Stage code that runs on compute nodes. Each stage is a package with a
light `spec.py` (what the planner needs) and its code proper."""
