"""Soak: many requests against one real server with its memory sampled throughout.

    python -m benchmarks.bench_soak [--requests 20000] [--clients 8] [--warmup 2000]

Every tenth request is a truncated image (a 400), every tenth a batch of four faces, the
rest single real test-split images, so the error and batch paths soak too. The server's
resident memory (RSS) is sampled every ``--interval`` seconds. Goal: RSS grows less than 5%
from the end of the warm-up to the end. Prints the figures; exits with status 1 when a
request fails unexpectedly or the goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import psutil

from benchmarks import run, run_loop
from benchmarks.load import describe, load_faces, post_images
from service.arguments import count, positive_seconds
from tests.server import server_process

GROWTH_GOAL = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=count, default=20_000, help="requests in all")
    parser.add_argument("--warmup", type=int, default=2_000,
                        help="requests before the baseline RSS is taken")
    parser.add_argument("--clients", type=count, default=8, help="concurrent connections")
    parser.add_argument("--interval", type=positive_seconds, default=0.5,
                        help="seconds between samples")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.requests:  # the baseline is taken after the warm-up
        parser.error(f"--warmup {args.warmup} must be at least 0 and below --requests "
                     f"{args.requests}")
    return args


def soak_payload(faces: list[bytes]):
    def payload(i: int) -> list[tuple[str, bytes]]:
        face = faces[i % len(faces)]
        if i % 10 == 9:
            return [("cut.jpg", face[: len(face) // 3])]
        if i % 10 == 8:
            return [(f"{j}.jpg", faces[(i + j) % len(faces)]) for j in range(4)]
        return [("face.jpg", face)]
    return payload


async def soak(base: str, process: psutil.Process, args, faces: list[bytes]
               ) -> tuple[list, float, list]:
    samples: list[tuple[float, int, int]] = []  # (seconds, requests done, rss bytes)
    done: list = []
    task = asyncio.create_task(post_images(base, soak_payload(faces), args.clients,
                                           requests=args.requests, outcomes=done))
    started = time.perf_counter()
    while not task.done():
        samples.append((time.perf_counter() - started, len(done), rss(process)))
        await asyncio.sleep(args.interval)
    outcomes, wall = await task
    samples.append((time.perf_counter() - started, len(outcomes), rss(process)))
    return outcomes, wall, samples


def rss(process: psutil.Process) -> int:
    return process.memory_info().rss + sum(
        child.memory_info().rss for child in process.children(recursive=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faces = load_faces(300)  # before the server: a missing dataset is one line
    with server_process() as (base, popen):
        process = psutil.Process(popen.pid)
        start_rss = rss(process)
        outcomes, wall, samples = run_loop(soak(base, process, args, faces))
    statuses = Counter(o.status for o in outcomes)
    after_warmup = [r for _, done, r in samples if done >= args.warmup]
    baseline, end, peak = after_warmup[0], samples[-1][2], max(r for _, _, r in samples)
    growth = (end - baseline) / baseline
    print(f"soak: {describe(outcomes, wall)}")
    print(f"RSS: at start {start_rss / 2**20:.0f} MiB, after {args.warmup} warm-up requests "
          f"{baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, at the end "
          f"{end / 2**20:.0f} MiB; growth after warm-up {growth:+.1%} (goal < "
          f"{GROWTH_GOAL:.0%}); {len(samples)} samples")
    unexpected = {s: n for s, n in statuses.items() if s not in (200, 400)}
    missed = []
    if unexpected:
        missed.append(f"unexpected statuses {unexpected}")
    if growth >= GROWTH_GOAL:
        missed.append(f"RSS grew {growth:.1%} after warm-up")
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(run(main))
