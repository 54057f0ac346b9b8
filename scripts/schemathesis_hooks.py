"""Checks of our own for scripts/schemathesis, on top of Schemathesis' built-in ones."""

import schemathesis


@schemathesis.check
def only_offline_runtime_is_unavailable(ctx, response, case):
    """A 5xx is allowed only as 503 `runtime is offline` on POST …/models (see
    schemathesis.toml); nothing else may answer 5xx in a run without store outages."""
    if response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        body = response.text
    offline = (
        case.method.upper() == "POST"
        and case.operation.path == "/api/runtimes/{runtimeId}/models"
        and response.status_code == 503
        and body == {"error": "runtime is offline"}
    )
    if not offline:
        raise AssertionError(f"{response.status_code} {body!r} on {case.method} {case.formatted_path}")
    return None
