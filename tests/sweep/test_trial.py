from commlab.sweep.trial import in_process, latest_checkpoint


def test_single_worker_cpu_trials_with_local_storage_run_in_process():
    one = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    assert in_process(one, "/tmp/sweeps/x/trains")
    assert not in_process({**one, "workers": 2}, "/tmp/sweeps/x/trains")
    assert not in_process({**one, "gpus_per_worker": 1}, "/tmp/sweeps/x/trains")
    assert not in_process(one, "s3://bucket/sweeps/x/trains")


def test_latest_checkpoint_skips_partial_copies(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (0, 1):
        d = tmp_path / f"checkpoint_{epoch:06d}"
        d.mkdir()
        (d / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_000002").mkdir()  # no checkpoint.pt: not complete
    (tmp_path / ".partial-checkpoint_000003").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_000001"
