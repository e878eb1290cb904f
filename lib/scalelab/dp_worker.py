"""One process of a multi-process data-parallel training run (chapter 07).

    python -m scalelab.dp_worker --coordinator localhost:PORT --processes 2 \
        --process-id 0 --devices-per-process 4 --steps 20 --batch 128 --out result.json

Each process simulates ``--devices-per-process`` CPU devices, joins the JAX distributed
runtime (gloo collectives on CPU), and all processes together form one mesh over every
device. Each process feeds only its own rows of every global batch. Process 0 writes the
losses and final parameters to ``--out``. The same script runs unchanged on several real
hosts (one process per host, the coordinator's address) or a TPU pod slice.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalelab.dp_worker")
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", help="JSON result (written by process 0)")
    parser.add_argument("--fail", choices=("exit", "hang"), help="fault injection for tests")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.process_id)

    if args.fail == "exit" and args.process_id == args.processes - 1:
        import os

        print(f"process {args.process_id}: injected failure", file=sys.stderr, flush=True)
        os._exit(3)  # a crash: no clean shutdown of the distributed runtime
    if args.fail == "hang" and args.process_id == args.processes - 1:
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
    rows = args.batch // args.processes
    lo = args.process_id * rows
    losses = []
    for x, y in batches:
        # each process contributes only its own rows of the global batch
        xg = jax.make_array_from_process_local_data(sharded, x[lo:lo + rows], x.shape)
        yg = jax.make_array_from_process_local_data(sharded, y[lo:lo + rows], y.shape)
        params, loss = step(params, xg, yg)
        losses.append(float(loss))  # blocks every step
    if args.process_id == 0 and args.out:
        leaves = [np.asarray(p.addressable_data(0)).tolist() for p in jax.tree.leaves(params)]
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"losses": losses, "params": leaves, "devices": len(devices),
                       "processes": jax.process_count()}, handle)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
