"""The daemon: the wire protocol, the ZeroMQ front end, the scheduler, the lifecycle, metrics and logs.

A request's way through: ``frontend`` (ROUTER sockets, decoding with
``protocol``) -> ``scheduler`` (queue, slots, deadlines, cancel, retention)
-> a runner from ``runnerd.sandbox`` -> replies streamed back by
``frontend``. ``daemon`` wires them together and handles signals, reloads
and sd_notify (``sdnotify``); ``metrics`` and ``logs`` report.
"""
