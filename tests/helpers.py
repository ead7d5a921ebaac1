"""Helpers shared by the test modules."""


def one_line_error(excinfo) -> str:
    """The message of a raised error, asserted to be one non-empty line."""
    message = str(excinfo.value)
    assert message, "empty error message"
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message
