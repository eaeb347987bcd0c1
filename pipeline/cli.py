"""The `poso` command line (run it through bin/poso, which enters the environment first).

Every command's flags and handler live in a module named by string in COMMANDS, imported only
when that command is chosen: `poso --help` imports neither TensorFlow nor the server, and the
product never imports the benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from pipeline import argtypes
from pipeline import config as config_lib


def _date(text: str) -> datetime.date:
    if text == "yesterday":
        return datetime.date.today() - datetime.timedelta(days=1)
    if text == "today":
        return datetime.date.today()
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD (or 'yesterday')") from None


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """--epochs, --train-steps and --batch-size (the Trainer's budget), as `poso run` takes them."""
    parser.add_argument("--epochs", type=argtypes.positive_int, default=config_lib.RunConfig.epochs,
                        help="full passes of the Trainer over the window's examples")
    parser.add_argument("--train-steps", type=argtypes.positive_int, default=config_lib.RunConfig.train_steps,
                        help="total Trainer steps instead of --epochs full passes (default: whole passes)")
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=config_lib.RunConfig.batch_size,
                        help="training batch size (examples per step)")


def _add_variant_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", default=config_lib.DEFAULT_VARIANT,
                        help="model variant: baseline, moe, poso_mlp, poso_mha, poso_mmoe, poso_all, "
                             "meta_emb (Meta-Embedding), mwuf (MWUF), pin (PIN), mail (MAIL); MeLU is benchmark-only "
                             "(poso bench paper) (default: %(default)s)")


def _add_pipeline_args(parser: argparse.ArgumentParser, home: Optional[str] = None, data: Optional[str] = None) -> None:
    parser.add_argument("--data", default=data,
                        help="daily raw logs: DATA/logs/YYYY-MM-DD/*.csv|*.parquet plus user_features.csv "
                             "and video_features.csv" + ("" if data else " (default: HOME/data)"))
    argtypes.add_home_argument(parser, "pipeline root, metadata store and serving base directory", home)
    _add_variant_arg(parser)
    parser.add_argument("--train-days", type=argtypes.positive_int, default=config_lib.TRAIN_DAYS,
                        help="days of logs before the evaluation day that the model trains on")
    parser.add_argument("--min-train-days", type=argtypes.positive_int, default=None,
                        help="train on as few as this many valid days of the window (default: refuse "
                             "to train on fewer than --train-days)")
    add_training_arguments(parser)
    parser.add_argument("--warm-start", action="store_true", help="start from the last blessed model's weights")
    parser.add_argument("--beam-mode", default="multi_processing", choices=["multi_processing", "multi_threading", "in_memory"],
                        help="DirectRunner running mode (remote runners: pass --beam-arg=--runner=...)")
    parser.add_argument("--beam-arg", action="append", default=[], metavar="ARG",
                        help="extra Beam pipeline argument (repeatable)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every component")
    parser.add_argument("--metadata-mysql", metavar="URL", type=argtypes.mysql_url,
                        default=os.environ.get(config_lib.METADATA_MYSQL_ENV),
                        help="keep ML Metadata in MySQL/MariaDB at mysql://USER:PASSWORD@HOST:PORT/DATABASE "
                             f"instead of HOME/metadata.sqlite (default: ${config_lib.METADATA_MYSQL_ENV}, "
                             "else sqlite)")
    parser.add_argument("--verbose", action="store_true", help="show TFX, TensorFlow and Beam logs")
    _add_lock_arg(parser)


def _add_lock_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-for-lock", type=argtypes.non_negative_int, default=0, metavar="SECONDS",
                        help="when another command holds HOME, wait this long for it (default: exit at once "
                             "with exit code 4)")


def _run_config(args, date: datetime.date) -> config_lib.RunConfig:
    return config_lib.RunConfig(
        date=date, data_dir=args.data or os.path.join(args.home, "data"), home=args.home,
        variant=args.variant, train_days=args.train_days,
        min_train_days=args.min_train_days if args.min_train_days is not None else args.train_days,
        epochs=args.epochs, train_steps=args.train_steps, batch_size=args.batch_size, warm_start=args.warm_start,
        beam_direct_running_mode=args.beam_mode, extra_beam_args=tuple(args.beam_arg),
        enable_cache=not args.no_cache,
        metadata_mysql=config_lib.mysql_connection(args.metadata_mysql) if args.metadata_mysql else None)


def _print_result(result, home: str) -> None:
    from pipeline import report, summary

    print(summary.format_summary(result))
    print(f"  Summary: {summary.write_summary(result, home)}")
    print(f"  Report:  {report.write_report(result, home)}")


