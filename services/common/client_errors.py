"""Client side of the problem-details contract: one error type for every service's
typed client, raised for any 4xx/5xx with the body the server sent."""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{status}: {problem.get('detail') or problem}")
        self.status, self.problem = status, problem

    @property
    def reasons(self) -> list[str]:
        return list(self.problem.get("reasons", []))


def raise_for_problem(r: httpx.Response, error: type[ApiError] = ApiError) -> httpx.Response:
    if r.status_code >= 400:
        try:
            problem = r.json()
        except ValueError:
            problem = {"detail": r.text}
        raise error(r.status_code, problem)
    return r
