"""`shallow`: one command line, a subcommand per process. Each subcommand imports only what it needs."""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import subprocess
import sys

from shared.errors import ConfigError, ModelNotFound, RedisUnavailable, ShallowError
from shared.protocol import Mode
from shared.settings import Settings, keep_compiled_kernels

logger = logging.getLogger("shallow")

NOISY = ("httpx", "httpcore", "urllib3", "filelock", "transformers", "huggingface_hub", "datasets", "rq.worker", "discord")


def configure_logging(default: str = "INFO", quiet_rq: bool = False) -> None:
    level = os.environ.get("SHALLOW_LOG_LEVEL", default).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    if not quiet_rq:
        logging.getLogger("rq.worker").setLevel(logging.getLogger().level)


def _default_channel() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "local"
    return f"console:{user}"


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("INFO")
    if args.slots:
        from dataclasses import replace

        settings = replace(settings, slots=args.slots)
        os.environ["SHALLOW_SLOTS"] = str(args.slots)  # for the worker processes a supervisor starts
    if args.fronts is not None:
        from dataclasses import replace

        if args.fronts < 0:
            raise ConfigError(f"--fronts must be 0 or more, got {args.fronts}")
        settings = replace(settings, fronts=args.fronts)
        os.environ["SHALLOW_FRONTS"] = str(args.fronts)  # for the worker processes a supervisor starts
    gpus = [g.strip() for g in (args.gpus or "").split(",") if g.strip()]
    supervising = (args.processes and args.processes > 1) or gpus  # the workers it starts each load the model
    from worker.remote import ENV_ADDRESS

    if settings.backend == "unsloth" and not supervising and not os.environ.get(ENV_ADDRESS):  # (a front does not)
        import_unsloth_first()
    if supervising:
        from worker.supervisor import supervise

        return supervise(args.processes, gpus, args.name)
    from worker.main import run

    return run(settings, burst=args.burst, name=args.name)


def _console(settings: Settings, channel: str, **kwargs):
    from bots.console import Console
    from shared.client import TurnClient

    return Console(TurnClient(settings), channel, **kwargs)


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("WARNING")
    console = _console(settings, args.channel)
    console.client.store.set_mode(args.channel, Mode.CHAT)  # plain messages are chat turns here
    return console.run()


