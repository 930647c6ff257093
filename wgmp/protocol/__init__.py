"""The WireGuard protocol core: no I/O, no clock, no global randomness.

Time comes in as an argument (`now`, monotonic seconds as float; wall time only for TAI64N),
randomness as an object the caller passes, results come out as values.
"""
