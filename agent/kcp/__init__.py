"""KCP, RustDesk's reliable stream over UDP: the framing and state machine (pure), a stream over a
punched UDP socket handed out as an ordinary socket, and the freeing of what the binding leaks."""