def cmd_story(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("WARNING")
    console = _console(settings, args.channel)
    console.handle("/story " + " ".join(args.title))
    return console.run()


def cmd_telegram(args: argparse.Namespace, settings: Settings) -> int:
    from bots.telegram_bot import run

    configure_logging("INFO")
    return run(settings)


def cmd_discord(args: argparse.Namespace, settings: Settings) -> int:
    from bots.discord_bot import run

    configure_logging("INFO")
    return run(settings)


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from bots.web import run
    except ModuleNotFoundError as exc:
        if exc.name != "gradio":
            raise
        raise ConfigError("shallow web needs Gradio: pip install 'shallow[web]' (./scripts/setup installs it)") from None

    configure_logging("INFO")
    return run(settings, host=args.host, port=args.port)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("WARNING")
    if args.rest[:1] == ["train"]:
        from bench.train import main as train_main

        return train_main(args.rest[1:])
    from bench.serve import main  # --direct with SHALLOW_BACKEND=unsloth: the backend imports unsloth before trl,
    # transformers and peft are (tests/training/test_train.py::test_shallow_bench_direct_imports_unsloth_first...)

    return main(args.rest, settings)


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("WARNING")
    from training.export import main

    return main(args.rest, settings)


def asked_backend(argv: list[str]) -> str:
    """The training backend that `shallow train`/`sweep` flags ask for: --backend on the command line, else in the
    --config YAML, else auto. Read before trl's parser, which imports trl; that parser checks the values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    backend = known.backend
    if backend is None and known.config:
        import yaml

        try:
            with open(known.config, encoding="utf-8") as f:
                backend = (yaml.safe_load(f) or {}).get("backend")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):  # trl's parser says what is wrong with it
            backend = None
    return str(backend or "auto").lower()


def import_unsloth_first() -> None:
    """unsloth patches transformers, trl and peft as it is imported: trl's SFTTrainer becomes its UnslothSFTTrainer
    (its own data preparation and batching; 11.6 GiB peak for the epoch's settings on an H100 where trl's took 17.05
    on another), among much else. Imported after them, the unpatched classes run, with only a warning: until session
    28 the GPU training runs here took trl's own SFTTrainer. So a process that will run unsloth imports it first."""
    if "unsloth" in sys.modules:
        return
    late = [name for name in ("trl", "transformers", "peft") if name in sys.modules]
    if late:  # this module imports none of them: a caller did
        logger.warning("unsloth is imported after %s: their unpatched classes may run", ", ".join(late))
    try:
        import unsloth  # noqa: F401 - imported for its patches
    except ImportError:  # the backend's own check says what to install
        pass


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from training import unsloth_backend

    if unsloth_backend(asked_backend(args.rest)):
        import_unsloth_first()
    from training.train import main

    configure_logging("INFO")
    return main(args.rest)


def cmd_sweep(args: argparse.Namespace, settings: Settings) -> int:
    from training import unsloth_backend

    if unsloth_backend(asked_backend(args.rest)):
        import_unsloth_first()
    from training.sweep import main

    configure_logging("INFO")
    return main(args.rest)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("WARNING")
    from shared.client import TurnClient

    st = TurnClient(settings).status()
    if args.json:
        print(json.dumps(st))
    else:
        print(f"queue {st['queue']}: {st['queued']} waiting, {st['running']} running, {st['failed']} failed")
        workers = st["workers"]
        print(f"{len(workers)} worker(s) alive" + (":" if workers else ""))
        for w in workers:
            print(f"  {w['name']}: {w['state']}" + (f" (job {w['job']})" if w["job"] else ""))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Embedded Redis (unless REDIS_URL is set) + one worker process + the terminal chat."""
    from dataclasses import replace

    from shared.redis_conn import EmbeddedRedis

    configure_logging("WARNING")
    embedded = None
    worker = None
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(settings.home / "redis")
            settings = replace(settings, redis_url=embedded.start())
            print(f"Redis: embedded server, data in {embedded.data_dir}", flush=True)
        log_path = settings.home / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, REDIS_URL=settings.redis_url)
        log = open(log_path, "ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C in the chat must not kill the worker mid-reply
        )
        print(f"Worker: pid {worker.pid}, loading {settings.base_model} (log: {log_path})", flush=True)

        def worker_problem() -> str | None:
            if worker.poll() is None:
                return None
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            return f"the worker exited with code {worker.returncode}: " + " | ".join(tail)

        channel = args.channel
        console = _console(
            settings, channel, worker_problem=worker_problem,
            no_worker_note="the worker is still loading the model: your message waits in the queue",
        )
        if args.story:
            console.handle("/story " + " ".join(args.story))
        else:
            console.client.store.set_mode(channel, Mode.CHAT)
            if sys.stdin.isatty():
                print("Chat with the model; /story <title> plays an adventure, /help lists commands.", flush=True)
        return console.run()
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if embedded is not None:
            embedded.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shallow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="load the model once and serve the queue (an RQ SimpleWorker)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--name", help="the worker's name in Redis (default: RQ's host.pid-based name)")
    p.add_argument("--processes", type=int, help="run N worker processes on this box (each loads the model once)")
    p.add_argument("--slots", type=int, help="replies one process writes at once (SHALLOW_SLOTS; with SHALLOW_BACKEND=batched)")
    p.add_argument("--gpus", help="comma-separated GPU ids: one worker process per GPU (or --processes spread over them)")
    p.add_argument("--fronts", type=int, help="hold the model in this process and run the jobs in N processes of their "
                   "own, --slots shared among them (SHALLOW_FRONTS; batched backend)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("chat", help="chat in the terminal through the queue (needs a worker)")
    p.add_argument("--channel", default=_default_channel(), help="conversation name; kept across runs")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("story", help='play a choose-your-own-adventure in the terminal: shallow story "The Lost Crown"')
    p.add_argument("title", nargs="*", help="the story's title")
    p.add_argument("--channel", default=_default_channel(), help="conversation name; kept across runs")
    p.set_defaults(func=cmd_story)

    p = sub.add_parser("demo", help="everything on this machine: embedded Redis, a worker, and the terminal chat")
    p.add_argument("--channel", default="console:demo", help="conversation name; kept across runs")
    p.add_argument("--story", nargs="+", metavar="TITLE", help="start with a story instead of a chat")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("telegram", help="the Telegram bot (TELEGRAM_BOT_TOKEN; TELEGRAM_BASE_URL for a local Bot API server)")
    p.set_defaults(func=cmd_telegram)

    p = sub.add_parser("discord", help="the Discord bot (DISCORD_BOT_TOKEN; DISCORD_API_BASE_URL, DISCORD_GATEWAY_URL for a proxy)")
    p.set_defaults(func=cmd_discord)

    p = sub.add_parser("web", help="the Chat and Story pages in a browser (Gradio; 127.0.0.1:7860 unless set)")
    p.add_argument("--host", help="address to listen on (SHALLOW_WEB_HOST, default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (SHALLOW_WEB_PORT, default 7860)")
    p.set_defaults(func=cmd_web)

    # train and sweep parse their own flags (trl's parser: dataclasses + YAML); they get the rest as is
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (resumes by itself; shallow train --help)", add_help=False)
    p.set_defaults(func=cmd_train, passthrough=True)

    p = sub.add_parser("sweep", help="the lab's hyperparameter study, with plots (shallow sweep --help)", add_help=False)
    p.set_defaults(func=cmd_sweep, passthrough=True)

    p = sub.add_parser("bench", help="how fast this box serves: tokens/s, time to first token, queue wait (shallow bench --help)",
                       add_help=False)
    p.set_defaults(func=cmd_bench, passthrough=True)

    p = sub.add_parser("export", help="base + adapter merged into one GGUF file for llama.cpp (shallow export gguf --help)",
                       add_help=False)
    p.set_defaults(func=cmd_export, passthrough=True)

    p = sub.add_parser("status", help="queue depth, workers alive, jobs running and failed")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts and health checks")
    p.set_defaults(func=cmd_status)
    return parser


EXIT_CODES = {RedisUnavailable: 2, ConfigError: 2, ModelNotFound: 3}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        settings = Settings.from_env()
        keep_compiled_kernels(settings.cache_dir)  # before anything compiles a kernel (worker, train, bench)
        return int(args.func(args, settings) or 0)
    except ShallowError as exc:
        print(f"shallow {args.command}: {exc}", file=sys.stderr)
        return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
