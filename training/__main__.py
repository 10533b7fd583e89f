"""``python -m training <command>``: the offline side of the project."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from service.arguments import count, non_negative
from training.settings import DATASET_HINT, FETCH_DESTINATIONS, get_training_settings

DATASETS = tuple(FETCH_DESTINATIONS)
ENV_OF_DATASET = {"facial_expressions": "EMOTION_DATASET_DIR", "fer2013": "EMOTION_FER2013_DIR"}
# where the datasets are read from, for the help of the commands that read them
FOLDERS = ("The datasets' folders: EMOTION_DATASET_DIR (default: ../shared/datasets/"
           "facial_expressions beside the checkout, else where `fetch` puts it) and "
           "EMOTION_FER2013_DIR (default: FER-2013's full release where `fetch fer2013` puts "
           "it, else ../shared/datasets/fer2013).")


def cmd_fetch(args: argparse.Namespace) -> None:
    settings = get_training_settings()
    from training.fetch import local_or_url

    # absolute and through links: the printed setting works from any folder, and a link is
    # not the folder replaced
    try:
        dest = (args.dest or FETCH_DESTINATIONS[args.dataset]).resolve()
    except RuntimeError as exc:  # a link loop: Python 3.11 raises this, not an OSError
        raise SystemExit(f"--dest: {exc}") from None
    source = local_or_url(args.source) if args.source else None
    started = time.perf_counter()
    if args.dataset == "fer2013":
        from training.fer2013 import FER_REPOSITORY, fetch_fer2013

        fetch_fer2013(dest, settings.fer2013_checksums, source or FER_REPOSITORY)
    else:
        from training.fetch import fetch_dataset
        from training.settings import UPSTREAM_REPOSITORY

        fetch_dataset(dest, settings.checksums_file, source or UPSTREAM_REPOSITORY)
    from service.settings import read_settings
    from training.settings import TrainingSettings

    # Read again: the defaults look at what exists, and the shared copy of the study's
    # dataset wins over a fetched one.
    now = read_settings(TrainingSettings)
    reads = now.fer2013_dir if args.dataset == "fer2013" else now.dataset_dir
    print(f"fetched and verified {args.dataset} in {dest} ({time.perf_counter() - started:.0f} "
          f"s); " + ("the project reads it from there: nothing to set"
                     if Path(reads).resolve() == Path(dest).resolve() else
                     f"{ENV_OF_DATASET[args.dataset]}={dest} points the project at it (it "
                     f"reads {reads} now)"))


def cmd_verify(args: argparse.Namespace) -> None:
    settings = get_training_settings()
    from training.fetch import verify_dataset

    if args.dataset == "fer2013":  # the shared copy holds PublicTest only
        from collections import Counter

        from training.fer2013 import FER_FETCH_HINT, fer_table, partial_usages

        restore = FER_FETCH_HINT
        count = verify_dataset(settings.fer2013_dir, settings.fer2013_checksums,
                               require_all=False, hint=restore)
        where = f"{settings.fer2013_dir}: "
        if not count:
            raise SystemExit(where + f"no file named in {settings.fer2013_checksums.name}; "
                             + restore)
        table = fer_table(settings.fer2013_dir, settings.fer2013_checksums)
        partial = partial_usages(table, settings.fer2013_checksums)
        if partial:
            raise SystemExit(where + "; ".join(partial) + f"; {restore}")
        here = Counter(table["usage"])
        print(where + f"{count} files match {settings.fer2013_checksums.name} ("
              + ", ".join(f"{usage} {n}" for usage, n in sorted(here.items())) + ")")
        return

    count = verify_dataset(settings.dataset_dir, settings.checksums_file, hint=DATASET_HINT)
    print(f"{settings.dataset_dir}: {count} files match {settings.checksums_file.name}")


def cmd_audit(args: argparse.Namespace) -> None:
    from training.audit import run_audit
    from training.audit_fer2013 import run_fer_audit
    from training.fer2013 import FER_FETCH_HINT, fer_table
    from training.fetch import verify_dataset

    settings = get_training_settings()
    started = time.perf_counter()
    # Both datasets are checked before data/ is rewritten: the splits are the contract.
    verify_dataset(settings.dataset_dir, settings.checksums_file, hint=DATASET_HINT)
    if not len(fer_table(settings.fer2013_dir, settings.fer2013_checksums)):
        raise SystemExit(f"no image in {settings.fer2013_dir} is named in "
                         f"{settings.fer2013_checksums.name}: point EMOTION_FER2013_DIR at "
                         "FER-2013 (`python -m training fetch fer2013` fetches it)")
    # the FER-2013 images that are here, byte for byte: a damaged one stopped the audit
    # after data/ was rewritten, with Pillow's "Truncated File Read" and no file named
    verify_dataset(settings.fer2013_dir, settings.fer2013_checksums, require_all=False,
                   hint=FER_FETCH_HINT)
    report = run_audit(settings)
    print(f"audit: {report['legend_rows']} rows, {report['kept_images']} kept images, "
          f"{report['identities']} identity groups, class counts match the study: "
          f"{report['class_counts_match_study']} ({time.perf_counter() - started:.1f} s); "
          f"wrote audit.md, audit.json, clean.csv and splits/ in {settings.data_dir}")
    started = time.perf_counter()
    fer = run_fer_audit(settings)
    exact = fer["exact_duplicates"]
    print(f"FER-2013 audit: {sum(sum(c.values()) for c in fer['present_counts'].values())} "
          f"images, {exact['groups']} groups of exact duplicates, "
          f"{fer['near_duplicates_within']['pairs']} near-duplicate pairs within, "
          f"{fer['near_duplicates_against_facial_expressions']['pairs']} against this dataset "
          f"({time.perf_counter() - started:.1f} s); "
          + (f"wrote fer2013_audit.md and .json in {settings.data_dir}" if fer["complete"] else
             "not written: only the full release is audited (`python -m training fetch "
             "fer2013`)"))


def cmd_cache(args: argparse.Namespace) -> None:
    from training.cache import build_cache, cache_key, load_decoded_images
    from training.dataset import read_clean_table
    from training.fer2013 import fer_table

    settings = get_training_settings()
    # each table's images, the file naming them (for its errors) and how to find them
    tables = {"facial_expressions": (read_clean_table(settings.clean_table), settings.images_dir,
                                     settings.clean_table.name, DATASET_HINT)}
    fer = fer_table(settings.fer2013_dir, settings.fer2013_checksums)
    if len(fer):
        tables["fer2013"] = (fer, settings.fer2013_dir, settings.fer2013_checksums.name, "")
    else:  # said, not skipped quietly: training would stop on it later
        print(f"fer2013: no image in {settings.fer2013_dir} (EMOTION_FER2013_DIR) is named "
              f"in {settings.fer2013_checksums.name}: not cached", file=sys.stderr)
    for name, (table, images_dir, listed_in, hint) in tables.items():
        folder = settings.cache_dir / cache_key(table)
        if args.rebuild or not folder.exists():
            started = time.perf_counter()
            build_cache(table, images_dir, settings.cache_dir, replace=args.rebuild,
                        listed_in=listed_in, hint=hint)
            print(f"{name}: built {folder} in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        decoded = load_decoded_images(table, images_dir, settings.cache_dir)
        checksum = int(decoded.pixels.sum(dtype="uint64"))  # touches every byte
        print(f"{name}: loaded {decoded.pixels.shape} from {folder} and read every pixel in "
              f"{time.perf_counter() - started:.1f} s (pixel sum {checksum})")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from training.reproduce import reproduce

    reproduce(get_training_settings(), args.only, args.profile, args.device, args.out)


def cmd_levers(args: argparse.Namespace) -> None:
    from training.levers import run_levers

    settings = get_training_settings()
    run_levers(settings, args.only, args.profile, args.device, args.out, args.epochs)
    if args.out is None and args.profile == "full":
        rewrite_levers_report(settings.reports_dir)


def cmd_train(args: argparse.Namespace) -> None:
    from training.recipe import train_shipped

    started = time.perf_counter()
    train_shipped(get_training_settings(), args.profile, tuple(args.seeds), args.device,
                  args.out, args.start_at)
    print(f"train: {time.perf_counter() - started:.0f} s in total")
    if args.out is None and args.profile == "full":
        rewrite_levers_report(get_training_settings().reports_dir)


def rewrite_levers_report(reports_dir: Path) -> None:
    """reports/levers.md, where the records it compares the levers with are all there: into a
    new reports folder, `train --seeds 0` failed after its half hour of training on the
    records of seeds 1 and 2 (a review)."""
    from training.levers import SHIPPED_SEEDS, write_levers_report

    folder = reports_dir / "after_training"
    missing = [f"seed{seed}.json" for seed in SHIPPED_SEEDS
               if not (folder / f"seed{seed}.json").is_file()]
    if missing:
        print(f"{reports_dir / 'levers.md'} not rewritten: it compares the levers with the "
              f"shipped recipe's seeds {list(SHIPPED_SEEDS)}, and {folder} lacks "
              f"{', '.join(missing)} (`python -m training train` writes them)",
              file=sys.stderr)
        return
    print(f"wrote {write_levers_report(reports_dir)}")


def cmd_export(args: argparse.Namespace) -> None:
    from training.export import export_all

    settings = get_training_settings()
    full = args.profile == "full"  # a smoke export never replaces the shipped models
    out = args.out or (settings.models_dir if full else settings.smoke_dir("export"))
    manifest = export_all(settings, args.checkpoints or (
        settings.checkpoints_dir if full else settings.smoke_dir("train")), out, args.profile)
    for name, entry in manifest.models.items():
        fer = entry.metrics["fer2013"]
        print(f"{name}: {entry.file} {entry.bytes / 1e6:.1f} MB, macro-F1 identity test "
              f"{entry.metrics['identity']['test'].macro_f1:.3f}, FER-2013 "
              + ", ".join(f"{s} {m.macro_f1:.3f}" for s, m in fer.items()))
    if manifest.face_detector is not None:
        from service.faces import FACE_CROP_FILE, load_face_crop
        from training.model_card import stale

        if stale(load_face_crop(out).evaluation, manifest.models["cnn"].sha256):
            print(f"warning: {out / FACE_CROP_FILE}, kept from before, measured faces=auto "
                  "with another cnn: run `python -m training face-geometry"
                  + ("" if out == settings.models_dir else f" --out {shlex.quote(str(out))}")
                  + "` to measure this one",
                  file=sys.stderr)


def cmd_face_geometry(args: argparse.Namespace) -> None:
    from service.manifest import load_manifest
    from training.face_geometry import build_face_crop, face_crop_staging, install_face_crop

    if args.limit is not None and args.out is None:
        raise SystemExit("--limit needs --out, a "
                         "copy of the models folder (its CNN and manifest.json): a sample's "
                         "framing must not replace the shipped models' own")
    out = args.out or get_training_settings().models_dir
    load_manifest(out)  # a folder without one (or none) in one line, before any staging in it
    with face_crop_staging(out) as staging:
        spec = build_face_crop(get_training_settings(), out, args.limit, staging=staging)
        path = install_face_crop(spec, out, staging)
    g, evaluation = spec.geometry, spec.evaluation
    print(f"face geometry: {spec.learned_from['chosen']} framing, center ({g.center_x:.3f}, "
          f"{g.center_y:.3f}), size ({g.width:.3f}, {g.height:.3f}) of the crop")
    for mode, score in evaluation["all_scores"].items():
        print(f"{mode}: " + ", ".join(f"{name} val {score[name]['macro_f1']:.4f}"
                                      for name in evaluation["sets"])
              + f", criterion {score['criterion']:.4f}")
    print(f"default faces={evaluation['default']} ({evaluation['default_reason']}); wrote "
          f"{path} in {spec.learned_from['seconds']:.0f} s")


def cmd_examples(args: argparse.Namespace) -> None:
    from training.examples import compose
    from training.settings import REPO_ROOT

    out = args.out or REPO_ROOT / "examples"
    for photo, placed in compose(get_training_settings(), out).items():
        print(f"{out / photo}: " + ", ".join(f"{p.label} ({p.image})" for p in placed))


def run_options(command: argparse.ArgumentParser, out_help: str, smoke_epochs: str = "one "
                "epoch") -> None:
    """--profile, --device and --out, as every command that trains takes them."""
    command.add_argument("--profile", choices=("full", "smoke"), default="full",
                         help=f"full, or smoke: a small stratified subset, {smoke_epochs} "
                              "(default: %(default)s)")
    command.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                         help="auto (a GPU where present, else the CPU), cpu or cuda "
                              "(default: %(default)s)")
    command.add_argument("--out", type=Path, default=None, help=out_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser(
        "fetch", help="clone a dataset's repository at its pinned commit and verify it against "
        "the checksum list in data/")
    fetch.add_argument("dataset", nargs="?", choices=DATASETS, default="facial_expressions",
                       help="facial_expressions (the study's) or fer2013 (only its 35,887 "
                       "original images are kept) (default: %(default)s)")
    fetch.add_argument("--dest", type=Path, default=None,
                       help="where to put it (default: "
                       + ", ".join(f"{k}: {v}" for k, v in FETCH_DESTINATIONS.items()) + ")")
    fetch.add_argument("--source", default=None, metavar="URL_OR_PATH",
                       help="clone from here instead of the dataset's public repository (a "
                       "mirror or a local clone holding the pinned commit) (default: the "
                       "public repository)")
    fetch.set_defaults(func=cmd_fetch)

    verify = commands.add_parser("verify", help="check a dataset folder against its checksum "
                                 "list (fer2013: the files present)", description="Check a "
                                 "dataset folder against its checksum list in EMOTION_DATA_DIR "
                                 "(default: the repository's data/). " + FOLDERS)
    verify.add_argument("dataset", nargs="?", choices=DATASETS, default="facial_expressions",
                        help="the dataset whose folder (EMOTION_DATASET_DIR or "
                        "EMOTION_FER2013_DIR) to check (default: %(default)s)")
    verify.set_defaults(func=cmd_verify)
    audit = commands.add_parser(
        "audit", help="audit the dataset; write data/audit.*, data/clean.csv and data/splits/",
        description="Audit the study's dataset (EMOTION_DATASET_DIR) and FER-2013 "
        "(EMOTION_FER2013_DIR; its section only from the full release), and write audit.*, "
        "clean.csv and splits/ in EMOTION_DATA_DIR (default: the repository's data/). "
        + FOLDERS)
    audit.set_defaults(func=cmd_audit)
    cache = commands.add_parser("cache", help="build (if needed) and load the decode cache, "
                                              "printing how long each takes",
                                description="Build (if needed) and load the decode cache of "
                                "this dataset and of FER-2013, in EMOTION_CACHE_DIR (default: "
                                "~/.cache/emotion-detection). " + FOLDERS)
    cache.add_argument("--rebuild", action="store_true", help="build even if it exists")
    cache.set_defaults(func=cmd_cache)

    rep = commands.add_parser("reproduce", help="run the study's experiments on both splits "
                                                "of its dataset only and write reports/")
    rep.add_argument("--only", action="append", metavar="NAME",
                     help="run only this experiment (repeatable; default: all)")
    run_options(rep, "reports folder (default: EMOTION_REPORTS_DIR, the repository's reports/; "
                "with --profile smoke, reproduce-smoke/ in EMOTION_CHECKPOINTS_DIR)")
    rep.set_defaults(func=cmd_reproduce)

    levers = commands.add_parser("levers", help="the joint recipe's levers, one at a time, "
                                 "judged on the combined validation -> reports/levers/")
    levers.add_argument("--only", action="append", metavar="NAME",
                        help="run only this lever (repeatable; default: all)")
    levers.add_argument("--epochs", type=count, default=None,
                        help="override every lever's schedule (default: each lever's own; "
                        "1 with --profile smoke)")
    run_options(levers, "results folder (default: levers/ in EMOTION_REPORTS_DIR; with "
                "--profile smoke, levers-smoke/ in EMOTION_CHECKPOINTS_DIR)",
                smoke_epochs="one epoch unless --epochs says")
    levers.set_defaults(func=cmd_levers)

    train = commands.add_parser("train", help="train the shipped CNN recipe on both datasets "
                                "(identity train + FER-2013 Training); per seed, the first "
                                "fit's, the refinement's and the served checkpoint")
    train.add_argument("--seeds", type=non_negative, nargs="+", default=[0, 1, 2],
                       help="seeds (default: %(default)s)")
    train.add_argument("--from", dest="start_at", choices=("fit", "refine", "finish"),
                       default="fit", help="the stage to start at, reusing the checkpoints "
                       "of those before it: fit (fitted-seed<N>.pt), refine "
                       "(refined-seed<N>.pt), finish (weight interpolation, decision rule, "
                       "test scores) (default: %(default)s)")
    run_options(train, "checkpoint folder (default: EMOTION_CHECKPOINTS_DIR, the repository's "
                "checkpoints/; with --profile smoke, train-smoke/ in it)")
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="write models/: the ONNX CNN, the kNN "
                                                "pipeline, manifest.json and README.md")
    export.add_argument("--checkpoints", type=Path, default=None,
                        help="checkpoint folder (default: EMOTION_CHECKPOINTS_DIR; with "
                        "--profile smoke, train-smoke/ in it)")
    export.add_argument("--out", type=Path, default=None,
                        help="default: EMOTION_MODELS_DIR, the shipped models/; with --profile "
                        "smoke, export-smoke/ in EMOTION_CHECKPOINTS_DIR")
    export.add_argument("--profile", choices=("full", "smoke"), default="full",
                        help="must match the checkpoints' profile (default: %(default)s)")
    export.set_defaults(func=cmd_export)
    geometry = commands.add_parser("face-geometry", help="learn where faces sit in both train "
                                   "sets, measure faces=auto against none on both validation "
                                   "sets, write models/face_crop.json")
    geometry.add_argument("--out", type=Path, default=None,
                          help="models folder holding the CNN and its manifest.json "
                          "(default: EMOTION_MODELS_DIR, the shipped models/)")
    geometry.add_argument("--limit", type=count, default=None,
                          help="a quick look: a sample of N images of each subset, the "
                          "validation images evenly spaced, the train images every "
                          "(count // N)th from the first, as the shipped framing was learnt "
                          "(default: all validation images, and of the train images all of "
                          "this dataset's and 4,000 of FER-2013's); needs --out, so that a "
                          "sample's framing never replaces the shipped one")
    geometry.set_defaults(func=cmd_face_geometry)
    examples = commands.add_parser("examples", help="compose the sample photos in examples/ "
                                   "from identity-split test images")
    examples.add_argument("--out", type=Path, default=None,
                          help="default: examples/ in the repository")
    examples.set_defaults(func=cmd_examples)
    return parser


def _not_a_folder(exc: BaseException) -> str | None:
    """For a folder to make that is a file (mkdir's "[Errno 17] File exists", which reads as
    if a folder were in the way), what is wrong."""
    path = getattr(exc, "filename", None)
    if isinstance(exc, FileExistsError) and path and not os.path.isdir(path):
        return f"{path} is a file where a folder should be"
    return None


def _setting_of(exc: BaseException) -> str:
    """' (EMOTION_X_DIR=...)' for an OSError on a path inside a folder that a variable set in
    the environment names, the one that holds it most closely: the error names only the path,
    which the user may not have typed. Defaults are not named: a path given on the command
    line may lie under one by chance."""
    from service.settings import variable_as_set

    filename = getattr(exc, "filename", None)
    if not isinstance(filename, (str, Path)):
        return ""
    try:
        settings = get_training_settings()
    except ValueError:
        return ""
    path = Path(filename).absolute()
    holding = []
    for name, value in settings:
        variable = variable_as_set(f"EMOTION_{name}")
        if isinstance(value, Path) and variable in os.environ and (
                value.absolute() == path or value.absolute() in path.parents):
            holding.append((len(value.absolute().parts), variable))
    if not holding:
        return ""
    variable = max(holding)[1]
    return f" ({variable}={os.environ[variable]!r})"


def main(argv: list[str] | None = None) -> int:
    import signal
    import subprocess

    from service.manifest import ManifestError
    from service.settings import SettingsError
    from service.signals import stops_taken_as_ctrl_c
    from training.fetch import DataError

    args = build_parser().parse_args(argv)
    try:
        # SIGTERM and SIGHUP stop every command as Ctrl-C does, with its clean-up and its line
        # (fetch and export ended silently on them, cache and fetch fer2013 said so)
        with stops_taken_as_ctrl_c():
            args.func(args)
    except (DataError, OSError, subprocess.CalledProcessError, SettingsError,
            ManifestError) as exc:
        # Data not where a setting says, or not what the repository's lists say, an output folder
        # that cannot be written, a git fetch that failed, a refused setting, or a models
        # folder without a readable manifest: the user's to fix, so one line, not a traceback.
        print(f"python -m training {args.command}: error: {_not_a_folder(exc) or exc}"
              f"{_setting_of(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or a SIGTERM/SIGHUP taken as one: one line
        number = getattr(exc, "number", signal.SIGINT)
        by = "" if number == signal.SIGINT else f" by {signal.Signals(number).name}"
        print(f"python -m training {args.command}: stopped{by}; what it had finished "
              "stays", file=sys.stderr)
        return 128 + number
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # an exit status, not a refusal
            raise
        # a refusal in one line (an unknown lever, a dataset part that is not here): exit 2,
        # as argparse does, so that a script can tell a mistake from a failure (Python's
        # own handling printed it bare and exited 1)
        print(f"python -m training {args.command}: error: {exc.code}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
