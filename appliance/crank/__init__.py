"""The crank: rotary encoder, push button and serial pulse source, feeding one event queue.

``source.open_crank`` opens the configured input; ``events.CrankQueue`` is what the
daemon's worker reads Step, Rewind and Press events from.
"""
