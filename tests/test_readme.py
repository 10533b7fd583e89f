"""The README's claims that code can check: its error table lists every code the service can
answer, and the commands and files it names exist."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from service.inference import PredictorError
from service.observability import ServiceMetrics
from service.preprocessing import PreprocessingError

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Base classes whose own code no request gets: each raised error is a subclass.
ABSTRACT = {PreprocessingError.code, PredictorError.code}


def subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= subclasses(sub)
    return found


def codes_in_the_code() -> set[str]:
    """Every error ``code`` the service can write: the typed errors' codes, and the string
    literals it passes as codes (ApiError, error_response, the middleware's reject)."""
    codes = {c.code for base in (PreprocessingError, PredictorError) for c in subclasses(base)}
    for path in (REPO / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                    "ApiError", "error_response") and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)):
                codes.add(node.args[1].value)
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "reject"
                    and isinstance(node.args[3], ast.Constant)):  # the middleware's answers
                codes.add(node.args[3].value)  # reject(send, path, status, code, ...)
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (isinstance(key, ast.Constant) and key.value == "code"
                            and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                        codes.add(value.value)
            # handle_http_error's status -> code table, and its fallback
            if (isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "codes"
                    and isinstance(node.value, ast.Dict)):
                codes |= {v.value for v in node.value.values}
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get"
                    and getattr(node.func.value, "id", "") == "codes"):
                codes.add(node.args[1].value)
    return codes - ABSTRACT


def codes_in_the_readme() -> set[str]:
    table = README.split("**Errors.**", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {code for row in rows[1:] for code in re.findall(r"`([a-z_]+)`", row.split("|")[2])}


def test_the_error_table_lists_every_code_the_service_answers():
    in_code = codes_in_the_code()
    assert {"not_an_image", "overloaded", "not_found", "invalid_request",
            "internal_error"} <= in_code  # the scan finds codes of every kind
    assert codes_in_the_readme() == in_code


def test_the_files_and_commands_it_names_exist():
    for photo in re.findall(r"examples/([a-z_]+\.jpg)", README):
        assert (REPO / "examples" / photo).is_file(), photo
    for image in re.findall(r"\(([\w/]+\.png)\)", README):
        assert (REPO / image).is_file(), image
    assert "group_photo.jpg" not in README


def command_lines(program: str) -> list[list[str]]:
    """The arguments of each ``program`` command the README shows, split as a shell would
    and without their comments."""
    pattern = rf"(?m)(?:^|`|\$ ){re.escape(program)}(?= |`|$)([^`\n#]*)"
    return [args for m in re.finditer(pattern, README) if (args := shlex.split(m.group(1)))]


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    found = set(parser._option_string_actions)  # argparse lists a parser's options nowhere else
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sub in action.choices.values():
            found |= options_of(sub)
    return found


def test_the_commands_it_shows_are_ones_the_programs_take():
    from service.cli import build_parser as cli_parser
    from training.__main__ import build_parser as training_parser

    shown = {"python -m training": (training_parser(), 10), "emotion-detect": (cli_parser(), 2)}
    for program, (parser, at_least) in shown.items():
        lines = command_lines(program)
        assert len(lines) >= at_least, program  # the pattern still finds them
        for args in lines:
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"README: {program} {shlex.join(args)}: refused by its parser")
    section = README.split("## The command line", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(--[a-z-]+)", section)) <= options_of(cli_parser())
    targets = set(re.findall(r"(?m)^([a-z-]+):", (REPO / "Makefile").read_text()))
    assert {args[0] for args in command_lines("make")} <= targets
    for module in set(re.findall(r"python -m ([a-z_]+(?:\.[a-z_]+)*)", README)):
        assert importlib.util.find_spec(module), module
    benchmarks = README.split("python -m benchmarks.<name>`:", 1)[1].split("\n", 1)[0]
    for name in re.findall(r"`(bench_[a-z_]+)`", benchmarks):
        assert (REPO / "benchmarks" / f"{name}.py").is_file(), name


def test_each_commands_help_names_only_options_it_takes():
    """train's and reproduce's --profile help said "one epoch unless --epochs says", an
    option only levers has (a review)."""
    from service.cli import build_parser as cli_parser
    from training.__main__ import build_parser as training_parser

    def parsers(parser):
        yield parser
        for action in parser._subparsers._group_actions if parser._subparsers else []:
            for sub in action.choices.values():
                yield from parsers(sub)

    for program in (training_parser(), cli_parser()):
        for parser in parsers(program):
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", parser.format_help()))
            assert named <= options_of(parser), parser.prog  # its own, or its commands'


def test_the_side_by_side_in_the_readme_is_the_manifests():
    """The README's model table is the model card's, from models/manifest.json."""
    from service.manifest import load_manifest
    from service.settings import REPO_MODELS_DIR
    from training.model_card import side_by_side

    for line in side_by_side(load_manifest(REPO_MODELS_DIR)):
        assert line in README, line


def test_the_metrics_table_names_every_metric_with_its_type_and_labels():
    table = README.split("**Metrics.**", 1)[1].split("\n\n", 2)[1]
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in table.splitlines()
            if line.startswith("| `")]
    documented = {name.strip("`"): (kind, tuple(re.findall(r"`(\w+)`", labels)))
                  for name, kind, labels in rows}
    metrics = ServiceMetrics()
    types = {family.name: family.type for family in metrics.registry.collect()}
    # prometheus-client keeps a metric's label names only on the metric object
    labels = {m._name: tuple(m._labelnames) for m in vars(metrics).values()
              if isinstance(m, MetricWrapperBase)}
    assert documented == {name: (types[name], labels[name]) for name in types}


def test_the_settings_table_gives_each_settings_default():
    """A default changed in code (EMOTION_DEFAULT_FACES to auto, the in-flight limit doubled,
    the drain to 0 s) passed every test: the tests that use a setting set it (a mutation
    review). Rows whose default is a number or one literal are compared with the code's."""
    import json

    from service.settings import Settings
    from training.settings import TrainingSettings

    rows = re.findall(r"^\| `(EMOTION_[A-Z0-9_]+)` \| (\d+|`[^` ]+`) \|", README, re.M)
    assert len(rows) >= 19
    assert "| `EMOTION_HOST`, `EMOTION_PORT` | `127.0.0.1`, 8000 |" in README
    assert (Settings.model_fields["host"].default, Settings.model_fields["port"].default) == (
        "127.0.0.1", 8000)
    for name, stated in rows:
        field = name.removeprefix("EMOTION_").lower()
        [owner] = [c for c in (Settings, TrainingSettings) if field in c.model_fields]
        info = owner.model_fields[field]
        default = info.default_factory() if info.default_factory else info.default
        literal = stated.strip("`")
        assert (json.loads(literal) if literal.startswith("[") else
                Path(literal).expanduser() if isinstance(default, Path) else
                literal if stated.startswith("`") else float(literal)) == default, name
    # 0 for the body budget: "the largest body the limits allow (the `/v2` one, 224 MB)"
    settings = Settings.model_construct()
    assert settings.resolved_max_body_bytes_in_flight == settings.max_oip_body_bytes
    assert round(settings.max_oip_body_bytes / 1e6) == 224 > settings.max_body_bytes / 1e6
