"""Classifying many images for the command line: which files, which rows, where they go.

Rows are one per face (one per file when no face is used or the file is bad): ``path``, the
face box, ``label``, one probability column per class, ``error`` and ``code``. They are
written as they come, a file's rows at once, so an interrupted run keeps what it finished and
``--resume`` picks up the rest. Two ways to get them, with the same rows:

* in-process (:class:`LocalRunner`): worker processes, each with its own
  :class:`~service.inference.Predictor`, take batches of files and make one model call per
  batch;
* remote (:class:`RemoteRunner`): batches go to a running service's ``/predict`` over
  concurrent keep-alive connections, honouring ``503`` with ``Retry-After`` and retrying
  connection failures.
"""

from __future__ import annotations

import csv
import errno
import io
import itertools
import json
import multiprocessing
import os
import queue
import random
import select
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from service.classes import CLASS_NAMES
from service.inference import (
    FacesMode,
    FacesUnavailableError,
    ImageInput,
    ImagePrediction,
    ModelUnavailableError,
    Predictor,
)
from service.preprocessing import (
    DEFAULT_MAX_BYTES,
    ImageLimits,
    PreprocessingError,
    TooManyBytesError,
)
from service.signals import STOPPING_SIGNALS, signals_held

BOX_COLUMNS = ("face_x", "face_y", "face_width", "face_height")
COLUMNS = ("path", *BOX_COLUMNS, "label", *CLASS_NAMES, "error", "code")
LIST_SUFFIXES = (".txt", ".list", ".lst")
UNREADABLE = "unreadable"
# what /predict answers about one image (the others are about the request or the service)
IMAGE_ERROR_CODES = frozenset(error.code for error in (
    PreprocessingError, *PreprocessingError.__subclasses__()))
REFUSED_AT_START_UP = frozenset(error.code for error in (
    ModelUnavailableError, FacesUnavailableError))
# What --url waits out, as its messages say it (408: the body came too slowly for the service)
WAITED_OUT = {503: "busy", 429: "limiting requests", 408: "timing out the uploads"}


class UsageError(ValueError):
    """A mistake on the command line: reported in one line, exit status 2."""


