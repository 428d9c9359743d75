"""The learner's progress: ``GET /v1/me/progress?weeks=1..104`` (default 12), owner-scoped.

The numbers and their exact definitions are :mod:`storage.progress`'s; this module parses the
query, calls it and shapes the JSON of API.md::

    {"weeks": [{"week": "2026-03-02", "sessions", "minutes_spoken", "positive_sessions",
                "scores": {"fluency", "vocabulary", "grammar", "task"}}, ...],   oldest first
     "totals": {"sessions", "minutes_spoken", "positive_sessions", "positive_share",
                "rated_sessions", "scores": {...}, "trend": {...}}}
"""

from __future__ import annotations

import re
from typing import Any, Final

from aiohttp import web

from relay.api.deps import current_principal
from relay.errors import BadRequest
from relay.keys import DATABASE
from storage import progress

__all__ = ["parse_weeks", "progress_view", "routes"]

routes = web.RouteTableDef()

# ASCII digits only: str.isdigit() would also take "²" or Arabic-Indic digits.
_WEEKS: Final = re.compile(r"[0-9]{1,3}")


def parse_weeks(raw: str | None) -> int:
    """``?weeks=``: absent means the default; anything but an integer in range is a 422 naming it."""
    if raw is None:
        return progress.DEFAULT_WEEKS
    if not _WEEKS.fullmatch(raw) or not 1 <= int(raw) <= progress.MAX_WEEKS:
        raise BadRequest(
            f"weeks: must be an integer from 1 to {progress.MAX_WEEKS}", code="invalid_request", field="weeks"
        )
    return int(raw)


def progress_view(report: progress.Progress) -> dict[str, Any]:
    totals = report.totals
    return {
        "weeks": [
            {
                "week": week.week.isoformat(),
                "sessions": week.sessions,
                "minutes_spoken": week.minutes_spoken,
                "positive_sessions": week.positive_sessions,
                "scores": week.scores,
            }
            for week in report.weeks
        ],
        "totals": {
            "sessions": totals.sessions,
            "minutes_spoken": totals.minutes_spoken,
            "positive_sessions": totals.positive_sessions,
            "positive_share": totals.positive_share,
            "rated_sessions": totals.rated_sessions,
            "scores": totals.scores,
            "trend": totals.trend,
        },
    }


@routes.get("/v1/me/progress")
async def get_progress(request: web.Request) -> web.Response:
    """Sessions, minutes spoken, positive ratings and scores per week, with totals and trends."""
    principal = await current_principal(request)
    weeks = parse_weeks(request.query.get("weeks"))
    async with request.app[DATABASE].sessions() as s:
        report = await progress.user_progress(s, principal.user_id, weeks=weeks)
    return web.json_response(progress_view(report), headers={"Cache-Control": "no-store"})
