"""Serve the pipeline on one machine with a cron schedule (same as `streamtune serve`).

    python deployments/serve.py params.yaml --cron "0 3 * * *"

Scheduled runs are incremental and continue from the latest adapter unless the YAML says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("params", type=Path, help="YAML file with pipeline parameters")
    parser.add_argument("--cron", default="0 3 * * *")
    parser.add_argument("--timezone", default="UTC", help="IANA time zone of the schedule")
    parser.add_argument("--name", default="streamtune-scheduled")
    args = parser.parse_args(argv)
    params = yaml.safe_load(args.params.read_text()) or {}
    from flows.pipeline import serve

    serve(cron=args.cron, parameters=params, name=args.name, timezone=args.timezone)


if __name__ == "__main__":
    main()