def _add_unpin_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unpin", action="store_true",
                        help="lift a `poso rollback` pin first, so that this run's push serves")


def _unpin(args) -> None:
    if args.unpin:
        from components import serving_config

        released = serving_config.remove_pin(_run_config(args, datetime.date.today()).pin_path)
        if released is not None:
            print(f"Pin on version {released} lifted (--unpin): the next push serves", flush=True)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", type=_date, required=True,
                        help="the evaluation day YYYY-MM-DD, 'yesterday' or 'today'")
    _add_pipeline_args(parser)
    _add_unpin_arg(parser)


def _checked(command: str, *checks) -> Optional[int]:
    """None when every check passes, else the exit code of the first one's one-line error."""
    from pipeline import exit_codes, operation

    try:
        for check in checks:
            check()
    except operation.BadInput as bad:
        operation.error(command, f"bad input: {bad}")
        return exit_codes.BAD_INPUT
    return None


def _checked_run_args(command: str, args, first: datetime.date, last: datetime.date) -> Optional[int]:
    from pipeline import operation

    return _checked(command, lambda: operation.check_run_args(args, _run_config(args, first), first, last),
                    lambda: operation.check_training_windows(_run_config(args, first), first, last))


def cmd_run(args) -> int:
    from pipeline import local_runner, operation

    bad = _checked_run_args("run", args, args.date, args.date)
    if bad is not None:
        return bad

    def run() -> int:
        _unpin(args)
        result = local_runner.run_day(_run_config(args, args.date))
        _print_result(result, args.home)
        return operation.outcome([result])

    return operation.operate("run", args.home, f"run-{args.date.isoformat()}", run, verbose=args.verbose,
                             wait_for_lock=args.wait_for_lock)


def add_backfill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="start", type=_date, required=True,
                        help="first evaluation day YYYY-MM-DD (included)")
    parser.add_argument("--to", dest="end", type=_date, required=True,
                        help="last evaluation day YYYY-MM-DD (included)")
    _add_pipeline_args(parser)
    _add_unpin_arg(parser)


def cmd_backfill(args) -> int:
    from pipeline import local_runner, operation

    bad = _checked_run_args("backfill", args, args.start, args.end)
    if bad is not None:
        return bad

    def backfill() -> int:
        _unpin(args)
        results = local_runner.backfill(_run_config(args, args.start), args.start, args.end,
                                        on_day=lambda result: _print_result(result, args.home))
        return operation.outcome(results)

    return operation.operate("backfill", args.home, f"backfill-{args.start.isoformat()}-{args.end.isoformat()}",
                             backfill, verbose=args.verbose, wait_for_lock=args.wait_for_lock)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", required=True,
                        help="demo workspace: created, or recreated if an earlier demo made it")
    parser.add_argument("--rows-per-day", type=argtypes.positive_int, default=4000,
                        help="synthetic impressions per day")
    parser.add_argument("--train-steps", type=argtypes.positive_int, default=300, help="Trainer steps")
    _add_variant_arg(parser)
    parser.add_argument("--beam-mode", default="in_memory", choices=["multi_processing", "multi_threading", "in_memory"],
                        help="DirectRunner running mode")
    parser.add_argument("--verbose", action="store_true", help="show TFX, TensorFlow and Beam logs")
    _add_lock_arg(parser)


def add_model_summary_arguments(parser: argparse.ArgumentParser) -> None:
    def variant_pair(value: str):
        from models import model_summary  # TensorFlow: only when a pair is given, not for --help

        try:
            return model_summary.check_variant_pair([part.strip() for part in value.split(",")])
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    # The default is models.model_summary.DEFAULT_VARIANT_PAIR (tests/test_model_summary.py checks the help).
    parser.add_argument("--variant-pair", type=variant_pair, default=None, metavar="PLAIN,POSO",
                        help="the two variants to compare, --variant names (default: baseline,poso_all)")
    parser.add_argument("--config", type=argtypes.model_config_overrides, default=None, metavar="JSON",
                        help='ModelConfig overrides shared by both variants, e.g. \'{"gate_hidden_units": 8}\'')
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def cmd_model_summary(args) -> int:
    from models import model_summary

    summary = model_summary.summarize(args.config, args.variant_pair or model_summary.DEFAULT_VARIANT_PAIR)
    print(json.dumps(summary, indent=2) if args.json else model_summary.format_table(summary))
    return 0


