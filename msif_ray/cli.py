"""``msif run | plan | nightly | status | report | query | tune | demo``: the command line; each command ends with a one-screen summary.

Exit codes: 0 done; 2 bad input (a one-line message naming the culprit, no traceback: only the
project's own ``errors.UserError`` classes count); 3 the run directory is locked by
another live run (the message names it); 1 anything else, a bug or an outage, with its traceback.
Everything ``msif`` prints or logs goes through ``config.redact_text``: credentials in URLs are masked.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path

from msif_ray.config import cache_root, load_config, redact_output
from msif_ray.distributed.runtime import init_ray
from msif_ray.errors import user_error
from msif_ray.pipeline.locked import run_locked, stages_now
from msif_ray.store import layout
from msif_ray.store.lock import LockHeldError

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3


def cmd_run(args: argparse.Namespace) -> int:
    from msif_ray.report.build import build_report
    from msif_ray.ops.summary import summarize

    started = time.monotonic()
    config = load_config(args.config)
    before: dict = {}

    def work(pipeline, inputs) -> None:
        before.update(copy.deepcopy(pipeline.manifest["stages"]))  # to tell, at the end, which stages were reused
        pipeline.run(inputs)
        build_report(config.run_dir, reuse=True)

    run_locked(config, "run", work)
    print(summarize(config.run_dir, "run", time.monotonic() - started, before))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    """``msif run`` under the lock, then the night published under ``nights/`` (see ``ops/nightly.py``).

    A night that fails after its config loaded is recorded in the history as failed, and the error
    is raised on, so the exit code is ``msif run``'s.
    """
    from msif_ray.ops.nightly import Night, today
    from msif_ray.report.build import build_report
    from msif_ray.ops.summary import summarize

    started = time.monotonic()
    date = args.date or today()
    config = load_config(args.config)
    night = Night(config.run_dir, date)
    before: dict = {}

    def work(pipeline, inputs) -> None:
        before.update(copy.deepcopy(pipeline.manifest["stages"]))
        pipeline.run(inputs)
        build_report(config.run_dir, reuse=True)
        night.publish(config.method, before, pipeline.manifest["stages"])

    try:
        run_locked(config, "nightly", work)
    except BaseException as err:
        night.fail(err)
        raise
    print(summarize(config.run_dir, f"nightly {date}", time.monotonic() - started, before))
    print(f"  night    {night.store.url(layout.night_dir(date))}/  (nights/latest.json points to it)")
    return 0


def _night_date(text: str) -> str:
    from msif_ray.ops.nightly import parse_date

    try:
        return parse_date(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--date: ")) from None


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory, storage and time per stage before anything heavy runs; exit 2 when it cannot fit."""
    from msif_ray.pipeline.run import Pipeline
    from msif_ray.pipeline.plan import NOMINAL_DEVICES, PlanError

    pipeline = Pipeline(load_config(args.config), log=lambda line: None)
    plan = pipeline.resource_plan(pipeline.validate(), NOMINAL_DEVICES.get(args.device))
    print("\n".join(plan.summary_lines()))
    if plan.problems:
        raise PlanError("the run does not fit its memory budget:\n  - " + "\n  - ".join(plan.problems))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from msif_ray.ops.status import describe

    print(describe(args.run_dir))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from msif_ray.config import config_from_dict
    from msif_ray.report.build import build_report
    from msif_ray.ops.summary import summarize
    from msif_ray.store.layout import read_manifest
    from msif_ray.store.storage import RunDir

    started = time.monotonic()
    manifest = read_manifest(RunDir(args.run_dir))
    if "config" in manifest:  # else build_report explains what is missing
        init_ray(config_from_dict(manifest["config"], base_dir="."))
    build_report(args.run_dir, show=args.show)
    print(summarize(args.run_dir, "report", time.monotonic() - started))  # no stage runs: show what each did
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from msif_ray.demo.run import demo_run_dir, run_demo
    from msif_ray.ops.summary import summarize

    started = time.monotonic()
    run_dir = str(demo_run_dir(Path(args.workdir)))
    before = stages_now(run_dir)
    run_demo(Path(args.workdir), num_workers=args.workers)
    print(summarize(run_dir, "demo", time.monotonic() - started, before))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """Ad hoc queries against a finished index-mode run: exact scores of the index's candidates."""
    from msif_ray.ops.query import QueryError, ask, format_answers
    from msif_ray.store.data import PromptCompletion, read_pairs

    if args.file:
        queries = read_pairs([args.file], "prompt", "completion", "id")
    elif args.prompt is not None and args.completion is not None:
        queries = [PromptCompletion(args.id, args.prompt, args.completion)]
    else:
        raise QueryError("msif query: give --prompt and --completion, or --file")
    print(format_answers(ask(args.run_dir, queries, args.top)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Trials of the swept settings on labelled development queries, in the config's run directory."""
    from msif_ray.ops.tune import (DEFAULT_DAMPINGS, DEFAULT_NORMALIZE, format_trials, parse_values, ranked_trials,
                                   read_labels, trial_config, trial_settings, tune, write_best)
    from msif_ray.pipeline.run import Pipeline

    config = load_config(args.config)
    settings = trial_settings(
        parse_values(args.method, [config.method], "--method"),
        parse_values(args.damping_pretrain, DEFAULT_DAMPINGS, "--damping-pretrain"),
        parse_values(args.damping_finetune, [config.factors.damping_finetune], "--damping-finetune"),
        parse_values(args.normalize, DEFAULT_NORMALIZE, "--normalize"))
    for trial in settings:  # a bad value fails here, before anything runs
        trial_config(config, trial, args.queries)
    gold = read_labels(config, args.queries, args.gold)
    out = args.out or str(Path(args.config).with_suffix(".tuned.yaml"))

    def work(pipeline, inputs) -> None:
        had_result = pipeline.manifest["stages"].get("scores", {}).get("state") == "done"
        try:
            trials = tune(config, args.queries, gold, lambda trial: Pipeline(trial).run(), settings)
        finally:  # also after a failed trial: no trial's result is left published as the run's
            if had_result:  # every stage reused: the run directory's own result is published again
                Pipeline(config, log=lambda line: None).run()
            else:
                for name in (layout.TOPK, layout.BOTTOMK):
                    pipeline.store.remove(name)
        best = ranked_trials(trials)[0]
        write_best(config, best, out)
        print(format_trials(trials))
        print(f"best: {', '.join(f'{k} {v}' for k, v in best.settings.items())}; written to {out}")

    run_locked(config, "tune", work)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msif", description="Multi-stage influence functions on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) every stage of a config")
    run.add_argument("config", help="path to the YAML config")
    run.set_defaults(handler=cmd_run)
    plan = commands.add_parser("plan", help="memory, storage and time per stage, before anything heavy runs")
    plan.add_argument("config", help="path to the YAML config")
    plan.add_argument("--device", choices=["h200", "h100"], default=None,
                      help="plan for this GPU (nominal figures) instead of measuring this machine")
    plan.set_defaults(handler=cmd_plan)
    nightly = commands.add_parser("nightly", help="one night: only what is new since the last good night, "
                                  "under the lock; published under RUN_DIR/nights/<date>/")
    nightly.add_argument("config", help="path to the YAML config")
    nightly.add_argument("--date", type=_night_date, default=None,
                         help="the night's date, YYYY-MM-DD (default: today, UTC); a date run again is overwritten")
    nightly.set_defaults(handler=cmd_nightly)
    status = commands.add_parser("status", help="stages, shards done / total, timings of a run directory")
    status.add_argument("run_dir")
    status.set_defaults(handler=cmd_status)
    report = commands.add_parser("report", help="write the HTML report of a finished run under RUN_DIR/report/")
    report.add_argument("run_dir", help="the run directory (local path or s3://...)")
    report.add_argument("--show", type=int, default=5, help="proponents and opponents shown per query (default 5)")
    report.set_defaults(handler=cmd_report)
    query = commands.add_parser("query", help="ad hoc queries against a finished index-mode run: the index's candidates, "
                                "re-scored exactly, with their text")
    query.add_argument("run_dir")
    query.add_argument("--prompt", help="the query's prompt")
    query.add_argument("--completion", help="the completion to explain (usually starts with a space)")
    query.add_argument("--id", default="query", help="the query's id in the output (default: query)")
    query.add_argument("--file", help="JSON Lines or Parquet of queries (columns id, prompt, completion) instead")
    query.add_argument("--top", type=int, default=10, help="documents shown per query (default 10)")
    query.set_defaults(handler=cmd_query)
    tune = commands.add_parser("tune", help="choose method, dampings and normalisation on labelled development "
                               "queries, reusing every stage the swept settings leave unchanged")
    tune.add_argument("config", help="path to the YAML config (its run directory holds the trials)")
    tune.add_argument("--queries", required=True, help="development queries (the config's query columns)")
    tune.add_argument("--gold", required=True, help='JSON Lines: {"query_id": ..., "doc_ids": [...]} per query')
    tune.add_argument("--method", help="methods to try, comma-separated (default: the config's)")
    tune.add_argument("--damping-pretrain", help="λ values, comma-separated (default: auto:0.001,auto:0.01,auto:0.1,auto:1)")
    tune.add_argument("--damping-finetune", help="α values for multi_stage, comma-separated (default: the config's)")
    tune.add_argument("--normalize", help="scoring.normalize values, comma-separated (default: none,self)")
    tune.add_argument("--out", help="where the best config goes (default: CONFIG with .tuned.yaml)")
    tune.set_defaults(handler=cmd_tune)
    demo = commands.add_parser("demo", help="the built-in toy world, end to end, on local Ray")
    demo.add_argument("--workdir", default=str(cache_root() / "demo"), help="where the toy world and the run live")
    demo.add_argument("--workers", type=int, default=2, help="Ray workers (one CPU thread each)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``msif``: everything it prints or logs, tracebacks included, has credentials in URLs masked."""
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    redact_output()
    try:
        return args.handler(args)
    except Exception as err:  # noqa: BLE001 - turned into a one-line message when it is the user's input
        cause = user_error(err)
        if cause is None:  # a bug or an outage: its traceback, through the redacting stderr
            traceback.print_exception(err)
            return EXIT_FAILURE
        print(f"msif: error: {cause}", file=sys.stderr)
        return EXIT_LOCKED if isinstance(cause, LockHeldError) else EXIT_BAD_INPUT
    finally:
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
