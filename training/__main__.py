"""``python -m training <command>``: the offline side of the project."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.settings import FETCHED_DATASET, get_data_settings


def cmd_fetch(args: argparse.Namespace) -> None:
    from training.fetch import fetch_dataset

    dest = fetch_dataset(args.dest)
    print(f"fetched and verified the dataset in {dest}; set EMOTION_DATASET_DIR={dest}")


def cmd_verify(args: argparse.Namespace) -> None:
    from training.fetch import verify_dataset

    settings = get_data_settings()
    count = verify_dataset(settings.dataset_dir)
    print(f"{settings.dataset_dir}: {count} files match data/SHA256SUMS")


def cmd_audit(args: argparse.Namespace) -> None:
    from training.audit import run_audit

    started = time.perf_counter()
    report = run_audit(get_data_settings())
    print(f"audit: {report['legend_rows']} rows, {report['kept_images']} kept images, "
          f"{report['identities']} identity groups, class counts match the study: "
          f"{report['class_counts_match_study']} ({time.perf_counter() - started:.1f} s); "
          "wrote data/audit.md, data/audit.json, data/clean.csv, data/splits/")


def cmd_cache(args: argparse.Namespace) -> None:
    from training.cache import build_cache, cache_key, load_decoded_images
    from training.dataset import read_clean_table
    from training.settings import CLEAN_TABLE

    settings = get_data_settings()
    table = read_clean_table(CLEAN_TABLE)
    folder = settings.cache_dir / cache_key(table)
    if args.rebuild or not folder.exists():
        started = time.perf_counter()
        build_cache(table, settings.images_dir, settings.cache_dir)
        print(f"built {folder} in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    decoded = load_decoded_images(table, settings.images_dir, settings.cache_dir)
    checksum = int(decoded.pixels.sum(dtype="uint64"))  # touches every byte
    print(f"loaded {decoded.pixels.shape} from {folder} and read every pixel in "
          f"{time.perf_counter() - started:.1f} s (pixel sum {checksum})")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from training.reproduce import reproduce

    reproduce(get_data_settings(), args.only, args.profile, args.device, args.out)


def cmd_train(args: argparse.Namespace) -> None:
    from training.ship import CHECKPOINTS_DIR, train_shipped

    started = time.perf_counter()
    train_shipped(get_data_settings(), args.profile, tuple(args.seeds), args.device,
                  args.out or CHECKPOINTS_DIR)
    print(f"train: {time.perf_counter() - started:.0f} s in total")


def cmd_export(args: argparse.Namespace) -> None:
    from training.export import export_all
    from training.settings import MODELS_DIR
    from training.ship import CHECKPOINTS_DIR

    out = args.out or MODELS_DIR
    manifest = export_all(get_data_settings(), args.checkpoints or CHECKPOINTS_DIR, out,
                          args.profile)
    for name, entry in manifest.models.items():
        test = entry.metrics["identity"]["test"]
        print(f"{name}: {entry.file} {entry.bytes / 1e6:.1f} MB, identity test macro-F1 "
              f"{test.macro_f1:.3f}")


def cmd_face_geometry(args: argparse.Namespace) -> None:
    from training.face_geometry import build_face_crop, write_face_crop
    from training.settings import MODELS_DIR

    out = args.out or MODELS_DIR
    spec = build_face_crop(get_data_settings(), out, args.limit)
    path = write_face_crop(spec, out)
    g = spec.geometry
    print(f"face geometry: center ({g.center_x:.3f}, {g.center_y:.3f}), size ({g.width:.3f}, "
          f"{g.height:.3f}) of the crop; faces found in "
          f"{spec.learned_from['share_with_a_face']:.1%} of train crops")
    for subset in ("val", "test"):
        result = spec.evaluation[subset]
        print(f"identity {subset}: macro-F1 none {result['none']['macro_f1']:.4f}, auto "
              f"{result['auto']['macro_f1']:.4f} (a face found in "
              f"{result['share_with_a_face']:.1%})")
    print(f"wrote {path} in {spec.learned_from['seconds']:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch", help="clone the upstream dataset at the pinned commit "
                                              "and verify it against data/SHA256SUMS")
    fetch.add_argument("--dest", type=Path, default=FETCHED_DATASET,
                       help="where to put it (default: %(default)s)")
    fetch.set_defaults(func=cmd_fetch)

    commands.add_parser("verify", help="check EMOTION_DATASET_DIR against data/SHA256SUMS"
                        ).set_defaults(func=cmd_verify)
    commands.add_parser("audit", help="audit the dataset; write data/audit.*, data/clean.csv "
                                      "and data/splits/").set_defaults(func=cmd_audit)
    cache = commands.add_parser("cache", help="build (if needed) and load the decode cache, "
                                              "printing how long each takes")
    cache.add_argument("--rebuild", action="store_true", help="build even if it exists")
    cache.set_defaults(func=cmd_cache)

    rep = commands.add_parser("reproduce", help="run the study's experiments on both splits "
                                                "and write reports/")
    rep.add_argument("--only", action="append", metavar="NAME",
                     help="run only this experiment (repeatable; default: all)")
    rep.add_argument("--profile", choices=("full", "smoke"), default="full",
                     help="full, or smoke: a small stratified subset, one epoch "
                          "(default: %(default)s)")
    rep.add_argument("--device", default="auto",
                     help="auto (a GPU where present, else the CPU), cpu or cuda "
                          "(default: %(default)s)")
    rep.add_argument("--out", type=Path, default=None,
                     help="reports folder (default: reports/ in the repository)")
    rep.set_defaults(func=cmd_reproduce)

    train = commands.add_parser("train", help="train the shipped CNN recipe on the identity "
                                              "split (several seeds) and the random split")
    train.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                       help="seeds for the identity split; the first also trains the random "
                            "split (default: %(default)s)")
    train.add_argument("--profile", choices=("full", "smoke"), default="full",
                       help="smoke: small subset, one epoch (default: %(default)s)")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    train.add_argument("--out", type=Path, default=None,
                       help="checkpoint folder (default: checkpoints/)")
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="write models/: the ONNX CNN, the kNN "
                                                "pipeline, manifest.json and README.md")
    export.add_argument("--checkpoints", type=Path, default=None,
                        help="checkpoint folder (default: checkpoints/)")
    export.add_argument("--out", type=Path, default=None, help="default: models/")
    export.add_argument("--profile", choices=("full", "smoke"), default="full",
                        help="must match the checkpoints' profile (default: %(default)s)")
    export.set_defaults(func=cmd_export)
    geometry = commands.add_parser("face-geometry", help="learn where faces sit in the train "
                                   "crops, measure faces=auto against none, write "
                                   "models/face_crop.json")
    geometry.add_argument("--out", type=Path, default=None,
                          help="models folder holding the shipped CNN (default: models/)")
    geometry.add_argument("--limit", type=int, default=None,
                          help="use only the first N images of each subset (default: all)")
    geometry.set_defaults(func=cmd_face_geometry)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
