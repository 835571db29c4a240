"""``msif run | status | demo``: the command line.

Exit codes: 0 done; 2 bad input (a one-line message naming the culprit, no traceback: only the
project's own input-error classes count, see ``user_error``); 3 the run directory is locked by
another live run (the message names it); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from msif_ray.config import Config, load_config
from msif_ray.lock import LockHeldError, RunDirLock
from msif_ray.models import cache_root
from msif_ray.storage import RunDir, check_run_dir_shared, check_storage

EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3


def init_ray(config: Config) -> None:
    """Join the configured cluster, or start an embedded local Ray (no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=config.ray.address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=False)


def input_error_classes() -> tuple[type[BaseException], ...]:
    """The project's own classes of bad input. Anything else (KeyError, pyarrow's ValueErrors, a
    FileNotFoundError of a lost artifact, ...) is a bug or an outage and keeps its traceback."""
    from msif_ray.config import ConfigError
    from msif_ray.data import DataError
    from msif_ray.gradients import InputError
    from msif_ray.models import ModelError
    from msif_ray.modules import ModuleSelectionError, NonFiniteWeightsError
    from msif_ray.storage import StorageError

    return ConfigError, DataError, InputError, ModelError, ModuleSelectionError, NonFiniteWeightsError, StorageError


def user_error(err: BaseException) -> BaseException | None:
    """The input error behind ``err`` (unwrapping Ray's task errors), or None for a bug."""
    from ray.exceptions import RayTaskError

    while isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    return err if isinstance(err, input_error_classes() + (LockHeldError,)) else None


def run_locked(config: Config, command: str, work) -> None:
    """``work(pipeline, plan)`` under the run directory's lock, after every early check.

    Order: the run directory is reachable and writable; the lock is taken (a second run stops
    here); the inputs are validated (before Ray starts); Ray starts; a local run directory is
    refused on a multi-node cluster. ``msif nightly`` runs its work through this too.
    """
    from msif_ray.pipeline import Pipeline

    check_storage(config.run_dir, "run_dir")
    with RunDirLock(RunDir(config.run_dir), command):
        pipeline = Pipeline(config)
        plan = pipeline.validate()  # fail before starting Ray when the input is bad
        init_ray(config)
        check_run_dir_shared(config.run_dir, "run_dir", _alive_nodes())
        work(pipeline, plan)


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def cmd_run(args: argparse.Namespace) -> int:
    run_locked(load_config(args.config), "run", lambda pipeline, plan: pipeline.run(plan))
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
        return EXIT_LOCKED if isinstance(cause, LockHeldError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
