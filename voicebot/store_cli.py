"""``voicebot history`` and ``voicebot db {migrate,prune,url}``.

The main CLI calls ``register(app)``; ``python -m voicebot.store_cli`` runs these commands
alone (handy for ``history --follow`` in a second terminal). The commands read their settings
through the click context: ``ctx.obj`` is a ``SettingsFactory`` set by the app's callback
(``Settings`` from the environment when there is none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any
from uuid import UUID

import typer

from voicebot.console import fail
from voicebot.conversation import turn_dict
from voicebot.database import mask_dsn, open_database, start_database
from voicebot.errors import ConfigError
from voicebot.settings import Settings
from voicebot.store import StoredTurn, follow_stored_turns, get_stored_turns, prune

logger = logging.getLogger(__name__)

SettingsFactory = Callable[[], Settings]

db_app = typer.Typer(help="The conversation database (PostgreSQL).", no_args_is_help=True)


def register(app: typer.Typer, get_settings: SettingsFactory | None = None) -> None:
    """Add ``history`` and the ``db`` group to ``app``.

    With ``get_settings``, ``app`` gets a callback that hands it to the commands; without, the
    app's own callback sets ``ctx.obj`` (or the commands read the environment).
    """
    if get_settings is not None:

        @app.callback()
        def _settings_factory(ctx: typer.Context) -> None:
            ctx.obj = get_settings

    app.command("history")(history_command)
    app.add_typer(db_app, name="db")


def _settings(ctx: typer.Context) -> Settings:
    factory = ctx.obj  # click hands the app callback's obj down to every subcommand
    return factory() if callable(factory) else Settings()


# --- history -----------------------------------------------------------------------------------


def history_command(
    ctx: typer.Context,
    conversation: Annotated[
        str | None,
        typer.Option("--conversation", "-c", help="Only this conversation (its UUID)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="How many turns.")] = 20,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per turn and line, with timings.")
    ] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing turns as they are recorded.")
    ] = False,
) -> None:
    """Show the latest recorded turns, oldest first; --follow keeps printing new ones."""
    conversation_id: UUID | None = None
    if conversation is not None:
        try:
            conversation_id = UUID(conversation)
        except ValueError:
            raise typer.BadParameter(
                f"not a conversation id: {conversation!r}", param_hint="--conversation"
            ) from None
    try:
        with open_database(_settings(ctx)) as db:
            if follow:
                try:
                    asyncio.run(_follow(db.dsn, conversation_id, limit, as_json))
                except KeyboardInterrupt:
                    pass
                return
            with db.connect() as conn:
                turns = get_stored_turns(conn, conversation_id, limit)
            for stored in turns:
                typer.echo(_format(stored, as_json))
    except ConfigError as e:
        fail(e)


async def _follow(dsn: str, conversation_id: UUID | None, backlog: int, as_json: bool) -> None:
    async for stored in follow_stored_turns(dsn, conversation_id, backlog=backlog):
        typer.echo(_format(stored, as_json))


def turn_json(stored: StoredTurn) -> dict[str, Any]:
    """The ``--json`` form of one turn: ``turn_dict`` plus when its row was written."""
    return turn_dict(stored.turn) | {"created_at": stored.created_at.isoformat()}


def _format(stored: StoredTurn, as_json: bool) -> str:
    if as_json:
        return json.dumps(turn_json(stored), ensure_ascii=False)
    turn = stored.turn
    when = turn.started_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    head = f"{when}  {str(turn.conversation_id)[:8]} #{turn.sequence}"
    notes = []
    if turn.timings.v2v_ms is not None:
        notes.append(f"v2v {turn.timings.v2v_ms:.0f} ms")
    if turn.interrupted:
        notes.append("interrupted")
    if turn.error:
        notes.append(f"error: {turn.error}")
    suffix = f"  [{'; '.join(notes)}]" if notes else ""
    indent = " " * len(head)
    return f"{head}  user:  {turn.user_text}\n{indent}  agent: {turn.assistant_text}{suffix}"


# --- db ----------------------------------------------------------------------------------------


@db_app.command("migrate")
def migrate_command(ctx: typer.Context) -> None:
    """Apply pending schema migrations (start-up does this too)."""
    try:
        with open_database(_settings(ctx), migrate=False) as db:
            applied = db.migrate()
    except ConfigError as e:
        fail(e)
    if applied:
        typer.echo(f"applied migrations {', '.join(f'{v:04d}' for v in applied)}")
    else:
        typer.echo("schema up to date")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` → timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: use a number and a unit s, m, h, d or w, e.g. 30d")
    return timedelta(**{_UNITS[match[2]]: float(match[1])})


@db_app.command("prune")
def prune_command(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age, e.g. 30d, 12h, 2w.", show_default=True)
    ] = "30d",
) -> None:
    """Delete conversations (and their turns) with no activity for longer than the given age."""
    age = parse_duration(older_than)
    try:
        with open_database(_settings(ctx)) as db, db.connect() as conn:
            deleted = prune(conn, age)
    except ConfigError as e:
        fail(e)
    typer.echo(f"deleted {deleted} conversation{'s' if deleted != 1 else ''} older than {age}")


@db_app.command("url")
def url_command(ctx: typer.Context) -> None:
    """Print the DSN in use (password masked)."""
    settings = _settings(ctx)
    if settings.database_url is not None:
        typer.echo(mask_dsn(settings.database_url.get_secret_value()))
        return
    try:
        db = start_database(settings, migrate=False)
    except ConfigError as e:
        fail(e)
    try:
        typer.echo(db.display_dsn)
        typer.echo(
            f"(embedded server, data dir {db.data_dir}; it runs while a voicebot process uses it)",
            err=True,
        )
    finally:
        db.stop()


def main() -> None:
    """Entry point of ``python -m voicebot.store_cli``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(no_args_is_help=True, help="voicebot conversation history and database.")
    register(app)
    app()


if __name__ == "__main__":
    main()
