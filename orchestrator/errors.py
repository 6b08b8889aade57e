"""User-facing errors: one line that names the field, file or teacher and what to do."""


class DistillError(Exception):
    """An error caused by the user's input (config, data, teacher, store).

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
