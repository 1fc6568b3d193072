"""Commits on a real S3 endpoint (SeaweedFS): an upload that fails when it is
completed raises, and leaves no object and no marker (issue 16 item 5)."""

from __future__ import annotations

import pytest

from dcslurm.core.errors import StorageError
from dcslurm.core.markers import read_marker
from dcslurm.core.plan import PLAN_FILE, Plan
from dcslurm.core.plantypes import Resources, StepPlan
from dcslurm.core.shards import UnitSet
from dcslurm.core.storage import DataFolder, s3fs_options
from dcslurm.core.task import TaskContext, TaskResult
from dcslurm.core.taskrun import run_task

pytestmark = pytest.mark.s3

# Short timeouts and one attempt: the test waits seconds, not botocore's backoff.
# A stopped server refuses connections at once; the read timeout only has to outlast a slow
# answer from a loaded machine.
_FAST = {"connect_timeout": 2, "read_timeout": 20, "max_attempts": 1}
_SERVER = {}  # the running test's S3Server, for the stage function below


def test_writer_whose_upload_fails_at_close_raises_and_leaves_no_object(s3_server, s3_bucket):
    folder = DataFolder(f"{s3_bucket}/run", s3fs_options(endpoint_url=s3_server.endpoint_url, **_FAST))
    with folder.writer("ok.bin") as f:
        f.write(b"whole")
    assert folder.read_bytes("ok.bin") == b"whole"
    try:
        with pytest.raises(StorageError) as info:
            with folder.writer("lost.bin") as f:
                f.write(b"y" * 1000)
                s3_server.stop()  # the upload happens at close: the server is gone by then
        assert str(info.value).startswith(f"{s3_bucket}/run/lost.bin: ") and "\n" not in str(info.value)
    finally:
        s3_server.start()
    assert not s3_server.fs().exists(f"{s3_bucket.removeprefix('s3://')}/run/lost.bin")


def stage_loses_the_server_at_commit(ctx: TaskContext) -> TaskResult:
    server = _SERVER["server"]
    try:
        with ctx.output.writer("part-0.bin") as f:
            f.write(b"z" * 1000)
            server.stop()
    finally:
        server.start()  # back before the marker would be committed: only the upload failed
    return TaskResult(outputs=[f"{ctx.step.stage}/part-0.bin"])


def test_task_whose_output_upload_fails_commits_no_marker(s3_server, s3_bucket):
    opts = s3fs_options(endpoint_url=s3_server.endpoint_url, **_FAST)
    run_url = f"{s3_bucket}/run"
    step = StepPlan(name="lose", stage="lose", entry=f"{__name__}:stage_loses_the_server_at_commit",
                    layout="array", units=UnitSet(count=1), units_per_task=1, depends_on=[],
                    resources=Resources(), gpu=False)
    plan = Plan(run_url=run_url, run_name="run", scale="tiny", fingerprint="x", steps=[step], stage_params={},
                storage_options=opts)
    # The setup and the checks use the default timeouts: only the task must give up fast
    # (a loaded machine's SeaweedFS can take longer than 5 s to answer a healthy request).
    patient = s3fs_options(endpoint_url=s3_server.endpoint_url)
    DataFolder(run_url, patient).write_text(PLAN_FILE, plan.to_json())
    _SERVER["server"] = s3_server
    try:
        code = run_task(run_url, "lose", 0, storage_options=opts)
    finally:
        s3_server.start()
    assert code != 0
    folder = DataFolder(run_url, patient)
    assert read_marker(folder, "lose", 0) is None
    assert not folder.exists("lose/part-0.bin")
