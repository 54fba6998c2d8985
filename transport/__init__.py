"""Frames, messages, the TCP server and the Python client; never imports `actors/`."""

from transport import messages as messages  # first: messages_ops (protocol 1.1) subclasses its Message
