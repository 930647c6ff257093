"""The control plane: peers, handshakes, timers, configuration, supervision of workers."""
