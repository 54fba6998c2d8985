"""Frame codec: `length: u32 big-endian | type: u8 | payload: MessagePack map`.

`FrameReader` is incremental: feed it whatever one `recv()` returned and it hands back every complete
frame in it, so a connection decodes all frames of one read at once (see docs/performance.md#batching).
It never buffers more than one frame of at most `max_frame_bytes`: a larger announced length is
reported at once, before its body is read. The first frame of a stream may have a lower limit
(`first_frame_limit`: before authentication only a HELLO is allowed), and `partial_length` exposes the
announced length of a frame as soon as its header is in, so the caller can reserve memory for the body
before reading it (see `transport.budget`).
"""

from __future__ import annotations

import struct

import msgspec

from transport.messages import (
    REQUEST_TYPES,
    RESPONSE_TYPES,
    Error,
    ErrorCode,
    Message,
)

HEADER = struct.Struct(">IB")
LENGTH = struct.Struct(">I")
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_generic_decoder = msgspec.msgpack.Decoder()
_request_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in REQUEST_TYPES.items()}
_response_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in RESPONSE_TYPES.items()}


class FrameError(Exception):
    """A framing violation after which the connection must be closed (BAD_FRAME, FRAME_TOO_LARGE).

    `frames` holds the complete frames decoded before the violation, in order: they are still answered.
    """

    def __init__(self, code: str, message: str, frames: list[tuple[int, bytes]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frames: list[tuple[int, bytes]] = frames if frames is not None else []


def encode_frame(msg: Message) -> bytes:
    """One complete frame for `msg`."""
    buf = bytearray(5)
    _encoder.encode_into(msg, buf, 5)
    HEADER.pack_into(buf, 0, len(buf) - 4, msg.type_byte)
    return bytes(buf)


def encode_frames(msgs: list[Message]) -> bytes:
    """All frames for `msgs` in one buffer, so a connection answers a batch with one `sendall`."""
    buf = bytearray()
    for msg in msgs:
        start = len(buf)
        buf.extend(b"\0\0\0\0\0")
        _encoder.encode_into(msg, buf, start + 5)
        HEADER.pack_into(buf, start, len(buf) - start - 4, msg.type_byte)
    return bytes(buf)


def encode_raw_frame(type_byte: int, payload: bytes) -> bytes:
    """A frame with an arbitrary type and payload (tests and the fuzzer use it)."""
    return HEADER.pack(len(payload) + 1, type_byte) + payload


class FrameReader:
    """Splits a byte stream into `(type_byte, payload)` frames."""

    __slots__ = ("_buf", "_limit", "_first_limit_code", "max_frame_bytes")

    SHRINK_BYTES = 1 << 20  # an emptied buffer that had grown past this is replaced, so its memory is freed

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, first_frame_limit: int | None = None,
                 first_frame_limit_error: tuple[str, str] | None = None) -> None:
        """`first_frame_limit` (if given) bounds the first frame only; later frames get `max_frame_bytes`.

        `first_frame_limit_error` is the (code, message) a too-large first frame is refused with; the
        message may use `{length}` and `{limit}`.
        """
        self._buf = bytearray()
        self.max_frame_bytes = max_frame_bytes
        self._limit = max_frame_bytes if first_frame_limit is None else min(first_frame_limit, max_frame_bytes)
        self._first_limit_code = first_frame_limit_error

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Every complete frame now buffered; raises FrameError on a framing violation.

        Frames that were complete before the violation are lost to the caller only if it ignores the
        exception's `frames` attribute, which carries them.
        """
        buf = self._buf
        buf.extend(data)
        frames: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = LENGTH.unpack_from(buf, pos)
            if length == 0:
                self._fail(frames, pos, ErrorCode.BAD_FRAME, "frame length 0: a frame holds at least its type byte")
            if length > self._limit:
                self._too_large(frames, pos, length)
            if end - pos - 4 < length:
                break
            frames.append((buf[pos + 4], bytes(buf[pos + 5 : pos + 4 + length])))
            pos += 4 + length
            self._limit = self.max_frame_bytes
        if pos:
            del buf[:pos]
            if not buf and buf.__alloc__() > self.SHRINK_BYTES:
                self._buf = bytearray()
        return frames

    def _too_large(self, frames: list[tuple[int, bytes]], pos: int, length: int) -> None:
        if self._limit < self.max_frame_bytes and self._first_limit_code is not None:
            code, text = self._first_limit_code
            self._fail(frames, pos, code, text.format(length=length, limit=self._limit))
        self._fail(
            frames, pos, ErrorCode.FRAME_TOO_LARGE,
            f"frame of {length} bytes is over the limit of {self._limit} (broker.max_frame_bytes)",
        )

    def _fail(self, frames: list[tuple[int, bytes]], pos: int, code: str, message: str) -> None:
        del self._buf[:]
        raise FrameError(code, message, frames)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held so far."""
        return len(self._buf)

    @property
    def partial_length(self) -> int:
        """Bytes the incomplete frame at the head of the buffer needs in all (its 4-byte length field
        included), once its header is in; 0 while fewer than 4 bytes are buffered.

        Only meaningful right after `feed` returned: the buffer then holds at most one incomplete frame.
        """
        buf = self._buf
        if len(buf) < 4:
            return 0
        return 4 + LENGTH.unpack_from(buf, 0)[0]


def payload_id(payload: bytes) -> int:
    """The request `id` of a payload that failed typed decoding, or 0 if it has no usable one."""
    try:
        obj = _generic_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return 0
    if isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF_FFFF:
            return value
    return 0


def decode_request(type_byte: int, payload: bytes) -> Message:
    """The typed request of one frame, or an `Error` reply describing why it is not one."""
    decoder = _request_decoders.get(type_byte)
    if decoder is None:
        return Error(
            id=payload_id(payload),
            code=ErrorCode.UNKNOWN_TYPE,
            message=f"unknown request type 0x{type_byte:02X}; protocol v1 requests are 0x01-0x0D",
        )
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Expected `object`, got"):
            text = "payload must be a MessagePack map, " + text[text.index("got") :]
        return Error(id=payload_id(payload), code=ErrorCode.BAD_REQUEST, message=text)
    except (msgspec.DecodeError, RecursionError):
        return Error(id=0, code=ErrorCode.BAD_REQUEST, message="payload is not valid MessagePack")


def decode_response(type_byte: int, payload: bytes) -> Message:
    """The typed response of one frame (clients use it); raises msgspec errors on a bad one."""
    decoder = _response_decoders.get(type_byte)
    if decoder is None:
        raise msgspec.ValidationError(f"unknown response type 0x{type_byte:02X}")
    try:
        return decoder.decode(payload)
    except RecursionError:
        raise msgspec.DecodeError("response nests too deeply to decode") from None
