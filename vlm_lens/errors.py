"""One error family: every refusal of bad input is a :class:`VLMLensError` whose message names the fix.

Each class also derives from the built-in error a caller would expect (``ValueError``, ``FileNotFoundError``,
``KeyError``, ``TypeError``, ``IndexError``), so ``except ValueError`` keeps working. The CLI maps the family to exit
code 2 with one line on stderr (bad input), and anything else to exit 1 (a failed run); ``--debug`` shows tracebacks.
"""

from __future__ import annotations


class VLMLensError(Exception):
    """Bad input or a refused operation; the message says what to do instead."""


class InputError(VLMLensError, ValueError):
    """A value vlm-lens cannot use (an empty prompt, a reversed layer range, a NaN learning rate...)."""


class InputTypeError(VLMLensError, TypeError):
    """An argument of the wrong kind (a string where a model was expected...)."""


class NotFoundError(VLMLensError, FileNotFoundError):
    """A file, folder or model that is not there (nothing is ever downloaded)."""


class UnknownNameError(VLMLensError, KeyError):
    """A hook name, cache key or token the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; ours is a sentence
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(VLMLensError, IndexError):
    """An index outside what the model or the data has (a layer, a step)."""


class ShapeError(InputError):
    """A tensor of the wrong shape: a hook's output, a tuned lens's weights."""


class LensFileError(InputError):
    """A tuned-lens folder whose files are missing, malformed, of the wrong shape or not finite."""


class VocabularyError(InputError):
    """A token or word that is not in the model's vocabulary."""


class PositionLimitError(InputError):
    """A prompt, or a prompt plus its generation, longer than the model's position limit."""


class RemoteCodeError(InputError):
    """A checkpoint that needs its own Python code (``auto_map``), which vlm-lens never runs unless asked."""
