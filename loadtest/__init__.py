"""Load testing for digis-signal: ``python -m loadtest SCENARIO [options]``.

Holds thousands of real WebSocket connections speaking the Centrifuge JSON protocol
(or the baseline's, see :mod:`loadtest.baseline`) from several client processes, and
reports delivery latency, loss, and the server's CPU and memory cost read from /proc.
See ``loadtest/README.md``.
"""

__version__ = "0.1.0"
