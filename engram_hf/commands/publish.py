"""`engram-hf publish`: validate a converted folder and upload it to the Hub."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..conversion.publish import publish

    result = publish(
        args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
        dry_run=args.dry_run, token=args.token, allow_extra=args.allow_extra,
    )
    if args.dry_run:
        print(f"dry run: would upload {len(result)} files from {args.folder} to {args.repo_id}"
              f"{' (revision ' + args.revision + ')' if args.revision else ''}{' as a pull request' if args.create_pr else ''}:")
        for name in result:
            print(f"  {name}")
    else:
        print(f"uploaded {args.folder} to {getattr(result, 'commit_url', None) or args.repo_id}")
        if getattr(result, "pr_url", None):
            print(f"pull request: {result.pr_url}")
    return 0


def add_parser(commands) -> None:
    publish = commands.add_parser("publish", help="validate a converted folder and upload it to the Hub")
    publish.add_argument("folder")
    publish.add_argument("--repo-id", required=True)
    publish.add_argument("--private", action="store_true")
    publish.add_argument("--revision", default=None)
    publish.add_argument("--create-pr", action="store_true")
    publish.add_argument("--dry-run", action="store_true", help="validate and list the files, upload nothing")
    publish.add_argument("--token", default=None)
    publish.add_argument("--allow-extra", action="store_true",
                         help="also upload pickle-format files and executable files that are not the remote code")
    publish.set_defaults(run=run)