def expand_paths(paths: Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Files, the files of folders (all levels with ``recursive``; hidden ones skipped), and
    the paths listed in text files (``.txt``, ``.list``, ``.lst``: one per line, relative to
    the current folder), in order, each once."""
    out: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        if path not in seen:
            seen.add(path)
            out.append(path)

    for raw in paths:
        path = Path(raw)
        if os.path.isdir(path):  # Path.is_dir raised for a name in a folder not searchable
            # a folder that cannot be listed gets its unreadable row, as a file does, rather
            # than stopping the run (named here) or vanishing from it (found by --recursive)
            unlistable: set[Path] = set()
            if recursive:
                found = list(_walk(path, unlistable.add))
            else:
                try:
                    found = list(path.iterdir())
                except OSError:
                    unlistable.add(path)
                    found = []
            files = 0
            for item in sorted([*found, *unlistable]):
                hidden = any(part.startswith(".") for part in item.relative_to(path).parts)
                if (item in unlistable or _gets_a_row(item)) and not hidden:
                    add(item)
                    files += 1
            if not files and not recursive and any(p.is_dir() for p in path.iterdir()):
                raise UsageError(f"{raw}: no files, only folders; add --recursive to read "
                                 "them")
        elif path.suffix.lower() in LIST_SUFFIXES and os.path.isfile(path):
            # bytes, decoded as the file system does: a name need not be UTF-8
            # a byte-order mark, as Windows editors write, is not part of the first name
            for line in path.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines():
                name = os.fsdecode(line.strip())
                if name and not name.startswith("#"):
                    add(Path(name))
        elif _named(path):
            add(path)
        else:
            raise UsageError(f"{raw}: no such file or folder")
    return out


def _named(path: Path) -> bool:
    """Whether a path given is there: one that cannot be looked at (in a folder that cannot
    be searched) is, and its row says why; a broken link is too."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _gets_a_row(entry: Path) -> bool:
    """A folder's entry is classified if it is a file; one that cannot be looked at (a
    broken or looping link, an entry of a folder that cannot be searched) gets its unreadable
    row, as it does when named directly, rather than vanishing from the output."""
    try:
        return stat.S_ISREG(entry.stat().st_mode)
    except OSError:
        return True


def _walk(folder: Path, unlistable: Callable[[Path], None]) -> Iterator[Path]:
    """Every entry under ``folder``, through linked folders too (``rglob`` skips them),
    each real folder once, so that a link back up does not loop; each folder that cannot be
    listed goes to ``unlistable``."""
    seen = {folder.resolve()}
    for root, folders, names in os.walk(folder, followlinks=True,
                                        onerror=lambda exc: unlistable(Path(exc.filename))):
        kept = []
        # real folders before links to them, then by name: the same files get the same
        # paths whatever order the file system lists them in; hidden folders not entered
        for name in sorted(folders, key=lambda n: (os.path.islink(Path(root) / n), n)):
            if name.startswith("."):
                continue
            real = (Path(root) / name).resolve()
            if real not in seen:
                seen.add(real)
                kept.append(name)
        folders[:] = kept
        yield from (Path(root) / name for name in names)


@dataclass(frozen=True)
class Row:
    values: dict
    faces_found: int | None = None  # not a column: the summary says when faces were left out

    @classmethod
    def error(cls, path: str, message: str, code: str, **extra) -> Row:
        return cls({"path": path, **extra, **dict.fromkeys(BOX_COLUMNS), "label": None,
                    **dict.fromkeys(CLASS_NAMES), "error": message, "code": code})


def rows_of(path: str, result: ImagePrediction, **extra) -> list[Row]:
    """One row per face of ``result`` (``extra``: columns placed after ``path``)."""
    if result.error is not None:
        return [Row.error(path, str(result.error), result.error.code, **extra)]
    rows = []
    for p in result.predictions:
        box = (dict.fromkeys(BOX_COLUMNS) if p.face is None else dict(zip(BOX_COLUMNS, (
            round(p.face.x), round(p.face.y), round(p.face.width), round(p.face.height)),
            strict=True)))
        rows.append(Row({"path": path, **extra, **box, "label": p.label,
                         **{c: float(v) for c, v in zip(CLASS_NAMES, p.probabilities,
                                                        strict=True)},
                         "error": None, "code": None}, result.faces_found))
    return rows


class RowWriter:
    """CSV or JSON Lines by the file's extension; appends, and flushes each file's rows."""

    def __init__(self, path: Path, columns: Sequence[str], append: bool = False):
        self.path, self.columns = path, list(columns)
        self.format = output_format(path)
        fresh = not append or not path.exists() or path.stat().st_size == 0
        # surrogateescape: a file name that is not UTF-8 is written as its own bytes, and
        # read back by --resume as the same path
        self.handle = path.open("a" if append else "w", newline="", encoding="utf-8",
                                errors="surrogateescape")
        if self.format == "csv" and fresh:
            self.handle.write(self._csv_line(self.columns))

    def _csv_line(self, values) -> str:
        buffer = io.StringIO()
        # "\r\n", as RFC 4180 says: a field holding a lone "\r" is then quoted (a file name
        # may hold one), which "\n" left bare for readers to split the row at
        csv.writer(buffer, lineterminator="\r\n").writerow(values)
        return buffer.getvalue()

    def write(self, rows: Iterable[Row]) -> None:
        if self.format == "csv":
            text = "".join(self._csv_line(["" if row.values[c] is None else row.values[c]
                                           for c in self.columns]) for row in rows)
        else:
            text = "".join(json.dumps({c: row.values[c] for c in self.columns}) + "\n"
                           for row in rows)
        self.handle.write(text)  # one write per file: its rows land together
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def writable_path(path: Path, what: str = "--out") -> None:
    """Refused before any work, not after the models have loaded (or a whole video)."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; name a file")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"{what} {path}: its folder does not exist")


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise UsageError(f"{path}: the output's extension says its format: .csv or .jsonl")


def _records(text: str, fmt: str, columns: Sequence[str]) -> tuple[list[list], list[int]]:
    """The complete rows of an earlier output, each as its values in ``columns`` order, and
    the character offset where each ends (the first entry: where the rows begin). A last row
    cut short is left out. A file this command did not write is refused."""
    foreign = UsageError(f"--resume: the output was not written by this command (its "
                         f"columns are not {', '.join(columns[:3])}, ...); name another --out")
    lines = text.splitlines(keepends=True) if fmt == "jsonl" else \
        io.StringIO(text, newline="").readlines()
    line_ends = list(itertools.accumulate(map(len, lines), initial=0))
    records, ends = [], [0]
    header = ",".join(columns)
    if fmt == "csv" and len(text) < len(header) and header.startswith(text):
        return records, ends  # cut inside the header: no row of ours was written yet
    if fmt == "csv":
        reader = csv.reader(lines)
        try:
            for number, record in enumerate(reader):
                end = line_ends[reader.line_num]
                if number == 0:
                    if record != list(columns):
                        raise foreign
                    ends[0] = end
                elif len(record) == len(columns) and text[end - 1:end] in ("\n", "\r"):
                    records.append(record)
                    ends.append(end)
                # a short row with its line end, as every row before the last has: not ours
                # (a row of ours cut short has none; a user's own last line was erased, a review)
                elif text[end - 1:end] in ("\n", "\r"):
                    raise foreign
        except csv.Error:  # a quote left open: cut inside a quoted path, or not ours
            if not records and ends == [0]:
                raise foreign from None
    else:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: 2 KB of "[" (a traceback)
                ours = json.dumps({columns[0]: ""})[:-2]  # how each row of ours begins
                if number == len(lines) - 1 and not line.endswith("\n") and (
                        line.startswith(ours) or ours.startswith(line)) and not _whole_json(
                        line):
                    break  # the last line, cut mid-way (a user's own one line was erased)
                raise foreign from None
            # whole JSON, but not a row of ours: refused, with its line end or without
            if not isinstance(record, dict) or list(record) != list(columns):
                raise foreign
            records.append([record[c] for c in columns])
            ends.append(line_ends[number + 1])
    return records, ends


def _whole_json(line: str) -> bool:
    """Whether ``line`` begins with a whole JSON value (text after it, as in a user's own
    note, is not a row of ours cut short)."""
    try:
        json.JSONDecoder().raw_decode(line)
    except (ValueError, RecursionError):
        return False
    return True


def finished_paths(path: Path, again: Collection[str] | None = None,
                   apply: bool = True) -> set[str]:
    """Paths an earlier run already wrote rows for, for ``--resume``; ``again``: the paths
    this run classifies (None: any). Of those, two kinds are done again and their rows
    removed: the last file's, as an interrupted run may have cut its rows short, and any
    that could not be read (a permission since fixed, a pipe that had no writer yet; a folder
    that could not be listed, once its files are among ``again``). Every other complete row
    is kept. Records, not lines: a path may hold a newline. ``apply=False`` only reads it
    (and refuses a file this command did not write): a run that stops before its work
    leaves its output as it was."""
    if not path.exists():
        return set()
    fmt = output_format(path)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    records, ends = _records(text, fmt, COLUMNS)
    again = None if again is None else set(again)  # looked up once per row
    # a folder that could not be listed: its row goes once it can be and files in it are given
    within = set() if again is None else {str(folder) for name in again
                                          for folder in Path(name).parents}
    code = COLUMNS.index("code")
    redo = {r[0] for r in records if r[code] == UNREADABLE and (
        again is None or r[0] in again or (r[0] in within and _listable(r[0])))}
    if records and (again is None or records[-1][0] in again):
        redo.add(records[-1][0])
    kept = [i for i, record in enumerate(records) if record[0] not in redo]
    pieces = [text[ends[i]:ends[i + 1]] for i in kept]
    same = next((n for n, i in enumerate(kept) if n != i), len(kept))  # rows still in place
    if pieces and not pieces[-1].endswith(("\n", "\r")):  # a last JSON line without its end
        pieces[-1] += "\n"
        same = min(same, len(kept) - 1)
    if not apply:
        return {records[i][0] for i in kept}
    tail = "".join(pieces[same:])
    if ends[0] and not text[:ends[0]].endswith(("\n", "\r")):
        tail = "\r\n" + tail  # a CSV header without its line end: rows went onto its line
    _rewrite_from(path, len(text[:ends[same]].encode("utf-8", errors="surrogateescape")),
                  tail.encode("utf-8", errors="surrogateescape"))
    return {records[i][0] for i in kept}


def _listable(folder: str) -> bool:
    try:
        os.listdir(folder)
    except OSError:
        return False
    return True


def _rewrite_from(path: Path, offset: int, data: bytes) -> None:
    """The file from ``offset`` on becomes ``data``, in place, with Ctrl-C, SIGTERM and a
    closed terminal's SIGHUP taken after it: emptying and rewriting the whole file lost
    every row to an interrupt, and a new file put in its place would replace a link to it
    with a copy, lose its owner, and need a folder it may write to."""
    with signals_held(*STOPPING_SIGNALS), path.open("r+b") as file:
        file.seek(offset)
        file.write(data)
        file.truncate()
        file.flush()
        os.fsync(file.fileno())


PIPE_WAIT_SECONDS = 30.0  # for a named pipe's first bytes, before its row says none came


def _open_for_reading(path: str):
    """``open(path, "rb")``, except that a named pipe nothing writes to is an error after
    :data:`PIPE_WAIT_SECONDS`, not a wait for ever (open() blocks until a writer comes)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if stat.S_ISFIFO(mode):
            poller = select.poll()
            poller.register(descriptor, select.POLLIN)
            if not poller.poll(PIPE_WAIT_SECONDS * 1000):
                raise TimeoutError(errno.ETIMEDOUT, f"a named pipe that nothing wrote to in "
                                   f"{PIPE_WAIT_SECONDS:g} s")
        os.set_blocking(descriptor, True)
        return open(descriptor, "rb")  # the caller closes it
    except BaseException:
        os.close(descriptor)
        raise


def read_inputs(paths: Sequence[str], max_bytes: int | None = None
                ) -> tuple[list[ImageInput], dict[int, str]]:
    """The files' bytes, and why each one that could not be read was not. Past
    ``max_bytes``, a file is refused after reading one byte more, not read whole."""
    inputs, unreadable = [], {}
    for i, path in enumerate(paths):
        try:
            with _open_for_reading(path) as file:
                data = file.read(-1 if max_bytes is None else max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                inputs.append(ImageInput(path, error=TooManyBytesError.past(max_bytes)))
            else:
                inputs.append(ImageInput(path, data))
        except OSError as exc:
            inputs.append(ImageInput(path, b""))
            unreadable[i] = _why_unreadable(path, exc)
    return inputs, unreadable


def _why_unreadable(path: str, exc: OSError) -> str:
    if os.path.isdir(path):  # a folder in a list file, or one that could not be listed
        try:
            os.listdir(path)
        except OSError as listing:
            return f"cannot list the folder: {listing.strerror or listing}"
    return f"cannot read the file: {exc.strerror or exc}"


def batch_rows(paths: Sequence[str], results: Sequence[ImagePrediction],
               unreadable: dict[int, str]) -> list[list[Row]]:
    return [[Row.error(path, unreadable[i], UNREADABLE)] if i in unreadable
            else rows_of(path, result)
            for i, (path, result) in enumerate(zip(paths, results, strict=True))]


# --- in-process -------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(models_dir: str, model: str, mode: FacesMode, max_faces: int,
                 limits: ImageLimits | None = None) -> None:
    if _worker.get("args") == (models_dir, model, mode, max_faces, limits):
        return
    # One ONNX thread per worker process: the processes are the parallelism.
    _worker["predictor"] = Predictor.load(Path(models_dir), threads=1, limits=limits,
                                          max_faces=max_faces)
    _worker["model"], _worker["mode"] = model, mode
    _worker["args"] = (models_dir, model, mode, max_faces, limits)
    _worker["predictor"].model(model)
    require_faces_in_process(_worker["predictor"], mode)


def require_faces_in_process(predictor: Predictor, mode: FacesMode) -> None:
    """``predictor.require_faces`` in the command line's words, and why: the service's are
    "not available on this server; use faces=none"."""
    try:
        predictor.require_faces(mode)
    except FacesUnavailableError:
        raise FacesUnavailableError(f"{predictor.cropper_error}; use --faces none") from None


def _classify(paths: Sequence[str]) -> list[list[Row]]:
    predictor = _worker["predictor"]
    inputs, unreadable = read_inputs(paths, predictor.limits.max_bytes)
    results = predictor.predict(_worker["model"], inputs, _worker["mode"])
    return batch_rows(paths, results, unreadable)


def batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _bounded(submit, chunks: Iterator[list[str]], in_flight: int) -> Iterator[list[list[Row]]]:
    """Results in input order, with at most ``in_flight`` batches submitted at once (the
    output then follows the input, which ``--resume`` and people both find easier)."""
    pending: deque[Future] = deque()
    for chunk in chunks:
        pending.append(submit(chunk))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# How worker processes start: "forkserver" forks them from a clean process (Linux), where
# plain fork copied this one's thread pools mid-use; elsewhere Python's own default.
WORKER_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


class LocalRunner:
    """Worker processes, each loading the models once."""

    def __init__(self, models_dir: Path, model: str, mode: FacesMode, workers: int,
                 batch_size: int, max_faces: int = 16, limits: ImageLimits | None = None):
        # limits: the service's EMOTION_MAX_UPLOAD_BYTES / EMOTION_MAX_PIXELS, so a file the
        # service refuses is refused here too
        self.args = (str(models_dir), model, mode, max_faces, limits)
        self.workers, self.batch_size = workers, batch_size

    def check(self) -> None:
        """Fail early, in this process, on an unknown model or a missing detector."""
        _init_worker(*self.args)

    def run(self, paths: Sequence[str]) -> Iterator[list[list[Row]]]:
        # a worker with no batch to take only loads the models: 3 files took 2.1 s with a
        # worker per CPU, 0.3 s in this process (a README walkthrough)
        workers = min(self.workers, -(-len(paths) // self.batch_size))
        if workers <= 1:  # no pool: the same code, in this process
            _init_worker(*self.args)
            for chunk in batches(paths, self.batch_size):
                yield _classify(chunk)
            return
        _start_resource_tracker()
        # Not forked from this process: check() ran the models here, and the kNN's OpenMP
        # threads, started, left a forked worker waiting in their barrier for ever.
        pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=self.args,
                                   mp_context=multiprocessing.get_context(WORKER_START))
        try:
            yield from _bounded(lambda chunk: _submit_uninterrupted(pool, chunk),
                                batches(paths, self.batch_size), 2 * workers)
        except BaseException:
            # Ctrl-C or a failure: the batches in hand are dropped, not finished first (a
            # named pipe's wait made a Ctrl-C take 30 s); --resume does them again
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def _start_resource_tracker() -> None:
    """multiprocessing's resource tracker, started with SIGHUP blocked, which it keeps: it
    ignores SIGINT and SIGTERM but not SIGHUP, so a closed terminal killed it, and its
    relaunch wrote a warning and five tracebacks (a review). Blocked in this thread only,
    not ignored: a SIGHUP meanwhile still stops the command (another thread may take it at
    once, or this one once the mask is restored)."""
    from multiprocessing import resource_tracker

    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _submit_uninterrupted(pool: ProcessPoolExecutor, chunk: Sequence[str]) -> Future:
    """``pool.submit``, with a Ctrl-C, SIGTERM or SIGHUP during it taken just after: inside,
    it could land while a worker or the pool's thread was half started, which shutdown can
    then neither stop nor join (a worker's traceback, or exit 1 instead of 130). Python runs
    signal handlers in the main thread whichever thread the signal reaches, so the handler
    is swapped, not the signal mask."""
    with signals_held(*STOPPING_SIGNALS):
        return pool.submit(_classify, chunk)


# --- remote -----------------------------------------------------------------------------

class _DaemonThreads:
    """A thread pool whose threads do not hold the process at exit: ThreadPoolExecutor's
    are joined then, so Ctrl-C against a hung service waited out every read's timeout."""

    def __init__(self, count: int):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.count = count
        for _ in range(count):
            threading.Thread(target=self._work, daemon=True).start()

    def submit(self, function, *args) -> Future:
        future: Future = Future()
        self.tasks.put((future, function, args))
        return future

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            future, function, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as exc:  # noqa: BLE001  handed to whoever waits on it
                    future.set_exception(exc)

    def shutdown(self) -> None:
        """Queued tasks cancelled; the threads end once their task in hand does."""
        while True:
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in range(self.count):
            self.tasks.put(None)


class RemoteError(RuntimeError):
    """The service could not be used (unreachable after retries, or refused the run)."""


MAX_ANSWER_BYTES = 64 * 1024 * 1024  # a batch's answer is kilobytes; an endless one is refused


def without_credentials(url: str) -> str:
    """``url`` as messages show it: a password in it (sent as Basic auth) is not printed.
    Everything before the last ``@`` becomes ``***``, as a password may hold ``/``, ``#`` or
    ``?`` typed unencoded, which a URL parser takes for the end of the host."""
    head, at, rest = url.rpartition("@")
    if not at:
        return url
    scheme, sep, _ = head.partition("://")
    return f"{scheme}://***@{rest}" if sep and scheme.lower() in ("http", "https") \
        else f"***@{rest}"


def _shown(url) -> str:
    """A parsed URL as messages show it: no user or password, no query."""
    return f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"


class RemoteRunner:
    """Batches sent to a running service's ``/predict``."""

    def __init__(self, url: str, model: str | None, mode: FacesMode | None, concurrency: int,
                 batch_size: int, retries: int = 8, timeout: float = 120.0,
                 max_bytes: int = DEFAULT_MAX_BYTES, wait: float = 300.0):
        import httpx

        shown = without_credentials(url)
        try:
            parsed = httpx.URL(url)
            port = parsed.port
        except httpx.InvalidURL as exc:  # whose text may quote a piece of the password
            raise UsageError(f"--url {shown}: " + (
                "not a URL; a password holding / # ? @ or : must be percent-encoded"
                if shown != url else str(exc))) from None
        # a query or fragment would end up before /predict, and a port past 65535 or no
        # host failed only at the first request, as a connection error, after three tries
        if (parsed.scheme not in ("http", "https") or not parsed.host
                or not (port is None or 0 < port < 65536) or parsed.query or parsed.fragment
                or url.rstrip().endswith(("?", "#"))):
            raise UsageError(f"--url {shown}: give it as http://host:port (a path after it is "
                             "kept, as for a proxy)")
        if "@" in url and not parsed.userinfo:  # the URL's host is then not what it seems
            raise UsageError(f"--url {shown}: an @ that does not end user:password@ (a "
                             "password holding / # ? or :, or an @ in the path) must be "
                             "percent-encoded")
        self.url, self.shown = url.rstrip("/"), _shown(parsed).rstrip("/")
        self.proxy = _environment_proxy(parsed)
        self.timeout = timeout  # each read's, and the whole body's from its headers on
        # read no more than this of a file, as in process: past it, the file's row says so
        # and it is not sent (a /dev/zero was read until memory ran out)
        self.max_bytes = max_bytes
        self.params = {k: v for k, v in (("model", model), ("faces", mode)) if v}
        self.concurrency, self.batch_size, self.retries = concurrency, batch_size, retries
        # how long a batch waits out a busy service: nine tries of its Retry-After of 1 s
        # gave up after 9 s, while a deployment adds replicas over minutes
        self.wait = wait
        # said once a run: minutes of silence looked hung
        self.said_waiting, self.said_waiting_lock = False, threading.Lock()
        limits = httpx.Limits(max_connections=concurrency,
                              max_keepalive_connections=concurrency)
        self.client = httpx.Client(timeout=timeout, limits=limits)

    def check(self) -> None:
        # three tries, not nine: a mistyped host or port took 22 s to be reported; a 503 is
        # taken as it is (a model refused at start-up, a drain), a proxy's 429 waited out
        response = self._send("GET", "/readyz", retries=2, wait=5.0, wait_out=(408, 429),
                              say=False)
        if response.status_code not in (200, 503):
            raise RemoteError(f"{self.shown}/readyz answered {response.status_code}"
                              + _what_to_change(response, f"{self.url}/readyz"))

    def _send(self, method: str, path: str, retries: int | None = None,
              wait: float | None = None, wait_out: Collection[int] = tuple(WAITED_OUT),
              say: bool = True, **kwargs):
        """The answer, after up to ``retries`` failed connections and ``wait`` seconds of
        answers with a status in ``wait_out`` (``say``: a line when the wait begins)."""
        import httpx

        retries = self.retries if retries is None else retries
        wait = self.wait if wait is None else wait
        delay, failures, waiting_since = 0.2, 0, None
        while True:
            try:
                response = self._answer(method, path, **kwargs)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
                # accepted and not answered: sending the batch again loads the service more
                raise RemoteError(f"{self.shown}{path}: no whole answer within "
                                  f"{self.timeout:g} s (--timeout)") from None
            except httpx.TransportError as exc:
                failures += 1
                if failures > retries or self.client.is_closed:
                    # a proxy that is down was said as the service refusing
                    through = (f" (through the proxy {without_credentials(self.proxy)}, from "
                               "the environment)" if self.proxy else "")
                    raise RemoteError(f"{self.shown}: {type(exc).__name__}: "
                                      f"{str(exc).replace(self.url, self.shown)}{through}"
                                      ) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except httpx.HTTPError as exc:  # a body it cannot decode, say: not transient
                raise RemoteError(f"{self.shown}{path}: {type(exc).__name__}: "
                                  f"{str(exc).replace(self.url, self.shown)}") from None
            # busy (503), rate-limited (429) or timed out reading the body (408): transient;
            # not a model or detector the service refused at start-up, which waiting out
            # its Retry-After of 60 s (for minutes, silently) does not mend
            if response.status_code in wait_out and _waited_out(response):
                now = time.monotonic()
                waiting_since = now if waiting_since is None else waiting_since
                left = waiting_since + wait - now
                if left > 0:
                    if say:
                        self._say_waiting(response.status_code, wait)
                    # up to a quarter more, so that clients refused together come back
                    # apart; the last pause ends at --wait, for a last try there
                    time.sleep(min(left, random.uniform(1.0, 1.25) * _retry_after(
                        response.headers.get("retry-after"), delay)))
                    delay = min(delay * 2, 5.0)
                    continue
            return response

    def _say_waiting(self, status: int, wait: float) -> None:
        with self.said_waiting_lock:
            if self.said_waiting:
                return
            self.said_waiting = True
        from tqdm import tqdm

        # tqdm's write: a line above the progress bar, not through it
        tqdm.write(f"emotion-detect: {self.shown} is {WAITED_OUT[status]} ({status}); each "
                   f"batch waits up to {wait:g} s for it (--wait)", file=sys.stderr)

    def _answer(self, method: str, path: str, **kwargs):
        """The answer, read whole within the timeout and up to :data:`MAX_ANSWER_BYTES`."""
        import httpx

        with self.client.stream(method, f"{self.url}{path}", **kwargs) as response:
            # from the headers on: the upload before them may take long on a slow link
            deadline = time.monotonic() + self.timeout
            body = bytearray()
            for chunk in response.iter_bytes():  # decoded: a compressed bomb is bounded too
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise RemoteError(f"{self.shown}{path} answered more than "
                                      f"{MAX_ANSWER_BYTES:,} bytes; refused")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the whole answer took too long")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("the whole answer took too long")
            # as bytes: a str past ASCII ("\xb2", read as latin-1) failed to encode again
            kept = [(k, v) for k, v in response.headers.raw if k.lower() in (
                b"content-type", b"retry-after", b"location", b"www-authenticate")]
            return httpx.Response(response.status_code, headers=kept, content=bytes(body))

    def _post(self, inputs: Sequence[ImageInput]):
        files = [("files", (str(i), image.data, "application/octet-stream"))
                 for i, image in enumerate(inputs)]
        return self._send("POST", "/predict", params=self.params, files=files)

    def _classify(self, paths: Sequence[str],
                  read: list[tuple[ImageInput, str | None]] | None = None) -> list[list[Row]]:
        """Rows for ``paths``; ``read``: each file's bytes, or why it could not be read, as
        read already: a batch sent again in parts is not read twice (a pipe's bytes are
        gone once read)."""
        if read is None:
            inputs, unreadable = read_inputs(paths, self.max_bytes)
            read = [(image, unreadable.get(i)) for i, image in enumerate(inputs)]
        readable = [i for i, (image, why) in enumerate(read)
                    if why is None and image.error is None]
        out: list[list[Row] | None] = [
            [Row.error(p, why, UNREADABLE)] if why is not None
            else [Row.error(p, str(image.error), image.error.code)] if image.error
            else None
            for p, (image, why) in zip(paths, read, strict=True)]
        if not readable:
            return out  # type: ignore[return-value]
        response = self._post([read[i][0] for i in readable])
        status, body = response.status_code, _error_body(response)
        if body.get("code") == "too_many_files" and len(paths) > 1:
            # --batch-size over the service's EMOTION_MAX_IMAGES_PER_REQUEST: halves, until
            # they fit (stopping the run here would leave the user to guess the limit)
            middle = len(paths) // 2
            return (self._classify(paths[:middle], read[:middle])
                    + self._classify(paths[middle:], read[middle:]))
        if status == 200:
            try:
                sent = [str(k) for k in range(len(readable))]
                grouped: dict[str, list[dict]] = {}
                for prediction in response.json()["predictions"]:
                    if prediction["filename"] not in sent:  # an answer for what was not sent
                        raise ValueError
                    grouped.setdefault(prediction["filename"], []).append(prediction)
                for k, i in enumerate(readable):
                    out[i] = [_row_from_json(paths[i], p) for p in grouped[sent[k]]]
            except (ValueError, KeyError, TypeError, IndexError, AttributeError,
                    RecursionError):
                raise RemoteError(f"{self.shown}/predict answered 200 but not with "
                                  f"predictions: {response.text[:120]!r}") from None
        elif status == 413 or body.get("code") in IMAGE_ERROR_CODES:
            # one image spoilt the request (too large for the service or a proxy before
            # it, or not an image): find out which, alone
            if len(readable) > 1:
                for i in readable:
                    out[i] = self._classify([paths[i]], [read[i]])[0]
            else:
                out[readable[0]] = [Row.error(
                    paths[readable[0]], body.get("detail") or f"refused with {status}",
                    body.get("code") or TooManyBytesError.code)]
        else:  # the service refused the run itself (401, 404, 415, 422, 5xx...): stop
            raise RemoteError(f"{self.shown}/predict answered {status}: "
                              f"{body.get('detail') or response.text[:200]!r}"
                              + (f"; still {WAITED_OUT[status]} after {self.wait:g} s "
                                 "(--wait)" if _waited_out(response) else "")
                              + _what_to_change(response, f"{self.url}/predict"))
        return out  # type: ignore[return-value]

    def run(self, paths: Sequence[str]) -> Iterator[list[list[Row]]]:
        pool = _DaemonThreads(self.concurrency)
        try:
            yield from _bounded(lambda chunk: pool.submit(self._classify, chunk),
                                batches(paths, self.batch_size), 2 * self.concurrency)
        finally:  # also when the run stops early (an error, Ctrl-C): queued batches are
            # dropped, not each sent with its retries, and the process need not wait
            pool.shutdown()
            self.client.close()


def _environment_proxy(url) -> str | None:
    """The proxy HTTP_PROXY, HTTPS_PROXY or ALL_PROXY names for ``url``, unless NO_PROXY
    leaves it out (httpx reads the same variables)."""
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass_environment(url.host, proxies):
        return None
    return proxies.get(url.scheme) or proxies.get("all")


def _waited_out(response) -> bool:
    """Busy, rate-limited or timing out the upload: transient, worth waiting out."""
    return (response.status_code in WAITED_OUT
            and _error_body(response).get("code") not in REFUSED_AT_START_UP)


def _retry_after(header: str | None, otherwise: float) -> float:
    """Seconds a ``Retry-After`` asks for (seconds or an HTTP date; RFC 9110 10.2.3), at
    most 30; ``otherwise`` where there is none, it cannot be read or it asks for none (a
    proxy answering 0 every time would be asked again at once, for all of ``--wait``)."""
    seconds = 0.0
    header = (header or "").strip()
    if header.isascii() and header.isdigit():  # "\xb2" (latin-1 "²") is a digit to isdigit
        seconds = float(header)
    elif header:
        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError, OverflowError):
            return otherwise
        if when.tzinfo is None:  # an HTTP date is GMT; a -0000 zone is read as naive
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(seconds, 30.0) if seconds > 0 else otherwise


def _error_body(response) -> dict:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {}
    except (ValueError, RecursionError):
        return {}


def _what_to_change(response, requested: str) -> str:
    """For a redirect or a refused login: what to give instead (redirects are not followed,
    so the images never go where --url did not say)."""
    import httpx

    if 300 <= response.status_code < 400 and "location" in response.headers:
        asked = httpx.URL(requested)
        try:
            where = _shown(asked.join(response.headers["location"]))  # a relative one too
        except httpx.InvalidURL:
            return "; a redirect, not followed, to a place that is not a URL"
        endpoint = "/" + asked.path.rpartition("/")[2]  # /readyz or /predict
        advice = (f"give {where.removesuffix(endpoint)} as --url" if where.endswith(endpoint)
                  else "--url may need to name it")
        return f"; a redirect to {where}, not followed: {advice}"
    if response.status_code in (401, 403):
        return "; credentials go in --url as http://user:password@host (sent as Basic auth)"
    return ""


def _row_from_json(path: str, prediction: dict) -> Row:
    """A prediction as a row; ValueError for one that is not (a label not in the class list,
    probabilities that are not one per class in [0, 1] summing to 1)."""
    if prediction.get("error"):
        if not isinstance(prediction["error"], str) or not isinstance(prediction["code"], str):
            raise ValueError
        return Row.error(path, prediction["error"], prediction["code"])
    probabilities = [prediction["probabilities"][c] for c in CLASS_NAMES]
    if prediction["label"] not in CLASS_NAMES or not all(
            type(p) in (int, float) and 0 <= p <= 1 for p in probabilities) \
            or abs(sum(probabilities) - 1) > 1e-3:
        raise ValueError
    face = prediction.get("face")
    box = (dict.fromkeys(BOX_COLUMNS) if face is None else
           dict(zip(BOX_COLUMNS, (face["x"], face["y"], face["width"], face["height"]),
                    strict=True)))
    found = prediction.get("faces_found")
    return Row({"path": path, **box, "label": prediction["label"],
                **dict(zip(CLASS_NAMES, probabilities, strict=True)),
                "error": None, "code": None}, found if isinstance(found, int) else None)


def default_workers() -> int:
    from service.settings import container_cpus

    return container_cpus()  # at least 1
