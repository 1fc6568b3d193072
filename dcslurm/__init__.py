"""dcslurm: the DataComp workflow as containerized SLURM array jobs.

The orchestrator (this package) imports without torch; stage code is in `jobs/`.
"""

__version__ = "0.1.0"
