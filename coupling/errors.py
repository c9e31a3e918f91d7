"""One-line error messages: the project reports every failure in one line."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says what to do."""
