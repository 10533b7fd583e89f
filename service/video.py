"""Classifying a video's faces over time (the ``video`` extra: PyAV, whose wheels carry
FFmpeg, and matplotlib for the plot).

Frames are sampled at a fixed rate by their timestamps, each goes through the same grayscale
step as an uploaded image, and all the faces of a batch of frames are one model call.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import math
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from service.batch import Row, rows_of
from service.classes import CLASS_NAMES
from service.inference import FacesMode, Predictor
from service.preprocessing import DecodedImage, decoded_from_image

VIDEO_COLUMNS = ("path", "time_s", "frame")


def _av():
    try:
        import av
    except ImportError:
        raise SystemExit("video needs the `video` extra: pip install "
                         "'emotion-detection[video]'") from None
    return av


class VideoError(ValueError):
    """A file PyAV opens whose pictures cannot all be read, or placed in time."""


class NoVideoStreamError(VideoError):
    """A file PyAV opens that has no picture: audio alone, say."""


class DamagedVideoError(VideoError):
    """Packets the decoder refused (bytes overwritten on a disk or in a transfer): skipped,
    as ffmpeg does, and counted after the last frame."""


class TruncatedVideoError(VideoError):
    """The frames stop well before the end the file's header declares for them: a cut
    download or copy. FFmpeg ends such a stream quietly rather than raise."""


# Shorter than this before the declared end is a normal last frame, not a cut file.
TRUNCATION_SLACK_SECONDS = 0.5


def upright(frame, rotation: float | None = None) -> Image.Image:
    """The frame as it is shown: phones store portrait video sideways and put the turn in
    the stream's display matrix, which PyAV reads as ``rotation`` (degrees counterclockwise,
    as PIL's rotate counts; ``rotation`` where the frame lacks it). Sideways, the faces of a
    portrait video were not found."""
    # to_image is RGB alone: a transparent video (PNG or QuickTime Animation) is flattened
    # onto white as an uploaded image is, not shown by the colours under its transparency
    # (a palette's transparency is in its colours: PNG's tRNS)
    image = (Image.fromarray(frame.to_ndarray(format="rgba"), "RGBA")
             if frame.format.has_palette or any(c.is_alpha for c in frame.format.components)
             else frame.to_image())
    turns = round(((frame.rotation if rotation is None else rotation) or 0) / 90) % 4
    return image.transpose(_TURNS[turns]) if turns else image


_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
          3: Image.Transpose.ROTATE_270}


def sampled_frames(path: Path, fps: float) -> Iterator[tuple[float, int, DecodedImage]]:
    """(time in seconds, frame number, the frame in grayscale) at ``fps`` frames a second:
    the first frame at or after each multiple of 1/fps. Raises :class:`VideoError` after the
    last frame when the frames stopped short of their declared end."""
    av = _av()
    # absolute: FFmpeg takes a name's text before a colon for a protocol (a time in a file
    # name, "12:30.mp4", failed; "file:a.mp4" read a.mp4)
    with av.open(os.path.abspath(path)) as container:
        # an audio file's cover art is a one-picture "video" stream: not a video
        pictures = [s for s in container.streams.video
                    if not s.disposition & av.stream.Disposition.attached_pic]
        if not pictures:
            others = (f"its {len(container.streams)} streams are sound, data or a cover "
                      "picture" if container.streams else "nor any other")
            raise NoVideoStreamError(f"{path}: the file holds no video stream ({others})")
        stream = pictures[0]
        # not frame threads: they tell of a damaged packet some packets later, or (the last
        # ones) not at all (a 4K HEVC clip decoded up to 1.4x faster with them, within noise)
        stream.thread_type = "SLICE"
        # A raw H.264/H.265 stream (camera and CCTV exports) has no timestamps: its frames
        # are timed by their number and the rate the codec declares.
        rate = stream.guessed_rate or stream.average_rate
        next_time, last_time, last_end, run_start, run_latest = 0.0, None, 0.0, None, None
        # how far back a decoder's order may step without a new start: B-frames, in an AVI's
        # H.264, come with their times in decode order (16, x264's most, frames)
        reorder = 16 / float(rate) if rate else 0.5
        # A clock coarser than exact rounds each frame's time to its tick: Matroska's and
        # WebM's milliseconds put frame 1 at 30 fps at 0.033 s, before its slot at 1/30, and
        # it was passed over (40 rows of 60 at --fps 30). A time within half a tick of the
        # frame grid is taken as its place on the grid, as an exact clock would give it; the
        # grid is the average rate (guessed_rate can be the clock's: 120 for 25 fps in MP4).
        grid = float(stream.average_rate or rate or 0)
        half_tick = float(stream.time_base) / 2 if stream.time_base else 0.0

        def on_grid(time: float) -> float:
            placed = round(time * grid) / grid if grid else time
            return placed if abs(placed - time) <= half_tick + 1e-9 else time
        cut_packet, refused, cut_refused, packets, packets_end = False, 0, 0, 0, 0.0
        shown_frames, times = 0, _PacketTimes()
        # an AVI's times are in decode order (above): its frames are numbered as shown
        ranked = container.format.name != "avi"
        decoder = _decoder(av, stream)
        # libvpx's frames lack the stream's display matrix: its turn is read from the
        # stream's own decoder, at its first frame
        rotation = None if decoder is stream.codec_context else 0.0
        turn_tries = 0 if decoder is stream.codec_context else 1000

        def frames():  # (number, frame) of the stream, noting a packet the file ends inside of
            nonlocal cut_packet, refused, cut_refused, packets, packets_end, shown_frames
            nonlocal rotation, turn_tries
            # After a refused packet a frame's number is its time's rank among the packets':
            # the frames lost with it (H.264 waits, silently, for its next keyframe; B-frames
            # and AV1 hold frames back) are counted where they belong. Before, the count of
            # frames shown.
            number = 0
            for packet in container.demux(stream):
                cut_packet |= packet.is_corrupt
                packets += bool(packet.size)  # not the empty one that ends the stream
                # not the lead-in an edit list (a trim) has the decoder drop
                if packet.size and packet.pts is not None and not packet.is_discard:
                    times.add(packet.pts)
                    if packet.time_base:
                        packets_end = max(packets_end, float(
                            (packet.pts + (packet.duration or 0)) * packet.time_base))
                if turn_tries and packet.size:
                    turn_tries -= 1
                    with contextlib.suppress(av.error.FFmpegError):
                        for shown in stream.codec_context.decode(packet):
                            rotation, turn_tries = shown.rotation or 0.0, 0
                try:
                    decoded = decoder.decode(packet)
                except av.error.InvalidDataError:  # one bad packet ended the whole run
                    refused += 1
                    cut_refused += packet.is_corrupt  # the one a cut file ends inside of
                    number += not ranked  # numbered as shown: its frame is not, but counts
                    continue
                for frame in decoded:
                    shown_frames += 1
                    rank = None if frame.pts is None else times.rank(frame.pts)
                    if rank is not None and refused > cut_refused and ranked:
                        number = rank
                    yield number, frame
                    number += 1

        for number, frame in frames():
            if frame.time is not None:
                time = on_grid(frame.time)
            elif rate:
                time = number / float(rate)
            else:
                raise VideoError(f"{path}: its frames carry no timestamps and the stream no "
                                 "frame rate, so they cannot be placed in time")
            # a slideshow's last frame may be shown for seconds: its own duration, not 1/rate
            shown = (float(frame.duration * frame.time_base) if frame.duration
                     and frame.time_base else 1 / float(rate) if rate else 0.0)
            # back to where the run began or before, or further back than a decoder reorders:
            # the timestamps start again (clips joined), and so does sampling. Not any step
            # back (an AVI's B-frames), nor only one of 1/fps (it missed short clips).
            if run_start is None:
                run_start = run_latest = time
            elif time < last_time and (time <= run_start + 1e-3 or time < run_latest - reorder):
                run_start = run_latest = next_time = time
            run_latest = max(run_latest, time)
            # the latest end seen: a joined file's last clip may end before its first did
            last_time, last_end = time, max(last_end, time + shown)
            if time + 1e-6 >= next_time:
                yield round(time, 4), number, decoded_from_image(upright(frame, rotation))
                # the next multiple of 1/fps in one step: a jump in the timestamps cost a
                # turn per multiple skipped (hours of them for one wild timestamp)
                next_time = (math.floor((time + 1e-6) * fps) + 1) / fps
        end, of_the_file = declared_end(container, stream, av.time_base)
        # The file's own duration may count a last frame held longer than its packets say
        # (a slideshow remuxed to FLV), or sound that runs on: trusted only where a packet
        # was cut off too. Not only where the video is the one stream: an FLV with sound,
        # cut, gave its first rows and exit 0 (a review).
        if of_the_file and not cut_packet:
            end = None
        damaged = refused > cut_refused
        # every frame is out once the decoder is flushed: those missing were lost with the
        # damage (a healthy VP8 has invisible packets too, so only where damage was seen)
        lost = max(refused - cut_refused, times.count() - cut_refused - shown_frames)
        damage = (f"{lost} of its {packets} packets could not be decoded (damaged, or needing "
                  "a damaged one)")
        also = f"; before that, {damage}" if damaged else ""
        if damaged:  # packets lost at the end are the file's time, not a cut
            last_end = max(last_end, packets_end)
        if end is not None and end - last_end > TRUNCATION_SLACK_SECONDS:
            stop = "before its first frame" if last_time is None else f"at {last_time:.1f} s"
            raise TruncatedVideoError(f"{path}: the frames stop {stop} of the {end:.1f} s "
                                      f"its header declares: the file is cut short{also}")
        # AVI's header counts its chunks, a tick of its time base each (gaps filled with empty
        # ones), so count x time base is its end; its duration is FFmpeg's estimate from what
        # is left of a cut file. Not MP4's count: an edit list (a trim without re-encoding)
        # hides frames it still counts.
        if container.format.name == "avi" and stream.frames and stream.time_base:
            counted_end = float(stream.frames * stream.time_base)
            if counted_end - last_end > TRUNCATION_SLACK_SECONDS:
                stop = ("before its first frame" if last_time is None
                        else f"at {last_time:.1f} s")
                raise TruncatedVideoError(f"{path}: the frames stop {stop} of the "
                                          f"{counted_end:.1f} s its header's count declares: "
                                          f"the file is cut short{also}")
        if damaged:
            raise DamagedVideoError(f"{path}: {damage}: skipped, with their frames")


class _PacketTimes:
    """A stream's packet times, passed in order by the frames shown. A time counts once: an
    invisible packet (VP8's alt-ref) may share its frame's."""

    def __init__(self):
        self.waiting: list[int] = []  # a heap: packets are demuxed in decode order
        self.passed: list[int] = []  # the distinct times passed, in order

    def add(self, pts: int) -> None:
        heapq.heappush(self.waiting, pts)

    def rank(self, pts: int) -> int | None:
        """``pts``'s rank among the packet times, which is its frame's number; None where
        no packet has it. The times up to it are passed (a frame the decoder gives late, as
        after a damaged keyframe, is found among them)."""
        while self.waiting and self.waiting[0] <= pts:
            time = heapq.heappop(self.waiting)
            if not self.passed or time != self.passed[-1]:
                self.passed.append(time)
        at = bisect.bisect_left(self.passed, pts)
        return at if at < len(self.passed) and self.passed[at] == pts else None

    def count(self) -> int:
        """The distinct packet times in all."""
        return len(self.passed) + len(set(self.waiting) - set(self.passed[-1:]))


# FFmpeg's own VP8/VP9 decoders drop the alpha a transparent WebM carries beside its
# picture (alpha_mode 1); libvpx's keep it
_ALPHA_DECODERS = {"vp8": "libvpx", "vp9": "libvpx-vp9"}


def _decoder(av, stream):
    """The codec context to decode ``stream`` with: its own, or libvpx's for a WebM with
    transparency."""
    name = _ALPHA_DECODERS.get(stream.codec_context.name)
    if name and stream.metadata.get("alpha_mode") == "1":
        try:
            return av.CodecContext.create(name, "r")
        except (av.error.FFmpegError, ValueError):  # a PyAV built without libvpx
            pass
    return stream.codec_context


def declared_end(container, stream, container_time_base: int) -> tuple[float | None, bool]:
    """When the file's header says the video stream ends, in seconds (None where unsaid), and
    whether that is the whole file's duration rather than the stream's own (FLV declares no
    other), which the caller trusts only where a packet was cut off: it counts the sound too,
    which may run on. Without its start, which some formats count in it and some do not (a
    late cut is missed rather than a whole file called cut)."""
    if stream.duration and stream.time_base:
        return float((stream.start_time or 0) * stream.time_base
                     + stream.duration * stream.time_base), False
    tag = stream.metadata.get("DURATION")  # Matroska/WebM: the track's end, hh:mm:ss.fraction
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds), False
        except ValueError:
            return None, False
    if container.duration:
        return container.duration / container_time_base, True
    return None, False


def classify_video(predictor: Predictor, path: Path, model: str, mode: FacesMode,
                   fps: float, batch_size: int = 8) -> Iterator[list[Row]]:
    """Rows of each sampled frame, one per face (one per frame when no face is used)."""
    pending: list[tuple[float, int, DecodedImage]] = []

    def flush() -> list[Row]:
        results = predictor.predict_decoded(model, [str(path)] * len(pending),
                                            [d for _, _, d in pending], mode)
        rows = []
        for (time_s, number, _), result in zip(pending, results, strict=True):
            rows += rows_of(str(path), result, time_s=time_s, frame=number)
        pending.clear()
        return rows

    samples = sampled_frames(path, fps)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception:  # a decoding error or a cut file: the frames before it still count
            if pending:
                yield flush()
            raise
        pending.append(sample)
        if len(pending) >= batch_size:
            yield flush()
    if pending:
        yield flush()


def plot_formats() -> list[str]:
    """The file extensions ``plot_largest_face`` can write, as matplotlib names them."""
    try:  # PyAV installed alone, without the extra: a traceback before
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise SystemExit("--plot needs the `video` extra (matplotlib): pip install "
                         "'emotion-detection[video]'") from None

    # pgf is LaTeX source that needs a TeX program to write: it failed after the whole video
    return sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})


def largest_face_rows(rows: list[Row]) -> list[Row]:
    """The row of each frame's largest face (the whole frame's where none was found), in
    frame order; frames without a classified row are left out."""
    largest: dict[int, Row] = {}
    for row in rows:
        v = row.values
        if v["label"] is None:
            continue
        area = (v["face_width"] or 0) * (v["face_height"] or 0)
        best = largest.get(v["frame"])
        if best is None or area > (best.values["face_width"] or 0) * (
                best.values["face_height"] or 0):
            largest[v["frame"]] = row
    return [largest[k] for k in sorted(largest)]


def plot_largest_face(rows: list[Row], out: Path, title: str) -> None:
    """The eight probabilities over time for the largest face of each frame (the whole frame
    where none was found), one line per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = largest_face_rows(rows)
    times = [r.values["time_s"] for r in ordered]
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in CLASS_NAMES:
        ax.plot(times, [r.values[name] for r in ordered], label=name, lw=1.4)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
