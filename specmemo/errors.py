"""The few domain errors a user can meet. The CLI shows each as one line."""


class SpecmemoError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInput(SpecmemoError):
    """A value the user gave that cannot be used (size, length, option)."""


class UnknownModel(SpecmemoError):
    """A model argument that is neither an alias, a model directory, a GGUF file nor a reachable hub id."""


class UnsupportedModel(SpecmemoError):
    """A model whose architecture specmemo cannot run exactly (e.g. sliding-window attention)."""


class UnknownDevice(SpecmemoError):
    """A device profile name that does not exist, or a device that is not present."""


class IncompatibleDraft(SpecmemoError):
    """A draft model whose vocabulary differs from the target's."""


class BudgetExceeded(SpecmemoError):
    """The request does not fit the memory budget. Exit code 3, as the README documents (2 is
    the exit code of usage errors)."""

    exit_code = 3

    def __init__(self, message: str, plan=None):
        super().__init__(message)
        self.plan = plan
