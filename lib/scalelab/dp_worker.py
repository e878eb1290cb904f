"""One process of a multi-process data-parallel training run (chapter 07).

    python -m scalelab.dp_worker --coordinator localhost:PORT --processes 2 \
        --process-id 0 --devices-per-process 4 --steps 20 --batch 128 --out result.json

Each process simulates ``--devices-per-process`` CPU devices, joins the JAX distributed
runtime (gloo collectives on CPU), and all processes together form one mesh over every
device. Each process feeds only its own rows of every global batch. Process 0 writes the
losses and final parameters to ``--out``. The same script runs unchanged on several real
hosts (one process per host, the coordinator's address). Without ``--coordinator``,
``--processes`` and ``--process-id`` (all three absent) it calls
``jax.distributed.initialize()`` with no arguments, so that the cluster supplies them
(a Cloud TPU pod slice, or a Slurm / Open MPI job that JAX detects).
"""

from __future__ import annotations

import argparse
import json
import sys

CLUSTER_ARGS = ("coordinator", "processes", "process_id")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's arguments. ``--coordinator``, ``--processes`` and ``--process-id`` come
    together (this host's place in the job) or not at all (the cluster detects them)."""
    parser = argparse.ArgumentParser(prog="python -m scalelab.dp_worker")
    parser.add_argument("--coordinator", help="host:port of process 0 (omit all three to auto-detect)")
    parser.add_argument("--processes", type=int, help="number of processes in the job")
    parser.add_argument("--process-id", type=int, help="this process's index, 0 .. processes - 1")
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", help="JSON result (written by process 0)")
    parser.add_argument("--fail", choices=("exit", "hang"), help="fault injection for tests")
    args = parser.parse_args(argv)
    given = [name for name in CLUSTER_ARGS if getattr(args, name) is not None]
    if given and len(given) < len(CLUSTER_ARGS):
        parser.error("give --coordinator, --processes and --process-id together, or none of them to let "
                     f"jax.distributed.initialize() detect the cluster (got only {', '.join(given)})")
    if args.processes is not None and not 0 <= args.process_id < args.processes:
        parser.error(f"--process-id must be in 0 .. {args.processes - 1}, got {args.process_id}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    if args.coordinator is None:
        jax.distributed.initialize()  # the cluster (TPU pod, Slurm, Open MPI) supplies all three
    else:
        jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.process_id)
    processes, process_id = jax.process_count(), jax.process_index()

    if args.fail == "exit" and process_id == processes - 1:
        import os

        print(f"process {process_id}: injected failure", file=sys.stderr, flush=True)
        os._exit(3)  # a crash: no clean shutdown of the distributed runtime
    if args.fail == "hang" and process_id == processes - 1:
        import time

        time.sleep(3600)

    import numpy as np

    from scalelab import parallel

    problem = parallel.digits_problem()
    batches = parallel.global_batches(problem, args.batch, args.steps)
    devices = jax.devices()  # every device of every process
    mesh = parallel.data_mesh(devices)
    step, replicated, sharded = parallel.jit_sharded_step(problem, mesh, args.lr)
    params = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, replicated, lambda idx, a=a: np.asarray(a)[idx]),
        problem.params)
    if args.batch % processes:
        raise ValueError(f"--batch {args.batch} does not divide evenly over {processes} processes")
    rows = args.batch // processes
    lo = process_id * rows
    losses = []
    for x, y in batches:
        # each process contributes only its own rows of the global batch
        xg = jax.make_array_from_process_local_data(sharded, x[lo:lo + rows], x.shape)
        yg = jax.make_array_from_process_local_data(sharded, y[lo:lo + rows], y.shape)
        params, loss = step(params, xg, yg)
        losses.append(float(loss))  # blocks every step
    if process_id == 0 and args.out:
        leaves = [np.asarray(p.addressable_data(0)).tolist() for p in jax.tree.leaves(params)]
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "params": leaves, "devices": len(devices),
                       "processes": jax.process_count()}, handle)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