def cmd_demo(args) -> int:
    from pipeline import demo, operation

    bad = _checked("demo", lambda: operation.check_variant(args.variant), lambda: operation.check_home(args.home))
    if bad is not None:
        return bad
    return operation.operate(
        "demo", args.home, "demo",
        lambda: demo.run_demo(home=args.home, rows_per_day=args.rows_per_day, train_steps=args.train_steps,
                              verbose=args.verbose, beam_mode=args.beam_mode, variant=args.variant),
        verbose=args.verbose, wait_for_lock=args.wait_for_lock)


def add_compile_kubeflow_arguments(parser: argparse.ArgumentParser) -> None:
    # The same options as `poso run`; --home/--data are remote here.
    _add_pipeline_args(parser, home=config_lib.KUBEFLOW_HOME, data=config_lib.KUBEFLOW_DATA)
    parser.add_argument("--image", default=config_lib.KUBEFLOW_IMAGE,
                        help="the pipeline image built from the Dockerfile (default: %(default)s)")
    parser.add_argument("--schema-file", default=config_lib.KUBEFLOW_SCHEMA_FILE,
                        help="the schema inside the image (default: %(default)s)")
    parser.add_argument("--output", default=config_lib.KUBEFLOW_OUTPUT, help="the JSON spec (default: %(default)s)")
    parser.add_argument("--trainer-workers", type=int, default=1,
                        help="train on a Vertex AI custom job with a chief and N-1 workers under "
                             "MultiWorkerMirroredStrategy (default: %(default)s, TFX's own Trainer)")
    parser.add_argument("--trainer-machine-type", default=config_lib.RunConfig.trainer_machine_type,
                        help="machine type of every training replica (default: %(default)s)")
    parser.add_argument("--vertex-project", help="Google Cloud project of the training job (needed with --trainer-workers > 1)")
    parser.add_argument("--vertex-region", default=config_lib.RunConfig.vertex_region,
                        help="region of the training job (default: %(default)s)")


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: `module` holds its handler (`run(args)`, returning the exit code) and, unless
    `flags` names a lighter module for them, its flags (`add_arguments(parser)`). The flags' module
    is imported when the command is chosen (`--help` included), the handler's only when it runs."""

    help: str
    module: str = ""
    add_arguments: str = "add_arguments"
    run: str = "run"
    flags: str = ""
    subcommands: Optional[Dict[str, "Command"]] = None
    quiet: bool = False  # drop TensorFlow's native banners unless --verbose (pipeline/quiet.py)


_HERE = __name__  # "pipeline.cli", or "__main__" under `python -m pipeline.cli`

BENCHMARKS = {
    "train": Command("train-step throughput per model variant", "benchmarks.train_throughput"),
    "serving": Command("gRPC/REST latency and throughput beside the in-process call",
                       "benchmarks.serving_latency"),
    "variant-latency": Command("in-process serving latency per model variant against the baseline, "
                               "for users with behaviour and new users", "benchmarks.variant_latency"),
    "rest-parse": Command("MB/s of the server's REST JSON decoding, row and columnar, up to the 64 MiB limit",
                          "benchmarks.rest_parse"),
    "paper": Command("reproduce the POSO paper's tables and figures (writes benchmarks/RESULTS.md)",
                     "benchmarks.paper"),
    "pipeline": Command("wall time, peak memory and examples of a daily run per component, per window size",
                        "benchmarks.pipeline_scale"),
    "warm-start": Command("evaluation-day GAUC of a warm start from the day before's model against a cold start",
                          "benchmarks.warm_start"),
    "components": Command("examples/s of the Trainer's input pipeline, a bare Keras fit and the Trainer; "
                          "the Evaluator (and TFMA) beside batched inference", "benchmarks.component_throughput"),
    "headroom": Command("ceiling GAUC from the synthetic generator's true probabilities, per preset, and the "
                        "headroom a model closes", "benchmarks.headroom"),
}

