"""nginx in front of service replicas on loopback, one replica killed mid-run, and
throughput with 1, 2 and 3 replicas.

    python -m benchmarks.bench_scale_out [--seconds 60] [--kill-at 20] [--restart-after 10]

Fault run: ``--clients`` connections post real test-split images through nginx to 3
replicas for ``--seconds``; at ``--kill-at`` one replica gets SIGKILL, and it is started again
``--restart-after`` seconds later. Goal: no request fails (nginx retries the next replica on a
connection failure, POST included; an answer the killed replica had begun reaches the client
cut, and the load sends it once more, as ``emotion-detect --url`` does). Prints requests
sent, succeeded, failed and sent again, and p50/p99 before the kill, until the replica is
ready again, and after.

Throughput: the same load for ``--throughput-seconds`` with 1, 2 and 3 replicas. On a 2-core
machine every replica shares the same two cores, so this measures the balancer's and the
extra processes' overhead, not scaling.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import run
from benchmarks.balancer import NO_NGINX, Balancer, nginx_binary, run_fault_load, throughput
from benchmarks.load import load_faces
from service.arguments import count, non_negative_seconds, positive_seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=positive_seconds, default=60,
                        help="length of the fault run, at the least: it also lasts until 5 s "
                        "after the restarted replica is ready")
    parser.add_argument("--kill-at", type=non_negative_seconds, default=20,
                        help="when a replica is killed")
    parser.add_argument("--restart-after", type=non_negative_seconds, default=10,
                        help="how long it stays dead")
    parser.add_argument("--clients", type=count, default=8, help="concurrent connections")
    parser.add_argument("--throughput-seconds", type=non_negative_seconds, default=20,
                        help="length of each throughput run (0: skip them)")
    parser.add_argument("--images", type=count, default=100, help="distinct test images sent")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if nginx_binary() is None:  # one line, before the replicas start
        raise SystemExit(f"bench_scale_out: {NO_NGINX}")
    images = load_faces(args.images)
    with tempfile.TemporaryDirectory(prefix="scale-out-") as folder:
        with Balancer(3, Path(folder) / "fault") as balancer:
            report = run_fault_load(balancer, images, args.seconds, args.kill_at,
                                    args.restart_after, args.clients)
        report["failures"] = report["failures"][:10]
        print("fault run: " + json.dumps(report), flush=True)
        print(f"  sent {report['sent']}, succeeded {report['succeeded']}, failed "
              f"{report['failed']} (sent again after a broken connection: "
              f"{report['retried']}); replica killed at {report['killed_at_s']} s, restarted at "
              f"{report['restarted_at_s']} s, ready again at {report['ready_again_at_s']} s",
              flush=True)
        for phase, figures in report["phases"].items():
            print(f"  {phase}: {figures}", flush=True)
        if args.throughput_seconds:
            for replicas in (1, 2, 3):
                with Balancer(replicas, Path(folder) / f"x{replicas}") as balancer:
                    figures = throughput(balancer, images, args.throughput_seconds,
                                         args.clients)
                print(f"throughput: {json.dumps(figures)}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(run(main))
