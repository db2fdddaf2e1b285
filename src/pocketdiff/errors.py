"""User-facing errors: one line that names the problem and the fix; the CLI exits 2 on them."""


class PocketdiffError(Exception):
    """An error caused by the user's input (a file, a flag, a prompt), shown without a traceback."""


class ModelFolderError(PocketdiffError):
    """A model folder is missing a part, holds a corrupt or mismatched file, or needs pickle."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the tokenizer's limit and was cut."""
