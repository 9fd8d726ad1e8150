"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


def parse_json_object(text: str, where: str) -> dict:
    """`text` parsed as a JSON object, or a one-line UserError naming `where` (a file:line, a flag)."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value
