"""Errors that the CLI turns into one clear line (no traceback) for the user."""

from __future__ import annotations


class ExpertmixError(Exception):
    """Base class: a problem with the user's input, files or configuration."""


class DataError(ExpertmixError):
    """Input data that cannot be read: names the file, the line and the field."""


class CardError(ExpertmixError):
    """An expert card (README.md front matter) that is missing or malformed."""


class IncompatibleExpertError(ExpertmixError):
    """An expert that does not fit a mix: names the field that differs."""


class StoreError(ExpertmixError):
    """A registry or local-store problem: unknown name, revision or a broken repo."""


class OutputExistsError(ExpertmixError, FileExistsError):
    """An output folder exists already, or another process is writing it."""
