"""The few exceptions that mean something to a user. Each carries a message fit to show as is."""
from __future__ import annotations


class ShallowError(Exception):
    """Base class: the message is written for the person running or using the bot."""


class ConfigError(ShallowError):
    """A setting is missing or malformed."""


class RedisUnavailable(ShallowError):
    """Redis cannot be reached at REDIS_URL."""


class BadInput(ShallowError):
    """A user's message, title or command cannot be taken as it is."""


class ChannelBusy(ShallowError):
    """A reply is still being written in this channel; one turn at a time."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class ModelNotFound(ShallowError):
    """A base model or adapter path or id does not exist."""
