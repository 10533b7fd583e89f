"""Load and overload against a real server (``python -m service``) on loopback.

    python -m benchmarks.bench_load [--clients 32] [--seconds 60] [--overload-in-flight 4]

Load: ``--clients`` connections post real test-split images for ``--seconds`` to a server
with the default settings but one worker. Goal: no request fails.

Overload: the same clients against a server whose ``EMOTION_MAX_IN_FLIGHT`` is
``--overload-in-flight``. Requests past that limit must get 503 with Retry-After, and
nothing else may fail. How fast the 503s come is printed beside the admitted requests'
latency, not judged: a refusal waits for the event loop as any answer does.

Prints the figures; exits with status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse

from benchmarks import run, run_loop
from benchmarks.load import describe, latency_ms, load_faces, one_face_each, post_images
from service.arguments import count, positive_seconds
from tests.server import running_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=count, default=32, help="concurrent connections")
    parser.add_argument("--seconds", type=positive_seconds, default=60,
                        help="length of the load run")
    parser.add_argument("--overload-seconds", type=positive_seconds, default=15,
                        help="length of the overload run")
    parser.add_argument("--overload-in-flight", type=count, default=4,
                        help="EMOTION_MAX_IN_FLIGHT of the overloaded server")
    parser.add_argument("--images", type=count, default=200, help="distinct test images sent")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload = one_face_each(load_faces(args.images))
    missed = []

    with running_server() as base:
        run_loop(post_images(base, payload, clients=4, requests=40))  # warm-up
        outcomes, wall = run_loop(post_images(base, payload, args.clients,
                                                 seconds=args.seconds))
    failed = [o for o in outcomes if o.status != 200]
    print(f"load, {args.clients} clients, {args.seconds:.0f} s: {describe(outcomes, wall)}; "
          f"failed {len(failed)}")
    if failed:
        missed.append(f"{len(failed)} requests failed under load")

    env = {"EMOTION_MAX_IN_FLIGHT": str(args.overload_in_flight)}
    with running_server(env=env) as base:
        run_loop(post_images(base, payload, clients=4, requests=40))
        outcomes, wall = run_loop(post_images(base, payload, args.clients,
                                                 seconds=args.overload_seconds))
    admitted = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 503]
    other = [o for o in outcomes if o.status not in (200, 503)]
    without_retry_after = [o for o in shed if o.retry_after is None]
    print(f"overload, {args.clients} clients, max in flight {args.overload_in_flight}: "
          f"{describe(outcomes, wall)}")
    print(f"  503s: {len(shed)}, p50 {latency_ms(shed, 50):.1f} ms, p99 "
          f"{latency_ms(shed, 99):.1f} ms, without Retry-After {len(without_retry_after)}; "
          f"admitted p50 {latency_ms(admitted, 50):.1f} ms; other failures {len(other)}")
    if not shed:
        missed.append("the overloaded server never answered 503")
    if without_retry_after or other:
        missed.append("503s without Retry-After or other failures under overload")
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(run(main))
