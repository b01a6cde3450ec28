# cython: language_level=3
"""The frame gate compiled with Cython against picows' C API: see frame_gate.py.

Built by scripts/build_native.py into _native/ and used only with the mypyc modules
(native.py). The same class as frame_gate.py, with one shortcut: a whole text frame
goes straight to ``whole_text`` without any Python-level frame handling.
"""

from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport


cdef class FrameGate(WSListener):
    """picows listener base: whole text frames to ``whole_text``, others to ``on_frame``."""

    cdef public object whole_text
    cdef public bint text_as_bytes
    cdef public bint fragmented

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef object handler = self.whole_text
        if (
            handler is not None
            and frame.msg_type == WSMsgType.TEXT
            and frame.fin
            and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
            and not self.fragmented
            and not transport.is_close_frame_sent
        ):
            if self.text_as_bytes:
                handler(frame.get_payload_as_bytes())
                return
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                pass  # on_frame closes with 1007
            else:
                handler(text)
                return
        self.on_frame(transport, frame)

    def on_frame(self, WSTransport transport, WSFrame frame):
        """Handle one frame of any kind."""
        raise NotImplementedError
