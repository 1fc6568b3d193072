"""Test harness: real daemons (SLURM, munge, MariaDB, SeaweedFS) on loopback.

``tests/conftest.py`` turns these into session fixtures; code under test
talks to them exactly as it would to a site's cluster and object store.
"""

from .procs import SETUP_HINT, harness_base_dir
from .s3_server import S3Server
from .slurm_cluster import SlurmCluster

__all__ = ["SETUP_HINT", "S3Server", "SlurmCluster", "harness_base_dir"]
