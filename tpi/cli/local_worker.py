"""`python -m tpi.cli.local_worker`: a local worker, as `tpi serve --local-workers` starts (and restarts) it.

The same worker as `tpi join` (tpi.cli.group.run_join), with only the options the master passes and the
token from TPI_TOKEN (never argv), read by argparse: typer's parser imports pydantic, ~0.4 s of CPU, and
a restarted local worker's start-up is most of the pause a client sees (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tpi.cli import setup_logging
from tpi.cli.group import read_token, run_join
from tpi.errors import TpiError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpi.cli.local_worker",
                                     description="a local worker of tpi serve (the token comes from TPI_TOKEN)")
    parser.add_argument("master", help="HOST:PORT of the master")
    parser.add_argument("--name", required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--key-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--profile-file", type=Path)
    parser.add_argument("--memory-budget", type=int, help="bytes")
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run_join(args.master, read_token(os.environ.get("TPI_TOKEN", ""), None), args.name, args.cache_dir,
                 args.key_dir, threads=args.threads, backend=args.backend, memory_budget=args.memory_budget,
                 insecure=args.insecure, profile_file=args.profile_file)
    except TpiError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
