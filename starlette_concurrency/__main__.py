"""Command line: ``python -m starlette_concurrency journal PATH list | retry ID | purge``.

``list`` shows the journal's pending entries (with their owner and lease) and its dead ones (with the
reason); ``retry ID`` moves a dead entry back to pending, so that the next facade to start on the
journal runs it (after the fix that made it fail has been deployed); ``purge`` deletes the dead entries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from ._exceptions import ConfigurationError
from ._journal import Entry, Journal


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0: done, 1: nothing to act on, 2: bad input)."""
    parser = argparse.ArgumentParser(prog="python -m starlette_concurrency", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    journal = commands.add_parser("journal", help="inspect and act on a journal of deferred work")
    journal.add_argument("path", help="the journal file (Concurrency(journal=...))")
    actions = journal.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list pending and dead entries")
    retry = actions.add_parser("retry", help="move a dead entry back to pending: the next start runs it")
    retry.add_argument("id", type=int, help="the dead entry's id (see list)")
    actions.add_parser("purge", help="delete every dead entry")
    arguments = parser.parse_args(argv)

    if not os.path.isfile(arguments.path):
        print(f"error: no journal at {arguments.path!r}", file=sys.stderr)
        return 2
    try:
        store = Journal(arguments.path)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if arguments.action == "list":
            _list(store)
        elif arguments.action == "retry":
            if not store.retry(arguments.id):
                print(f"no dead entry {arguments.id} in {arguments.path}", file=sys.stderr)
                return 1
            print(f"entry {arguments.id} is pending again: the next facade to start on {arguments.path} runs it")
        else:
            print(f"purged {store.purge()} dead entr(y/ies) from {arguments.path}")
    finally:
        store.close()
    return 0


def _list(store: Journal) -> None:
    pending, dead = store.entries(), store.dead_entries()
    now = time.time()
    print(f"pending: {len(pending)}")
    for entry, owner, expires in pending:
        lease = f"lease {expires - now:.0f} s left" if expires > now else "lease expired"
        print(f"  {_describe(entry)}  owner {owner or '-'} ({lease})")
    print(f"dead: {len(dead)}")
    for entry in dead:
        print(f"  {_describe(entry)}  reason: {entry.reason}")


def _describe(entry: Entry) -> str:
    request = f"  {entry.method} {entry.path}" if entry.method or entry.path else ""
    key = f"  key {entry.user_key!r}" if entry.user_key else ""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
    return f"#{entry.id}  {entry.label}{request}{key}  {entry.driver}  created {created}  attempts {entry.attempts}"


if __name__ == "__main__":
    sys.exit(main())
