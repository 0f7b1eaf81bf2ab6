"""The ``longplay`` command (SPEC §5): the command tree, and the handlers of the stack, submit and jobs commands.

It sits at the top of the import graph: it imports every stage's handler with a plain import statement, so the graph
shows what the command depends on (tests/test_layering.py), while nothing imports it. Stage handlers are imported
inside small wrappers when their command runs, so ``longplay --help`` loads no stage.

Exit codes: 0 ok, 1 the job failed, 2 bad usage or config (one line naming the key and what is wrong).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from infra import raynode, stack
from pipeline import allocator, commands
from pipeline.commands import UsageError
from pipeline.config import ConfigError
from pipeline.diffusion import SAMPLERS
from pipeline.models.presets import PRESETS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes at most this
Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as a :class:`UsageError`: one line naming the argument, exit 2, like a config error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("longplay").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def bounded(kind: type[int] | type[float], low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse ``type``: a finite ``kind`` in [low, high] (``above``: strictly greater than ``low``), so that
    ``--steps 0`` or ``--seconds nan`` is a usage error naming the flag, not a traceback from deep in a sampler."""
    noun = "an integer" if kind is int else "a number"
    limits = [f"{'>' if above else '>='} {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
    wanted = " ".join([noun, " and ".join(limit for limit in limits if limit)]).strip()

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        too_low = low is not None and (value <= low if above else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


def device_flag(text: str) -> str:
    """An argparse ``type`` for ``--device``: a torch device this machine has (``cuda`` without CUDA: exit 2, one
    line); the default (no flag) is CUDA when available, else the CPU."""
    from pipeline.components import resolve_device

    try:
        return str(resolve_device(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--device: ")) from None


# --------------------------------------------------------------------------------- handlers of other stages
def _data_demo(args: argparse.Namespace) -> int:
    from preprocess.demo_dataset import data_demo

    return data_demo(args)


def _preprocess(args: argparse.Namespace) -> int:
    from preprocess.cli import preprocess

    return preprocess(args)


def _train(args: argparse.Namespace) -> int:
    from train.cli import train

    return train(args)


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_command

    return evaluate_command(args)


def _demo(args: argparse.Namespace) -> int:
    from infra.demo import demo_command

    return demo_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longplay", description="Stable Audio as a distributed training system")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(parent, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        """Add a subcommand run by ``handler``."""
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler, command_name=p.prog.removeprefix("longplay "))
        return p

    # stack ------------------------------------------------------------------------------------------------
    stack = sub.add_parser("stack", help="the local service stack (S3, MLflow, Ray) on 127.0.0.1")
    stack_sub = stack.add_subparsers(dest="stack_command", required=True)
    for name, handler, help in (
        ("up", stack_up, "start the stack and print export lines"),
        ("down", stack_down, "stop it"),
        ("status", stack_status, "health"),
    ):
        p = command(stack_sub, name, handler, help)
        p.add_argument("--state-dir", default=".longplay", help="where the stack keeps its state (.longplay)")
        if name == "up":
            p.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    p = command(stack_sub, "join", stack_join, "start another Ray node here, joined to the stack's head")
    p.add_argument("--state-dir", default=".longplay", help="where the stack keeps its state (.longplay)")
    p.add_argument("--num-cpus", type=int, default=1, help="CPUs the joined node offers (default: 1)")
    p = command(stack_sub, "leave", stack_leave, "stop nodes `stack join` started (all without NAME)")
    p.add_argument("--state-dir", default=".longplay", help="where the stack keeps its state (.longplay)")
    p.add_argument("name", nargs="?", default=None, help="a joined node (node1, ...)")

    # data ------------------------------------------------------------------------------------------------
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = command(data_sub, "demo", _data_demo, "render the demo music dataset")
    p.add_argument("out")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0, help="which pieces, instruments and tempi (deterministic)")

    # preprocess / shards ----------------------------------------------------------------------------------
    p = command(sub, "preprocess", _preprocess, "audio → latent shards (Ray job)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--vae", required=True)
    p.add_argument("--manifest")
    p.add_argument("--config")
    p.add_argument(
        "--allow-outside-src",
        action="store_true",
        help="read manifest rows naming files outside SRC (refused by default: a manifest is data)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    shards = sub.add_parser("shards", help="inspect or verify a preprocess output")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    for name, handler in (("inspect", commands.shards_inspect), ("verify", commands.shards_verify)):
        p = command(shards_sub, name, handler, f"{name} a preprocess output")
        p.add_argument("out")

    # train / submit ----------------------------------------------------------------------------------------
    p = command(sub, "train", _train, "DeepSpeed training through Ray Train")
    p.add_argument("kind", choices=["vae", "clap", "diffusion"])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = command(sub, "submit", submit, "submit a longplay command as a Ray Job to RAY_ADDRESS")
    p.add_argument("--no-wait", action="store_true", help="return after submitting; see `longplay jobs`")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- longplay <command> ...")
    p = command(sub, "jobs", jobs, "status, logs or stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")

    # generate / evaluate -----------------------------------------------------------------------------------
    p = command(sub, "generate", commands.generate, "text + seconds → 44.1 kHz stereo wav")
    p.add_argument("model", help="bundle: local dir, s3:// prefix or models:/name@alias")
    p.add_argument("prompt", nargs="?", help="the text prompt (or --prompts FILE)")
    p.add_argument("--prompts", help="a file with one prompt per line; -o is then a directory")
    p.add_argument("--seconds", type=bounded(float, 0, above=True), required=True, help="length of the output (s)")
    p.add_argument("--seconds-start", type=bounded(float, 0), default=0.0, help="timing condition: crop start (s)")
    p.add_argument("--steps", type=bounded(int, 1), default=50, help="sampler steps")
    p.add_argument("--cfg", type=bounded(float, 0), default=6.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=bounded(int, 0, SEED_MAX), default=0, help="sampling seed")
    p.add_argument("--sampler", default="dpmpp-3m-sde", choices=list(SAMPLERS))
    p.add_argument("-o", "--output", required=True, help="F.wav (or a directory with --prompts)")
    p.add_argument("--device", type=device_flag, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p = command(sub, "evaluate", _evaluate, "generate for a prompt file, then the metrics")
    p.add_argument("model", help="bundle: local dir, s3:// prefix or models:/name@alias")
    p.add_argument("--prompts", required=True, help=".jsonl rows {id, prompt, seconds} or one prompt per line")
    p.add_argument("--reference", help="audio shards (preprocess --vae none) or a folder of audio files")
    p.add_argument("--out", help="where generated/*.wav and report.json go (default: a new temp dir)")
    p.add_argument("--config", help="evaluate YAML (steps, cfg_scale, sampler, embedder weights, ...)")
    p.add_argument("--device", type=device_flag, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    # config ----------------------------------------------------------------------------------------------
    config = sub.add_parser("config", help="configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    p = command(config_sub, "validate", commands.config_validate, "load, validate and print a config")
    p.add_argument("schema", choices=["train", "preprocess"])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    # weights / models / demo -------------------------------------------------------------------------------
    weights = sub.add_parser("weights", help="weight conversion")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True)
    p = command(weights_sub, "import", commands.weights_import, "import SAT/diffusers weights")
    p.add_argument("src", help="a stable-audio-tools checkpoint (model_config.json beside it) or a diffusers folder")
    p.add_argument("--to", required=True, dest="dst", help="X.safetensors (the weights) or a folder (a bundle)")
    p.add_argument("--preset", choices=PRESETS, help="bundle: the diffusion preset the model must match (sa-open)")
    p.add_argument("--t5", help="bundle: the T5 encoder folder with its tokenizer (default: a diffusers folder's own)")
    models = sub.add_parser("models", help="model presets")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    p = command(models_sub, "summary", commands.models_summary, "parameter counts of a preset")
    p.add_argument("preset", choices=PRESETS)
    p.add_argument("--json", action="store_true")
    p = command(sub, "demo", _demo, "the whole system on the demo music dataset")
    p.add_argument("--state-dir", default=".longplay", help="stack state; the demo writes under STATE_DIR/demo")
    p.add_argument("--minutes", type=float, default=None, help="minutes of music to render (default: the preset's)")
    p.add_argument("--quick", action="store_true", help="a smaller run for tests: fewer minutes and steps")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides come anywhere (argparse stops taking positionals after options).

    ``longplay preprocess SRC OUT --vae V a.b=1`` leaves ``a.b=1`` unparsed; it joins ``args.overrides``.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in item and not item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
    except UsageError as err:
        print(f"longplay: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    allocator.tune()  # generation, evaluation and the demo's driver: freed tensor buffers stay in the heap
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = args.handler(args)
    except (ConfigError, UsageError) as err:
        print(f"longplay: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("longplay: interrupted", file=sys.stderr)
        return EXIT_FAILED
    return int(code or 0)


# ----------------------------------------------------------------------------- stack, submit and jobs handlers
def stack_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    print(f"starting the local stack under {state_dir}/ ...", file=sys.stderr)
    try:
        env = stack.up(state_dir, num_cpus=args.num_cpus)
    except stack.StackError as err:
        print(f"longplay: stack up failed: {err}", file=sys.stderr)
        return 1
    state = stack.StackState.load(state_dir.resolve())
    print(
        f"S3 http://127.0.0.1:{state.ports['s3']}  MLflow http://127.0.0.1:{state.ports['mlflow']}  "
        f"Ray dashboard http://127.0.0.1:{state.ports['ray_dashboard']}\n"
        f"# the block below is also in {state_dir}/credentials.env (mode 0600); to use it: "
        f"eval $(longplay stack up) or source {state_dir}/credentials.env",
        file=sys.stderr,
    )
    print(stack.export_block(env))
    return 0


def stack_down(args: argparse.Namespace) -> int:
    stopped = stack.down(Path(args.state_dir))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"), file=sys.stderr)
    return 0


def stack_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    state = stack.StackState.load(state_dir)
    if not state.ports:
        print(f"no stack under {state_dir}")
        return 1
    health = stack.health(state_dir)
    urls = {
        "s3": f"http://127.0.0.1:{state.ports['s3']}",
        "mlflow": f"http://127.0.0.1:{state.ports['mlflow']}",
        "ray": f"http://127.0.0.1:{state.ports['ray_dashboard']}",
    }
    for name, ok in health.items():
        print(f"{name:8s} {'healthy' if ok else 'DOWN':8s} {urls[name]}")
    nodes = raynode.node_health(state_dir)
    for name, ok in nodes.items():
        print(f"{name:8s} {'healthy' if ok else 'DOWN':8s} Ray node joined to the head")
    return 0 if all(health.values()) and all(nodes.values()) else 1


def stack_join(args: argparse.Namespace) -> int:
    """Start another Ray node on this machine, joined to the stack's head (a local two-node cluster)."""
    try:
        name = raynode.join(Path(args.state_dir), num_cpus=args.num_cpus)
    except stack.StackError as err:
        print(f"longplay: stack join failed: {err}", file=sys.stderr)
        return 1
    print(f"joined {name} ({args.num_cpus} CPUs) to the Ray head; `longplay stack leave {name}` stops it")
    return 0


def stack_leave(args: argparse.Namespace) -> int:
    """Stop a node ``stack join`` started (all of them without a name); the head and services stay up."""
    try:
        stopped = raynode.leave(Path(args.state_dir), args.name)
    except stack.StackError as err:
        print(f"longplay: stack leave failed: {err}", file=sys.stderr)
        return 1
    print("stopped: " + (", ".join(stopped) if stopped else "no joined node was running"), file=sys.stderr)
    return 0


def submit(args: argparse.Namespace) -> int:
    import os

    from infra import submit as submit_mod

    try:
        job_id, status = submit_mod.submit(list(args.argv), dict(os.environ), wait=not args.no_wait)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") and (args.no_wait or status == "SUCCEEDED") else 1


def jobs(args: argparse.Namespace) -> int:
    from infra import submit as submit_mod
    from pipeline import cluster

    client = cluster.job_client()
    if args.action == "status":
        print(client.get_job_status(args.job_id))
    elif args.action == "logs":
        if args.follow:
            status = submit_mod.follow(client, args.job_id)
            return 0 if status == "SUCCEEDED" else 1
        sys.stdout.write(client.get_job_logs(args.job_id))
    else:
        print("stopped" if client.stop_job(args.job_id) else "not running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
