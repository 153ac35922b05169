"""``voicebot reservations [--date D] [--json]``: the bookings the reservation tools took."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from voicebot.errors import ConfigError, StageError
from voicebot.settings import Settings

SettingsFactory = Callable[[], Settings]

JSON_FIELDS = (
    "name",
    "date",
    "time",
    "party_size",
    "requests",
    "conversation_id",
    "created_at",
    "restaurant",
    "id",
)
"""The keys of one ``--json`` line (and of the API's objects)."""


def register(app: typer.Typer, get_settings: SettingsFactory) -> None:
    """Add the ``reservations`` command to ``app``; it reads settings through the factory."""

    def reservations(
        date: Annotated[
            str | None, typer.Option("--date", help="Only this day (YYYY-MM-DD).")
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="One JSON object per booking and line.")
        ] = False,
        limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="At most this many.")] = (
            1000
        ),
    ) -> None:
        """List the live bookings by date and time (cancelled ones are left out)."""
        show_reservations(get_settings(), date, as_json, limit)

    app.command("reservations")(reservations)


def reservation_json(reservation: Any) -> dict[str, Any]:
    """One booking as the CLI and the API print it."""
    full = reservation.as_json()
    return {key: full[key] for key in JSON_FIELDS}


def show_reservations(settings: Settings, date: str | None, as_json: bool, limit: int) -> None:
    from voicebot.database import open_database
    from voicebot.reservations.book import list_reservations
    from voicebot.reservations.rules import parse_day

    try:
        day = parse_day(date) if date is not None else None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--date") from None
    try:
        with open_database(settings) as db, db.connect() as conn:
            found = list_reservations(conn, day=day, limit=limit)
    except (ConfigError, StageError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for r in found:
        if as_json:
            typer.echo(json.dumps(reservation_json(r), ensure_ascii=False))
        else:
            requests = f"  ({r.requests})" if r.requests else ""
            typer.echo(
                f"{r.date.isoformat()} {r.time:%H:%M}  {r.party_size}  {r.name}{requests}"
                f"  [{r.restaurant}, call {str(r.conversation_id)[:8]}]"
            )
    if not found and not as_json:
        typer.echo("no bookings" + (f" on {day.isoformat()}" if day else ""), err=True)
