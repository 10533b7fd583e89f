"""``emotion-detect``: classify a folder of images or a video from the command line.

The same preprocessing, models, face cropper and decision rule as the service, through the
same predictor (``service/inference.py``), in worker processes here or, with ``--url``,
through a running service. Exit status: 0 when every file was read (whatever it held), 1 when
some could not be read or the service could not be used, 2 for a usage mistake, 128 plus the
signal's number when stopped by Ctrl-C (130), SIGTERM (143) or SIGHUP (129).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from service.arguments import MAX_BATCH_SIZE, batch_size, count
from service.batch import (
    COLUMNS,
    UNREADABLE,
    LocalRunner,
    RemoteError,
    RemoteRunner,
    RowWriter,
    UsageError,
    default_workers,
    expand_paths,
    finished_paths,
    output_format,
    require_faces_in_process,
    writable_path,
)
from service.inference import FACES_MODES, PredictorError, UnknownModelError
from service.manifest import ManifestError
from service.settings import SettingsError, load_settings
from service.signals import stops_taken_as_ctrl_c

MAX_TIMEOUT = 86400.0  # a day: past it a socket's timeout overflows, and no answer is that slow
MAX_FPS = 1000.0  # above any camera's frame rate: more than that is every frame anyway

def _progress(total: int, initial: int = 0):
    from tqdm import tqdm

    # disable=None: off when stderr is not a terminal (a log file, a pipe, CI)
    return tqdm(total=total, initial=initial, unit="img", file=sys.stderr, disable=None,
                dynamic_ncols=True, smoothing=0.1)


def run_images(args: argparse.Namespace) -> int:
    output_format(args.out)
    writable_path(args.out)
    # the output itself, in a folder it classifies: read as an image on the next run
    # (realpath: Path.resolve raises on a looping link, which gets its row like any other)
    out = os.path.realpath(args.out)
    paths = [str(p) for p in expand_paths(args.paths, args.recursive)
             if os.path.realpath(p) != out]
    # read, not changed yet: a file this command did not write is refused before any work
    done = finished_paths(args.out, paths, apply=False) if args.resume else set()
    settings = load_settings()
    if args.url:
        if not 0 < args.timeout <= MAX_TIMEOUT:  # nan and inf too (a socket takes neither)
            raise UsageError(f"--timeout must be above 0 and at most {MAX_TIMEOUT:g} seconds")
        if not 0 <= args.wait <= MAX_TIMEOUT:
            raise UsageError(f"--wait must be 0 to {MAX_TIMEOUT:g} seconds")
        runner = RemoteRunner(args.url, args.model, args.faces, args.connections,
                              args.batch_size, timeout=args.timeout,
                              max_bytes=settings.max_upload_bytes, wait=args.wait)
    else:
        runner = LocalRunner(args.models_dir or settings.models_dir,
                             args.model or settings.default_model,
                             args.faces or settings.default_faces, args.workers,
                             args.batch_size, settings.max_faces_per_image, settings.limits)
    runner.check()
    todo = [p for p in paths if p not in done]

    def opened() -> RowWriter:
        # a resumed output changes only with the first rows: a run refused before them (a
        # service that is down, or that has not the model asked for) leaves it as it was
        finished_paths(args.out, paths)
        return RowWriter(args.out, COLUMNS, append=True)

    # a run that starts over empties its output at once: an interrupted one's --resume then
    # goes on from it, not from an older run's rows
    writer = None if args.resume else RowWriter(args.out, COLUMNS)
    started, rows, unreadable, errors, cut = time.perf_counter(), 0, 0, 0, 0
    progress = _progress(len(paths), len(paths) - len(todo))
    try:
        for batch in runner.run(todo):
            for file_rows in batch:
                writer = writer or opened()
                writer.write(file_rows)
                rows += len(file_rows)
                codes = [r.values["code"] for r in file_rows if r.values["code"]]
                errors += bool(codes)
                unreadable += UNREADABLE in codes
                # more faces found than classified: auto's largest only, or all's limit
                cut += any((r.faces_found or 0) > len(file_rows) for r in file_rows)
            progress.update(len(batch))
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    if writer is None:  # nothing left to classify: the output as a finished run leaves it
        opened().close()
    wall = time.perf_counter() - started
    print(f"emotion-detect: {len(todo)} files ({len(paths) - len(todo)} already in {args.out}), "
          f"{rows} rows, {errors} files with an error, in {wall:.1f} s "
          f"({len(todo) / wall if wall else 0:.1f} images/s)", file=sys.stderr)
    if cut:
        print(f"emotion-detect: {cut} files had more faces than were classified (faces=auto "
              "takes the largest; all stops at EMOTION_MAX_FACES_PER_IMAGE)", file=sys.stderr)
    return 1 if unreadable else 0


def run_video(args: argparse.Namespace) -> int:
    from service.inference import Predictor
    from service.video import (
        VIDEO_COLUMNS,
        DamagedVideoError,
        VideoError,
        classify_video,
        plot_formats,
        plot_largest_face,
    )

    output_format(args.out)
    writable_path(args.out)
    if args.plot is not None:
        writable_path(args.plot, "--plot")
        # refused before the video is read, not after it (matplotlib's own traceback)
        if args.plot.suffix.lower().lstrip(".") not in (formats := plot_formats()):
            raise UsageError(f"--plot {args.plot}: its extension names the format, one of "
                             f"{', '.join(formats)}")
    if not args.video.is_file():  # a pipe too: FFmpeg seeks in most files (an MP4's index)
        raise UsageError(f"{args.video}: " + (
            "a folder; name a video file" if args.video.is_dir() else
            "not a regular file (a pipe or a device); name a video file" if args.video.exists()
            else "no such file"))
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        # a GIF's plot named after it replaced the video with the plot
        if path is not None and (os.path.realpath(path) == os.path.realpath(args.video) or (
                path.exists() and path.samefile(args.video))):  # a hard link: another name
            raise UsageError(f"{option} {path} is the video itself; name another file")
    if not 0 < args.fps <= MAX_FPS:  # also refuses nan and inf, whose steps never advance
        raise UsageError(f"--fps must be above 0 and at most {MAX_FPS:g}")
    settings = load_settings()
    predictor = Predictor.load(args.models_dir or settings.models_dir,
                               threads=settings.resolved_onnx_threads,
                               max_faces=settings.max_faces_per_image)
    model, mode = args.model or settings.default_model, args.faces or settings.default_faces
    predictor.model(model)
    require_faces_in_process(predictor, mode)
    columns = (*VIDEO_COLUMNS, *COLUMNS[1:])
    # opened at the first rows: a file that is no video leaves an earlier --out as it was
    writer: RowWriter | None = None
    started, written, frames, cut = time.perf_counter(), 0, 0, 0
    plotted: list = []  # only the plot needs the rows again: a long video's stay on disk
    try:
        for rows in classify_video(predictor, args.video, model, mode, args.fps,
                                   args.batch_size):
            writer = writer or RowWriter(args.out, columns)
            writer.write(rows)
            written += len(rows)
            classified = Counter(r.values["frame"] for r in rows)  # a frame's rows share a batch
            found = {r.values["frame"]: r.faces_found or 0 for r in rows}
            frames += len(classified)
            # more faces found than classified: auto's largest only, or all's limit
            cut += sum(found[frame] > n for frame, n in classified.items())
            if args.plot:
                plotted += rows
    except Exception as exc:
        # PyAV raises its own errors for a file it cannot decode
        if not (isinstance(exc, VideoError) or type(exc).__module__.startswith("av")):
            raise
        reason = exc if isinstance(exc, VideoError) else (
            f"{args.video}: cannot decode the video: {exc}")
        where = "read" if isinstance(exc, DamagedVideoError) else "before it"  # all, or some
        kept = f"; the {written} rows of the {frames} frames {where} are in {args.out}"
        if args.plot and plotted:  # drawn for the rows kept, as they are: nothing read is lost
            try:
                plot_largest_face(plotted, args.plot, f"{args.video.name} (cut short): "
                                  f"{model}, faces={mode}, {args.fps:g} frames/s")
                kept += f", and their plot in {args.plot}"
            except Exception as plot_error:  # noqa: BLE001 the cut is the news, not the plot
                # (matplotlib's writers fail with more than OSError: a full disk under PDF)
                kept += f"; their plot could not be written ({plot_error})"
        print(f"emotion-detect: {reason}{kept if frames else ''}", file=sys.stderr)
        return 1
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no frame sampled: the columns alone
        RowWriter(args.out, columns).close()
    summary = (f"emotion-detect: {frames} frames sampled, {written} rows in "
               f"{time.perf_counter() - started:.1f} s")
    plot_error = None
    if args.plot:
        try:
            plot_largest_face(plotted, args.plot, f"{args.video.name}: {model}, faces={mode}, "
                              f"{args.fps:g} frames/s")
        except Exception as exc:  # noqa: BLE001 as above: a traceback after the whole video
            plot_error = exc
            summary += f", in {args.out}; their plot could not be written ({exc})"
    print(summary, file=sys.stderr)
    if cut:
        print(f"emotion-detect: {cut} frames had more faces than were classified (faces=auto "
              "takes the largest; all stops at EMOTION_MAX_FACES_PER_IMAGE)", file=sys.stderr)
    return 1 if plot_error else 0


def model_name(text: str) -> str:
    """Not empty: `--model ''` (an unset shell variable) quietly ran the default model."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; name a model, such as cnn or knn")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotion-detect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, faces: str | None, remote: bool) -> None:
        served = "; with --url, the service's" if remote else ""
        sub.add_argument("--out", type=Path, required=True, metavar="FILE",
                         help="where the rows go: .csv or .jsonl, by its extension")
        sub.add_argument("--faces", choices=FACES_MODES, default=faces,
                         help="auto: the largest face; all: every face, a row each; none: "
                         "the whole image (default: " + (
                             faces or f"EMOTION_DEFAULT_FACES{served}") + ")")
        sub.add_argument("--model", type=model_name, default=None,
                         help=f"cnn or knn (default: EMOTION_DEFAULT_MODEL{served})")
        sub.add_argument("--batch-size", type=batch_size, default=8,
                         help="images (or frames) per model call (default: %(default)s, at "
                         f"most {MAX_BATCH_SIZE})")
        sub.add_argument("--models-dir", type=Path, default=None,
                         help="the models folder (default: EMOTION_MODELS_DIR, else the "
                         "shipped models)")

    images = commands.add_parser(
        "images", help="classify image files; a row per face",
        description="Classify images: files, folders, or text files listing one path per "
        "line. Rows: path, face box, label, a probability per class, error, code.")
    images.add_argument("paths", nargs="+", metavar="PATH",
                        help="an image, a folder, or a .txt/.list/.lst file of paths")
    images.add_argument("--recursive", action="store_true",
                        help="look inside sub-folders too")
    common(images, None, remote=True)
    images.add_argument("--workers", type=count, default=default_workers(),
                        help="worker processes for the models, at most one per batch "
                        "(default: this container's CPUs, here %(default)s)")
    images.add_argument("--resume", action="store_true",
                        help="skip paths that already have rows in --out, and append")
    images.add_argument("--url", default=None,
                        help="send the images to a running service at this URL instead")
    images.add_argument("--connections", type=count, default=8,
                        help="with --url: concurrent keep-alive connections (default: "
                        "%(default)s)")
    images.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="with --url: the most seconds to wait for each part of a batch's "
                        "answer, and for its whole body once its headers came; past it the "
                        "run stops (default: %(default)s)")
    images.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                        help="with --url: the most seconds a batch waits out a busy service "
                        "(503, 429, 408), each time as its Retry-After asks; past it the run "
                        "stops (default: %(default)s)")
    images.set_defaults(func=run_images, parser=images)

    video = commands.add_parser(
        "video", help="classify the faces of a video over time",
        description="Sample a video's frames and classify every face in them; a row per "
        "frame and face, with time_s and frame. Needs the video extra (PyAV; matplotlib "
        "for --plot).")
    video.add_argument("video", type=Path, metavar="FILE", help="the video")
    common(video, "all", remote=False)  # a frame is a scene, not a face crop
    video.add_argument("--fps", type=float, default=2.0,
                       help="frames sampled per second (default: %(default)s)")
    video.add_argument("--plot", type=Path, default=None, metavar="PNG",
                       help="also draw the probabilities over time of the largest face")
    video.set_defaults(func=run_video, parser=video)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # SIGTERM and SIGHUP clean up as Ctrl-C does: a `kill` of this process alone left
        # its worker processes waiting for ever, 230 MB each (a review)
        with stops_taken_as_ctrl_c():
            return args.func(args)
    except (UsageError, UnknownModelError) as exc:  # --model names no model of the folder
        args.parser.error(str(exc))  # the subcommand's usage line, not the top one
    except (PredictorError, ManifestError, RemoteError) as exc:
        print(f"emotion-detect: {exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:
        print(f"emotion-detect: {exc}", file=sys.stderr)
        return 2
    except BrokenProcessPool:  # a worker killed (out of memory, say): the rows so far stay
        print("emotion-detect: a worker process died (out of memory?); --resume picks up "
              "where it stopped", file=sys.stderr)
        return 1
    except OSError as exc:  # --out unwritable (a full disk, /proc), a folder unreadable
        print(f"emotion-detect: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        number = getattr(exc, "number", signal.SIGINT)
        how = "interrupted" if number == signal.SIGINT else \
            f"stopped by {signal.Signals(number).name}"
        resume = "; --resume picks up where it stopped" if args.command == "images" else ""
        print(f"emotion-detect: {how}{resume}", file=sys.stderr)
        return 128 + number
    return 0


if __name__ == "__main__":
    sys.exit(main())
