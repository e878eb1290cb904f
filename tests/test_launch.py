import sys
import time

import pytest

from scalelab import distributed, parallel


def _py(code):
    return [sys.executable, "-c", code]


def test_launch_returns_outputs():
    outs = distributed.launch([_py("print('a')"), _py("print('b')")], timeout=30)
    assert [o.strip() for o in outs] == ["a", "b"]


def test_launch_names_the_failed_process_and_stops_the_others():
    start = time.perf_counter()
    with pytest.raises(distributed.LaunchError, match=r"process 1 of 3 exited with code 7") as info:
        distributed.launch([_py("import time; time.sleep(60)"),
                            _py("import sys; print('bad input', file=sys.stderr); sys.exit(7)"),
                            _py("import time; time.sleep(60)")], timeout=30)
    assert "bad input" in str(info.value)
    assert time.perf_counter() - start < 15


def test_launch_kills_a_hang_at_the_timeout():
    start = time.perf_counter()
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    with pytest.raises(distributed.LaunchError, match=r"timed out after 2 s; processes \[0\]"):
        distributed.launch([_py(code), _py("print('done')")], timeout=2)
    assert time.perf_counter() - start < 10


def test_launch_validates():
    with pytest.raises(ValueError, match="at least one"):
        distributed.launch([], timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        distributed.launch([_py("pass")], timeout=0)
    with pytest.raises(ValueError, match="divide evenly"):
        distributed.run_multiprocess_training(2, 2, batch=10)


@pytest.mark.slow
def test_two_processes_train_like_one():
    problem = parallel.digits_problem()
    batches = parallel.global_batches(problem, 16, 4)
    _, ref_losses = parallel.train_single(problem, batches)
    result = distributed.run_multiprocess_training(processes=2, devices_per_process=2, steps=4, batch=16,
                                                   timeout=180)
    assert result["devices"] == 4 and result["processes"] == 2
    assert max(abs(a - b) for a, b in zip(result["losses"], ref_losses, strict=True)) <= 1e-4


@pytest.mark.slow
def test_crashed_worker_stops_the_job_quickly():
    start = time.perf_counter()
    with pytest.raises(distributed.LaunchError, match="exited with code 3"):
        distributed.run_multiprocess_training(2, 2, steps=2, batch=16, timeout=120, fail="exit")
    assert time.perf_counter() - start < 60


def test_worker_arguments_come_together_or_not_at_all():
    from scalelab import dp_worker

    args = dp_worker.parse_args(["--coordinator", "10.0.0.1:8476", "--processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.processes, args.process_id) == ("10.0.0.1:8476", 2, 1)
    auto = dp_worker.parse_args(["--steps", "3"])  # the cluster path: initialize() with no arguments
    assert (auto.coordinator, auto.processes, auto.process_id, auto.steps) == (None, None, None, 3)


@pytest.mark.parametrize("argv", [["--coordinator", "h:1"], ["--processes", "2", "--process-id", "0"],
                                  ["--coordinator", "h:1", "--processes", "2", "--process-id", "2"],
                                  ["--batch", "0"]])
def test_worker_rejects_partial_or_bad_cluster_arguments(argv, capsys):
    from scalelab import dp_worker

    with pytest.raises(SystemExit) as info:
        dp_worker.parse_args(argv)
    assert info.value.code == 2
    assert "dp_worker" in capsys.readouterr().err
