"""``distill push RUN_DIR REPO_ID [--private]``: a trained student on the Hugging Face Hub (see :mod:`distill.hub`)."""

from __future__ import annotations

import argparse


def push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR",
                        help="a run directory (its checkpoints/best.pt), a best.pt, or a saved student directory")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repository, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dataset", metavar="HUB_DATASET_ID",
                        help="the Hub dataset the student was trained on, for the model card's front matter")
    parser.add_argument("--license", help="license identifier for the model card (e.g. apache-2.0)")
    parser.add_argument("--message", help="commit message (default: 'Upload <student> (rtdistill)')")
    parser.add_argument("--dir", metavar="DIR",
                        help="build the Hub directory here and keep it (default: a temporary directory)")
    parser.add_argument("--dry-run", action="store_true",
                        help="only build the directory (needs --dir): nothing is uploaded")
    parser.add_argument("--token", help="Hub token (default: huggingface_hub's own: HF_TOKEN or `hf auth login`)")


def push(args: argparse.Namespace) -> int:
    from distill.errors import UserError
    from distill.hub import push_to_hub, save_hub_dir

    if args.dry_run:
        if not args.dir:
            raise UserError("--dry-run builds the directory only: name it with --dir DIR")
        out = save_hub_dir(args.run, args.dir, repo_id=args.repo_id, dataset=args.dataset, license=args.license)
        print(f"wrote the Hub directory {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))}); "
              f"nothing uploaded (--dry-run)")
        return 0
    result = push_to_hub(args.run, args.repo_id, private=args.private, token=args.token, dataset=args.dataset,
                         license=args.license, commit_message=args.message, keep_dir=args.dir)
    print(f"uploaded {', '.join(result['files'])} to {result['url']}")
    if result["commit_url"]:
        print(f"commit: {result['commit_url']}")
    return 0
