"""Checks of our own for scripts/schemathesis, on top of Schemathesis' built-in ones."""

import schemathesis

# The UI's creates, one per kind: each answers 503 `runtime is offline` for an offline runtime.
CREATES = {
    "/api/runtimes/{runtimeId}/models",
    "/api/runtimes/{runtimeId}/local-skills",
    "/api/runtimes/{runtimeId}/local-skills/import",
    "/api/runtimes/{runtimeId}/update",
}


@schemathesis.check
def only_offline_runtime_is_unavailable(ctx, response, case):
    """A 5xx is allowed only as 503 `runtime is offline` on a create of any kind (see
    schemathesis.toml); nothing else may answer 5xx in a run without store outages."""
    if response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        body = response.text
    offline = (
        case.method.upper() == "POST"
        and case.operation.path in CREATES
        and response.status_code == 503
        and body == {"error": "runtime is offline"}
    )
    if not offline:
        raise AssertionError(f"{response.status_code} {body!r} on {case.method} {case.formatted_path}")
    return None
