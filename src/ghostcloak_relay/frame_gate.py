"""The frame gate: the base of the relay's picows listeners, which routes each frame.

Every frame picows reads reaches :meth:`FrameGate.on_ws_frame`. Here, the plain Python
gate, it hands every frame to :meth:`FrameGate.on_frame`, which the listener implements
in full (fragments, control frames, limits, and whole text messages too).

``frame_gate.pyx`` is the same class compiled with Cython against picows' C API, built
beside the mypyc modules (``native.py``) and used with them. It answers the one common
case itself: a whole, unfragmented text frame (no reserved bits, the connection not
closing) goes straight to :attr:`whole_text` as ``bytes`` (:attr:`text_as_bytes`) or as
``str`` when it is valid UTF-8; everything else still goes to :meth:`on_frame`. Why in
C: picows calls a Python listener through a method lookup and a bound-method call per
frame, and each frame field read from Python (``msg_type`` turns a C enum into a Python
enum) is another lookup. mypyc cannot compile a native subclass of a Cython class
(native.py), so these steps stayed in the interpreter: about 0.7 µs of user CPU per
request/response pair, a sixth of the relay's user-space cost at 50 sessions (``bench/``).

So the compiled gate is a shortcut, never a second implementation: :meth:`on_frame`
handles the fast path's frames the same way when they reach it (it is what the plain
Python relay runs), and the listener keeps :attr:`fragmented` true while a fragmented
message is in progress, so a text frame then goes to the slow path, which refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from picows import WSTransport
from picows.picows import WSListener

__all__ = ["FrameGate"]


class FrameGate(WSListener):
    """picows listener base: every frame to :meth:`on_frame` (the Cython build: see above)."""

    # slots: an upstream listener per session (memory per session), as in the Cython build
    __slots__ = ("fragmented", "text_as_bytes", "whole_text")

    def __init__(self) -> None:
        super().__init__()
        #: where whole text frames go on the compiled fast path (None: always on_frame)
        self.whole_text: Callable[[Any], None] | None = None
        #: hand them over as ``bytes`` not yet checked for UTF-8 (the receiver parses
        #: JSON, which checks it) instead of as decoded ``str``
        self.text_as_bytes = False
        #: a fragmented message is in progress (kept by the listener): no fast path
        self.fragmented = False

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        self.on_frame(transport, frame)

    def on_frame(self, transport: WSTransport, frame: Any) -> None:
        """Handle one frame of any kind (``frame``: a picows ``WSFrame``)."""
        raise NotImplementedError
