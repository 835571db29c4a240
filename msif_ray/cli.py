"""``msif run | plan | status | demo``: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from msif_ray.config import Config, load_config
from msif_ray.models import cache_root


def init_ray(config: Config) -> None:
    """Join the configured cluster, or start an embedded local Ray (no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=config.ray.address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=False)


def user_error(err: BaseException) -> BaseException | None:
    """The input error behind ``err`` (unwrapping Ray's task errors), or None for a bug."""
    from ray.exceptions import RayTaskError

    while isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    return err if isinstance(err, (ValueError, KeyError, FileNotFoundError, FloatingPointError, MemoryError)) else None


def cmd_run(args: argparse.Namespace) -> int:
    from msif_ray.pipeline import Pipeline

    config = load_config(args.config)
    pipeline = Pipeline(config)
    inputs = pipeline.validate()  # fail before starting Ray when the input is bad
    pipeline.plan = pipeline.resource_plan(inputs)
    pipeline.plan.check()  # ... or when it cannot fit the memory budget
    init_ray(config)
    pipeline.run(inputs)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory, storage and time per stage before anything heavy runs; exit 2 when it cannot fit."""
    from msif_ray.pipeline import Pipeline
    from msif_ray.plan import NOMINAL_DEVICES, PlanError

    pipeline = Pipeline(load_config(args.config), log=lambda line: None)
    plan = pipeline.resource_plan(pipeline.validate(), NOMINAL_DEVICES.get(args.device))
    print("\n".join(plan.summary_lines()))
    if plan.problems:
        raise PlanError("the run does not fit its memory budget:\n  - " + "\n  - ".join(plan.problems))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from msif_ray.status import describe

    print(describe(args.run_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from msif_ray.demo import run_demo

    started = time.monotonic()
    run_demo(Path(args.workdir), num_workers=args.workers)
    print(f"demo finished in {time.monotonic() - started:.1f}s")
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
    status = commands.add_parser("status", help="stages, shards done / total, timings of a run directory")
    status.add_argument("run_dir")
    status.set_defaults(handler=cmd_status)
    demo = commands.add_parser("demo", help="the built-in toy world, end to end, on local Ray")
    demo.add_argument("--workdir", default=str(cache_root() / "demo"), help="where the toy world and the run live")
    demo.add_argument("--workers", type=int, default=2, help="Ray workers (one CPU thread each)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as err:  # noqa: BLE001 - turned into a one-line message when it is the user's input
        cause = user_error(err)
        if cause is None:
            raise
        print(f"msif: error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