COMMANDS = {
    "run": Command("the daily run for one date: ingest, validate, train, evaluate, push",
                   _HERE, "add_run_arguments", "cmd_run", quiet=True),
    "backfill": Command("daily runs for every date from --from to --to (both included), in order (resumable)",
                        _HERE, "add_backfill_arguments", "cmd_backfill", quiet=True),
    "skip-day": Command("record a day whose logs are lost, so later days run without it (--undo withdraws it)",
                        "pipeline.skip_day"),
    "demo": Command("synthetic logs -> daily run -> serve -> gRPC and REST predictions",
                    _HERE, "add_demo_arguments", "cmd_demo", quiet=True),
    "generate": Command("write synthetic daily logs in the KuaiRand schema", "components.synthetic_logs"),
    "ui": Command("the dashboard on 127.0.0.1: runs by day, what serves, blessing decisions, metric trends, "
                  "lineage (read-only over --home)", "pipeline.dashboard.server"),
    "daily": Command("what the schedule runs: `run --date yesterday` with a log file per day, log retention "
                     "and --on-failure / --on-not-blessed hooks", "pipeline.daily"),
    "schedule": Command("print or install the daily trigger (cron or systemd), or write the Kubeflow recurring run",
                        "pipeline.schedule"),
    "runs": Command("each day's run: status, blessed, pushed version, cached steps, duration, rows",
                    "pipeline.runs"),
    "versions": Command("pushed model versions: when, which day's run pushed them with which model, which one serves",
                        "pipeline.versions", "add_versions_arguments", "cmd_versions"),
    "rollback": Command("serve an earlier pushed version, pinned until `poso rollback --release`",
                        "pipeline.versions", "add_rollback_arguments", "cmd_rollback"),
    "serving-config": Command("print the models.config for servers that see the base directory elsewhere "
                              "(deploy/models.config)", "pipeline.versions", "add_serving_config_arguments",
                              "cmd_serving_config"),
    "gc": Command("delete old pushed versions and pipeline_root artifacts no kept model needs (dry run by default)",
                  "pipeline.gc"),
    "serve": Command("serve pushed models over TF Serving's gRPC and REST APIs", "serving.server",
                     run="run_and_exit", flags="serving.server_flags"),
    "predict": Command("send a predict request over gRPC or REST", "serving.client", flags="serving.client_flags",
                       quiet=True),
    "compile-kubeflow": Command("compile the daily pipeline for Kubeflow Pipelines v2 / Vertex (JSON)",
                                "pipeline.kubeflow_v2_runner", "add_compile_kubeflow_arguments", quiet=True,
                                flags=_HERE),
    "model-summary": Command("parameters and FLOPs per module, plain vs POSO (Table 1)",
                             _HERE, "add_model_summary_arguments", "cmd_model_summary", quiet=True),
    # Quiet too: `bench paper` starts a TensorFlow worker per job, each with its banners.
    "bench": Command("benchmarks (print figures; loopback only)", subcommands=BENCHMARKS, quiet=True),
}


def _description(module) -> Optional[str]:
    """The description of a command with a module of its own: the one of the module's own parser
    if it has one, else the module docstring's first paragraph."""
    if hasattr(module, "build_arg_parser"):
        return module.build_arg_parser().description
    return (module.__doc__ or "").split("\n\n")[0].strip() or None


def _run_handler(command: Command, args) -> int:
    return getattr(importlib.import_module(command.module), command.run)(args)


def _add_commands(subparsers, commands: Dict[str, Command], chosen: Sequence[str], prefix: str) -> None:
    """One subparser per command; only the one named first in `chosen` (all of them when `chosen`
    is None) gets its flags, so that only its module is imported."""
    for name, command in commands.items():
        configure = chosen is None or (chosen and chosen[0] == name)
        parser = subparsers.add_parser(name, help=command.help, formatter_class=argtypes.HelpFormatter,
                                       description=command.help)
        if command.subcommands is not None:
            nested = parser.add_subparsers(dest=f"{prefix}{name}", required=True, metavar="NAME")
            _add_commands(nested, command.subcommands, None if chosen is None else chosen[1:] if configure else [],
                          prefix=f"{prefix}{name}_")
            continue
        if not configure:
            continue
        flags = importlib.import_module(command.flags or command.module)
        if command.add_arguments == "add_arguments":  # the module is the command's own
            parser.description = _description(flags)
        getattr(flags, command.add_arguments)(parser)
        parser.set_defaults(func=functools.partial(_run_handler, command))


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser of `poso`; with `argv`, only the command it names gets its flags (and its
    module imported), without it every command does."""
    parser = argparse.ArgumentParser(prog="poso", description=__doc__.split("\n")[0],
                                     formatter_class=argtypes.HelpFormatter,
                                     epilog=f"Commands that work on a pipeline home take --home or read "
                                            f"${argtypes.HOME_ENVIRONMENT_VARIABLE}. "
                                            f"`poso COMMAND --help` shows a command's flags and defaults.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else [a for a in argv if not a.startswith("-")]
    _add_commands(commands, COMMANDS, chosen, prefix="")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from_command_line = argv is None  # not when called in-process (tests, notebooks)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if from_command_line and chosen in COMMANDS and COMMANDS[chosen].quiet and "--verbose" not in argv:
        from pipeline import quiet

        quiet.filter_native_stderr()
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
