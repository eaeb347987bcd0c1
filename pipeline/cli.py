"""The `poso` command line (run it through bin/poso, which enters the environment first)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from typing import List, Optional

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


def _add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=config_lib.DEFAULT_DATA,
                        help="daily raw logs: DATA/logs/YYYY-MM-DD/*.csv|*.parquet plus user_features.csv "
                             "and video_features.csv (default: %(default)s)")
    parser.add_argument("--home", default=config_lib.DEFAULT_HOME,
                        help="pipeline root, metadata store and serving base directory (default: %(default)s)")
    parser.add_argument("--variant", default=config_lib.DEFAULT_VARIANT,
                        help="model variant: baseline, moe, poso_mlp, poso_mha, poso_mmoe, poso_all")
    parser.add_argument("--train-days", type=int, default=config_lib.TRAIN_DAYS)
    parser.add_argument("--min-train-days", type=int, default=None,
                        help="train on fewer than --train-days spans (default: refuse)")
    parser.add_argument("--train-steps", type=int, default=config_lib.RunConfig.train_steps)
    parser.add_argument("--batch-size", type=int, default=config_lib.RunConfig.batch_size)
    parser.add_argument("--warm-start", action="store_true", help="start from the last blessed model's weights")
    parser.add_argument("--beam-mode", default="multi_processing", choices=["multi_processing", "multi_threading", "in_memory"],
                        help="DirectRunner running mode (remote runners: pass --beam-arg=--runner=...)")
    parser.add_argument("--beam-arg", action="append", default=[], help="extra Beam pipeline argument")
    parser.add_argument("--no-cache", action="store_true", help="recompute every component")
    parser.add_argument("--verbose", action="store_true", help="show TFX and Beam logs")


def _run_config(args, date: datetime.date) -> config_lib.RunConfig:
    return config_lib.RunConfig(
        date=date, data_dir=args.data, home=args.home, variant=args.variant, train_days=args.train_days,
        min_train_days=args.min_train_days if args.min_train_days is not None else args.train_days,
        train_steps=args.train_steps, batch_size=args.batch_size, warm_start=args.warm_start,
        beam_direct_running_mode=args.beam_mode, extra_beam_args=tuple(args.beam_arg),
        enable_cache=not args.no_cache)


def _print_result(result, home: str) -> None:
    from pipeline import report, summary

    print(summary.format_summary(result))
    print(f"  Summary: {summary.write_summary(result, home)}")
    print(f"  Report:  {report.write_report(result, home)}")


def cmd_run(args) -> int:
    from pipeline import local_runner

    local_runner.setup_logging(args.verbose)
    _print_result(local_runner.run_day(_run_config(args, args.date)), args.home)
    return 0


def cmd_backfill(args) -> int:
    from pipeline import local_runner

    local_runner.setup_logging(args.verbose)
    for result in local_runner.backfill(_run_config(args, args.start), args.start, args.end):
        _print_result(result, args.home)
    return 0


def cmd_demo(args) -> int:
    from pipeline import demo

    return demo.run_demo(home=args.home, rows_per_day=args.rows_per_day, train_steps=args.train_steps,
                         verbose=args.verbose, beam_mode=args.beam_mode)


def cmd_generate(args) -> int:
    from components import synthetic_logs

    return synthetic_logs.run(args) or 0


def _add_module_command(subparsers, name: str, module, help_text: str) -> None:
    """A subcommand whose module brings its own flags (`add_arguments`) and entry point (`run`)."""
    command = subparsers.add_parser(name, help=help_text)
    module.add_arguments(command)
    command.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poso", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the daily run for one date: ingest, validate, train, evaluate, push")
    run.add_argument("--date", type=_date, required=True, help="the evaluation day YYYY-MM-DD (or 'yesterday')")
    _add_pipeline_args(run)
    run.set_defaults(func=cmd_run)

    backfill = commands.add_parser("backfill", help="daily runs for a range of dates, in order (resumable)")
    backfill.add_argument("--from", dest="start", type=_date, required=True)
    backfill.add_argument("--to", dest="end", type=_date, required=True)
    _add_pipeline_args(backfill)
    backfill.set_defaults(func=cmd_backfill)

    demo = commands.add_parser("demo", help="synthetic logs -> daily run -> serve -> gRPC and REST predictions")
    demo.add_argument("--home", default=f"{config_lib.DEFAULT_HOME}/demo", help="demo workspace (recreated)")
    demo.add_argument("--rows-per-day", type=int, default=4000)
    demo.add_argument("--train-steps", type=int, default=300)
    demo.add_argument("--beam-mode", default="in_memory", choices=["multi_processing", "multi_threading", "in_memory"])
    demo.add_argument("--verbose", action="store_true")
    demo.set_defaults(func=cmd_demo)

    generate = commands.add_parser("generate", help="write synthetic daily logs in the KuaiRand schema")
    from components import synthetic_logs
    synthetic_logs.add_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    from benchmarks import paper, pipeline_scale, serving_latency, train_throughput
    from models import model_summary
    from pipeline import kubeflow_v2_runner
    from pipeline import schedule as schedule_lib

    _add_module_command(commands, "model-summary", model_summary,
                        "parameters and FLOPs per module, plain vs POSO (Table 1)")
    bench = commands.add_parser("bench", help="benchmarks (print figures; loopback only)")
    benches = bench.add_subparsers(dest="bench", required=True)
    _add_module_command(benches, "train", train_throughput, "train-step throughput per model variant")
    _add_module_command(benches, "serving", serving_latency,
                        "gRPC/REST latency and throughput beside the in-process call")
    _add_module_command(benches, "paper", paper,
                        "reproduce the POSO paper's tables and figures (writes benchmarks/RESULTS.md)")
    _add_module_command(benches, "pipeline", pipeline_scale,
                        "wall time and peak memory of a daily run per component, per window size")
    _add_module_command(commands, "compile-kubeflow", kubeflow_v2_runner,
                        "compile the daily pipeline for Kubeflow Pipelines v2 / Vertex (JSON)")
    _add_module_command(commands, "schedule", schedule_lib,
                        "print or install the daily trigger (cron or systemd), or write the Kubeflow recurring run")

    from serving import client, server
    serve = commands.add_parser("serve", help="serve pushed models over TF Serving's gRPC and REST APIs",
                                description=server.build_arg_parser().description)
    server.add_arguments(serve)
    serve.set_defaults(func=server.run)

    predict = commands.add_parser("predict", help="send a predict request over gRPC or REST",
                                  description=client.build_arg_parser().description)
    client.add_arguments(predict)
    predict.set_defaults(func=client.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
